-- The sqlite backend's SQL: the schema, then every statement it runs, by name.
--
-- A section starts at a "-- name: <name>" line and ends at the next one; the comment lines
-- in it are for readers and are dropped when queries.py loads the file (once, at import).
-- The schema section holds several statements, run one after the other; each is
-- idempotent, so upgrading a file is running them again (raise SCHEMA_VERSION in
-- connection.py with any change to it). A word in braces, such as {queues}, is a slot
-- that queries.py fills in for the number of queues at hand; the statements written for
-- one row are repeated for n rows by repeating their VALUES tuple.
--
-- A message row is ready (state 0), scheduled (1: its visible_at is an eta or a retry
-- delay) or leased (2: its visible_at is when the lease runs out).


-- name: schema
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY,
    namespace TEXT NOT NULL,
    id TEXT NOT NULL,
    queue TEXT NOT NULL,
    priority INTEGER NOT NULL,
    body BLOB NOT NULL,
    state INTEGER NOT NULL,
    visible_at REAL NOT NULL,
    deliveries INTEGER NOT NULL DEFAULT 0,
    lease INTEGER,
    key TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS messages_id ON messages (namespace, id);
-- A key is held while its message exists (queued, scheduled or running).
CREATE UNIQUE INDEX IF NOT EXISTS messages_key ON messages (namespace, key) WHERE key IS NOT NULL;
-- Ready rows in claim order: priority high to low, then arrival (the rowid ends each entry).
CREATE INDEX IF NOT EXISTS messages_ready ON messages (namespace, queue, priority DESC) WHERE state = 0;
-- Scheduled and leased rows by the time they fall due.
CREATE INDEX IF NOT EXISTS messages_due ON messages (namespace, queue, visible_at) WHERE state > 0;
CREATE TABLE IF NOT EXISTS dead_letters (
    namespace TEXT NOT NULL,
    id TEXT NOT NULL,
    queue TEXT NOT NULL,
    body BLOB NOT NULL,
    reason TEXT NOT NULL,
    died_at REAL NOT NULL,
    PRIMARY KEY (namespace, id)
);
CREATE INDEX IF NOT EXISTS dead_letters_time ON dead_letters (namespace, died_at);
-- status, name, queue and queued_at are the state's listing in the history (Store.history),
-- NULL for a state that is not listed. A file made before schema 3 gets them from
-- connection.add_history_columns, before these statements run.
CREATE TABLE IF NOT EXISTS states (
    namespace TEXT NOT NULL,
    task_id TEXT NOT NULL,
    data BLOB NOT NULL,
    expires_at REAL,
    status TEXT,
    name TEXT,
    queue TEXT,
    queued_at REAL,
    PRIMARY KEY (namespace, task_id)
);
CREATE INDEX IF NOT EXISTS states_expiry ON states (expires_at) WHERE expires_at IS NOT NULL;
-- The history newest first, whole or by one filter; a second filter is checked row by row.
CREATE INDEX IF NOT EXISTS states_history ON states (namespace, queued_at) WHERE queued_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS states_by_status ON states (namespace, status, queued_at) WHERE queued_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS states_by_name ON states (namespace, name, queued_at) WHERE queued_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS states_by_queue ON states (namespace, queue, queued_at) WHERE queued_at IS NOT NULL;
-- AUTOINCREMENT: a subscriber remembers the last seq it saw, so a seq must never be reused,
-- not even after every row was pruned.
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    namespace TEXT NOT NULL,
    channel TEXT NOT NULL,
    data BLOB NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS events_channel ON events (namespace, channel, seq);
CREATE INDEX IF NOT EXISTS events_age ON events (created_at);
CREATE TABLE IF NOT EXISTS kv (
    namespace TEXT NOT NULL,
    key TEXT NOT NULL,
    value BLOB NOT NULL,
    expires_at REAL,
    PRIMARY KEY (namespace, key)
);
CREATE INDEX IF NOT EXISTS kv_expiry ON kv (expires_at) WHERE expires_at IS NOT NULL;


-- ---------------------------------------------------------------------------------------
-- messages: enqueue


-- name: insert
-- An id enqueued twice, or a key already held, inserts nothing.
INSERT INTO messages (namespace, id, queue, priority, body, state, visible_at, key)
VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING

-- name: key_holder
SELECT id FROM messages WHERE namespace = ? AND key = ?


-- ---------------------------------------------------------------------------------------
-- messages: fetch. Each statement is atomic on its own, so a fetch needs no transaction.


-- name: promote
-- Due scheduled rows and expired leases become ready.
UPDATE messages SET state = 0
WHERE namespace = ? AND queue IN ({queues}) AND state > 0 AND visible_at <= ?

-- name: claim
-- Lease the best of every queue's candidates: priority first, then the order the queues were
-- given, then arrival. The lease token is random, so the claimed rows can be read back.
UPDATE messages SET state = 2, visible_at = ?, deliveries = deliveries + 1, lease = ?
WHERE seq IN (SELECT seq FROM ({candidates}) ORDER BY priority DESC, rank, seq LIMIT ?)

-- name: claim_candidates
-- One queue's candidates, {rank} being its place in the fetch: its best ready rows (from the
-- ready index, in order) and its rows that fell due since the last promote (from the due
-- index: usually none). Claiming a due row directly is what lets most fetches skip the
-- promote. Joined with UNION ALL, one per queue, into the claim's {candidates}.
SELECT * FROM (
    SELECT seq, priority, {rank} AS rank FROM messages
    WHERE namespace = ? AND queue = ? AND state = 0 ORDER BY priority DESC, seq LIMIT ?
)
UNION ALL
SELECT seq, priority, {rank} AS rank FROM messages
WHERE namespace = ? AND queue = ? AND state > 0 AND visible_at <= ?

-- name: claimed
-- What a claim took (its lease token and lease end), as one row: JSON for the small fields
-- and the bodies end to end. One row instead of one per message matters under load: each
-- row is a step that gives up the GIL, and getting it back from a busy event loop can take
-- a whole switch interval.
SELECT
    json_group_array(json_array(seq, id, queue, deliveries, priority, length(body))),
    CAST(group_concat(body, '') AS BLOB)
FROM messages
WHERE namespace = ? AND queue IN ({queues}) AND state > 0 AND visible_at = ? AND lease = ?

-- name: next_due
-- When the earliest scheduled row or lease of these queues falls due: the min() of
-- {dues}, one queue_due per queue joined with UNION ALL.
SELECT min(due) FROM ({dues})

-- name: queue_due
-- One min() per queue, so each is a single index probe.
SELECT min(visible_at) AS due FROM messages WHERE namespace = ? AND queue = ? AND state > 0

-- name: due_within
-- Does a scheduled row (state 1, a parameter) of these queues fall due by then? `state > 0`
-- too: it lets the partial index of scheduled and leased rows serve the query.
-- Parameters: namespace, the queues, 1, the time.
SELECT EXISTS (
    SELECT 1 FROM messages
    WHERE namespace = ? AND queue IN ({queues}) AND state > 0 AND state = ? AND visible_at <= ?
)

-- name: unclaim
-- A claim nobody received (its fetch was cancelled): ready again, as if never delivered.
UPDATE messages SET state = 0, deliveries = deliveries - 1, lease = NULL
WHERE namespace = ? AND id = ? AND state = 2 AND lease = ?


-- ---------------------------------------------------------------------------------------
-- messages: settle. The receipt is the lease token of the claim: a worker whose lease ran
-- out, and whose message another worker now holds, can neither ack it, put it back, extend
-- the new lease nor dead-letter it. A NULL receipt (a delivery not from a claim) passes.


-- name: ack
-- Also dead_letter's first step, which buries the message only when this deleted it.
-- Parameters: namespace, id, receipt, receipt.
DELETE FROM messages WHERE namespace = ? AND id = ? AND (? IS NULL OR lease = ?)

-- name: ack_many
-- The (id, receipt) pairs as one JSON array of arrays: one statement for any number of them.
-- CROSS JOIN keeps the pairs outside, so each is one probe of the id index (left to itself,
-- the planner may scan the namespace's rows instead). Parameters: the pairs, namespace.
DELETE FROM messages WHERE seq IN (
    SELECT m.seq FROM json_each(?) AS held
    CROSS JOIN messages AS m ON m.namespace = ? AND m.id = json_extract(held.value, '$[0]')
    WHERE json_extract(held.value, '$[1]') IS NULL OR m.lease = json_extract(held.value, '$[1]')
)

-- name: requeue
-- Parameters: body (NULL keeps it), state, visible_at, namespace, id, receipt, receipt.
UPDATE messages SET body = coalesce(?, body), state = ?, visible_at = ?, lease = NULL
WHERE namespace = ? AND id = ? AND (? IS NULL OR lease = ?)

-- name: extend
-- Parameters: visible_at, namespace, id, receipt, receipt. A lease that ran out and went back
-- to ready (a promote) but that nobody has claimed since still carries this receipt: the
-- worker still runs it, so it is leased again rather than run twice.
UPDATE messages SET visible_at = ?, state = 2
WHERE namespace = ? AND id = ? AND state IN (0, 2) AND (? IS NULL OR lease = ?)

-- name: bury
-- The dead letter of a message, in the transaction that acks it.
INSERT OR REPLACE INTO dead_letters (namespace, id, queue, body, reason, died_at) VALUES (?, ?, ?, ?, ?, ?)


-- ---------------------------------------------------------------------------------------
-- messages and dead letters: management


-- name: dead_letters
SELECT id, queue, body, reason, died_at FROM dead_letters WHERE namespace = ? ORDER BY died_at DESC LIMIT ?

-- name: replay_all
DELETE FROM dead_letters WHERE namespace = ? RETURNING id, queue, body, reason, died_at

-- name: replay_one
DELETE FROM dead_letters WHERE namespace = ? AND id = ? RETURNING id, queue, body, reason, died_at

-- name: cancel
-- A leased message runs already: only a queued or scheduled one can be cancelled.
DELETE FROM messages WHERE namespace = ? AND id = ? AND state != 2

-- name: purge
DELETE FROM messages WHERE namespace = ? AND queue = ? AND state != 2

-- name: count_queued
-- Each queue's ready rows and when the oldest of them became ready: a ready row's visible_at
-- is its enqueue time, or the due time of its eta or retry delay. The same pass over the
-- namespace's rows as the count alone, so the age costs nothing more.
-- Parameters: namespace, now.
SELECT queue, count(*), min(visible_at) FROM messages WHERE namespace = ? AND state != 2 AND visible_at <= ? GROUP BY queue

-- name: count_scheduled_and_running
-- Parameters: now, namespace.
SELECT count(*) FILTER (WHERE state != 2 AND visible_at > ?), count(*) FILTER (WHERE state = 2)
FROM messages WHERE namespace = ?

-- name: count_dead
SELECT count(*) FROM dead_letters WHERE namespace = ?

-- name: flush_messages
DELETE FROM messages WHERE namespace = ?

-- name: flush_dead_letters
DELETE FROM dead_letters WHERE namespace = ?


-- ---------------------------------------------------------------------------------------
-- task states. An expired row counts as absent: it only waits for the prune.


-- name: put_states
INSERT INTO states (namespace, task_id, data, expires_at, status, name, queue, queued_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (namespace, task_id) DO UPDATE SET data = excluded.data, expires_at = excluded.expires_at,
    status = excluded.status, name = excluded.name, queue = excluded.queue, queued_at = excluded.queued_at

-- name: put_state_if_absent
-- Parameters: namespace, task_id, data, expires_at, status, name, queue, queued_at, now.
INSERT INTO states (namespace, task_id, data, expires_at, status, name, queue, queued_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (namespace, task_id) DO UPDATE SET data = excluded.data, expires_at = excluded.expires_at,
    status = excluded.status, name = excluded.name, queue = excluded.queue, queued_at = excluded.queued_at
WHERE states.expires_at IS NOT NULL AND states.expires_at <= ?

-- name: get_state
SELECT data FROM states WHERE namespace = ? AND task_id = ? AND (expires_at IS NULL OR expires_at > ?)

-- name: get_states
-- The task ids as one JSON array.
SELECT task_id, data FROM states
WHERE namespace = ? AND task_id IN (SELECT value FROM json_each(?)) AND (expires_at IS NULL OR expires_at > ?)

-- name: history
-- A page of the history: {filters} is an "AND column = ?" for each filter given.
SELECT task_id, data FROM states
WHERE namespace = ? {filters} AND queued_at < ? AND (expires_at IS NULL OR expires_at > ?)
ORDER BY queued_at DESC LIMIT ?

-- name: flush_states
DELETE FROM states WHERE namespace = ?


-- ---------------------------------------------------------------------------------------
-- channels


-- name: publish
INSERT INTO events (namespace, channel, data, created_at) VALUES (?, ?, ?, ?)

-- name: last_event_seq
-- Every row committed later has a higher seq (AUTOINCREMENT, writes are serialised).
SELECT coalesce(max(seq), 0) FROM events

-- name: read_events
SELECT seq, data FROM events WHERE namespace = ? AND channel = ? AND seq > ? ORDER BY seq LIMIT 500

-- name: flush_events
DELETE FROM events WHERE namespace = ?


-- ---------------------------------------------------------------------------------------
-- key-value


-- name: set_if_absent
-- One statement: inserts, or replaces a row whose TTL ran out, or changes nothing.
-- Parameters: namespace, key, value, expires_at, now.
INSERT INTO kv (namespace, key, value, expires_at) VALUES (?, ?, ?, ?)
ON CONFLICT (namespace, key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at
WHERE kv.expires_at IS NOT NULL AND kv.expires_at <= ?

-- name: get_value
SELECT value, expires_at FROM kv WHERE namespace = ? AND key = ?

-- name: set_value
INSERT OR REPLACE INTO kv (namespace, key, value, expires_at) VALUES (?, ?, ?, ?)

-- name: delete_value
DELETE FROM kv WHERE namespace = ? AND key = ?

-- name: flush_values
DELETE FROM kv WHERE namespace = ?


-- ---------------------------------------------------------------------------------------
-- pruning, of every namespace, a bounded chunk at a time. Parameters: cutoff, chunk size.


-- name: prune_states
DELETE FROM states WHERE rowid IN (SELECT rowid FROM states WHERE expires_at <= ? LIMIT ?)

-- name: prune_values
DELETE FROM kv WHERE rowid IN (SELECT rowid FROM kv WHERE expires_at <= ? LIMIT ?)

-- name: prune_events
DELETE FROM events WHERE seq IN (SELECT seq FROM events WHERE created_at < ? LIMIT ?)

-- name: live_values_in_range
-- The live values whose key is in [low, high): a prefix's keys (the worker registry's).
SELECT value FROM kv WHERE namespace = ? AND key >= ? AND key < ? AND (expires_at IS NULL OR expires_at > ?)

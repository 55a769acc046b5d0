// The offload dashboard: one page, hash routes (#/, #/tasks, #/task/ID, #/workers, #/dead,
// #/periodic). Every URL is relative to the page, so the dashboard works under any prefix.
// Data is user data (arguments, tracebacks): it only ever goes into the page as textContent.
"use strict";

const view = document.getElementById("view");
const csrf = document.querySelector('meta[name="csrf-token"]').content;
const STATUSES = ["queued", "started", "retrying", "succeeded", "failed", "cancelled", "expired"];
let live = null;      // the EventSource or fallback timer of the page shown
let render = 0;       // bumps on every navigation: late answers for an old page are dropped

// -- small helpers ---------------------------------------------------------------------------
function h(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function paint(...nodes) {
  view.replaceChildren(...nodes.flat(Infinity).filter((node) => node !== null && node !== undefined));
}

function when(epoch) {
  return epoch == null ? "—" : new Date(epoch * 1000).toLocaleString();
}

function isoWhen(iso) {
  return iso ? new Date(iso).toLocaleString() : "—";
}

function seconds(value) {
  if (value == null) return "—";
  return value < 1 ? `${Math.round(value * 1000)} ms` : value < 120 ? `${value.toFixed(1)} s` : `${Math.round(value / 60)} min`;
}

function relative(epoch) {
  const delta = Math.round(epoch - Date.now() / 1000);
  return delta >= 0 ? `in ${delta} s` : `${-delta} s ago`;
}

function showError(message) {
  const box = document.getElementById("error");
  box.textContent = message || "";
  box.hidden = !message;
}

async function api(path, body) {
  const init = body === undefined ? {} : {
    method: "POST", body: JSON.stringify(body),
    headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf},
  };
  const response = await fetch(path, init);
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error(data.detail || `${response.status} ${response.statusText}`);
    error.status = response.status;
    throw error;
  }
  return data;
}

function table(id, columns, rows, rowAttrs) {
  // columns: [label, (row) => cell content]; on narrow screens CSS turns rows into cards,
  // labelled from data-label.
  const head = h("tr", {}, columns.map(([label]) => h("th", {scope: "col"}, label)));
  const body = rows.map((row) => h("tr", rowAttrs ? rowAttrs(row) : {},
    columns.map(([label, cell, testid]) => h("td", {"data-label": label, "data-testid": testid}, cell(row)))));
  const empty = rows.length ? null : h("p", {class: "empty", "data-testid": `${id}-empty`}, "Nothing here.");
  return h("div", {class: "table-wrap"}, h("table", {id, class: "cards"}, h("thead", {}, head), h("tbody", {}, body)), empty);
}

function taskLink(id) {
  return h("a", {href: `#/task/${encodeURIComponent(id)}`, class: "mono"}, id);
}

function badge(status) {
  return h("span", {class: `badge status-${status}`, "data-testid": "status"}, status);
}

function progressBar(fraction, id) {
  const value = fraction == null ? null : Math.max(0, Math.min(1, fraction));
  return h("progress", {id, max: 1, value: value === null ? null : value, "data-value": value ?? ""});
}

// -- live updates: SSE, or a fetch every 2 s when EventSource fails --------------------------
function stopLive() {
  const indicator = document.getElementById("live");
  indicator.textContent = "";
  indicator.className = "";
  if (!live) return;
  if (live.close) live.close(); else clearInterval(live.timer);
  live = null;
}

function follow(mine, query, handlers) {
  // A page whose data arrived after the user moved on does not start following.
  if (mine !== render) return;
  stopLive();
  const indicator = document.getElementById("live");
  indicator.textContent = "connecting";
  const guarded = (handler) => (data) => { if (mine === render) handler(data); };
  const poll = () => {
    stopLive();
    indicator.textContent = "polling";
    indicator.className = "polling";
    const tick = () => {
      if (handlers.overview) api("api/overview").then(guarded(handlers.overview), () => {});
      if (handlers.task && query.task) api(`api/tasks/${encodeURIComponent(query.task)}`).then(guarded(handlers.task), () => {});
    };
    live = {timer: setInterval(tick, 2000)};
  };
  if (!window.EventSource) return poll();
  const source = new EventSource("api/events" + (query.task ? `?task=${encodeURIComponent(query.task)}` : ""));
  live = source;
  source.onopen = () => { indicator.textContent = "live"; indicator.className = "on"; };
  source.onerror = () => { if (live === source) poll(); };
  for (const [name, handler] of Object.entries(handlers)) {
    source.addEventListener(name, (event) => guarded(handler)(JSON.parse(event.data)));
  }
}

// -- pages -------------------------------------------------------------------------------------
function card(label, value, id) {
  return h("div", {class: "card"}, h("div", {class: "label"}, label), h("div", {class: "value", id, "data-testid": id}, value));
}

function workersTable(workers) {
  return table("workers-table", [
    ["Worker", (w) => h("span", {class: "mono"}, w.id), "worker-id"],
    ["Host", (w) => `${w.hostname} (pid ${w.pid})`],
    ["Queues", (w) => w.queues.join(", "), "worker-queues"],
    ["Pool", (w) => `${w.pool} × ${w.concurrency}`],
    ["Running", (w) => [`${w.running.length} / ${w.concurrency} `, w.running.map(taskLink).flatMap((a) => [a, " "])], "worker-running"],
    ["Started", (w) => isoWhen(w.started_at)],
    ["Last seen", (w) => isoWhen(w.last_seen)],
    ["Version", (w) => w.version],
  ], workers, (w) => ({"data-worker-id": w.id}));
}

function overviewPage(data) {
  paint(
    h("h1", {}, "Overview"),
    h("p", {class: "muted", id: "broker"}, `${data.broker} · namespace ${data.namespace}`),
    h("div", {class: "cards-row"}, card("Running", data.running, "count-running"),
      card("Scheduled", data.scheduled, "count-scheduled"), card("Dead letters", data.dead, "count-dead"),
      card("Workers", data.workers.length, "count-workers")),
    h("h2", {}, "Queues"),
    table("queues-table", [
      ["Queue", (q) => q.name, "queue-name"], ["Depth", (q) => q.depth, "depth"],
      ["Running", (q) => q.running, "running"], ["Done / min", (q) => q.done_per_min, "done-per-min"],
    ], data.queues, (q) => ({"data-queue": q.name})),
    h("h2", {}, "Workers"),
    workersTable(data.workers),
  );
}

async function overview(mine) {
  const data = await api("api/overview");
  if (mine !== render) return;
  overviewPage(data);
  follow(mine, {}, {overview: overviewPage});
}

async function workers(mine) {
  const show = (list) => paint(h("h1", {}, "Workers"), workersTable(list));
  const data = await api("api/workers");
  if (mine !== render) return;
  show(data.workers);
  follow(mine, {}, {overview: (data) => show(data.workers)});
}

function taskRows(tasks) {
  return table("tasks-table", [
    ["Task", (t) => taskLink(t.id), "task-id"], ["Name", (t) => t.name, "task-name"],
    ["Status", (t) => badge(t.status)], ["Queue", (t) => t.queue],
    ["Progress", (t) => t.progress == null ? (t.message || "") : h("span", {}, progressBar(t.progress), " ", t.message || "")],
    ["Attempts", (t) => t.attempts], ["Queued", (t) => when(t.queued_at)], ["Finished", (t) => when(t.finished_at)],
  ], tasks, (t) => ({"data-task-id": t.id, "data-status": t.status}));
}

async function tasks(mine, params) {
  const filters = {status: params.get("status") || "", name: params.get("name") || "", queue: params.get("queue") || ""};
  const go = (changes) => {
    const query = new URLSearchParams(Object.entries({...filters, ...changes}).filter(([, v]) => v));
    location.hash = `#/tasks${query.toString() ? "?" + query : ""}`;
  };
  const status = h("select", {id: "filter-status", "aria-label": "status", onchange: (e) => go({status: e.target.value})},
    h("option", {value: ""}, "any status"), STATUSES.map((s) => h("option", {value: s, selected: s === filters.status}, s)));
  const text = (id, key, label) => h("input", {id, type: "search", placeholder: label, "aria-label": label, value: filters[key],
    onchange: (e) => go({[key]: e.target.value.trim()})});
  const search = h("form", {id: "task-search-form", class: "search", onsubmit: (e) => {
    e.preventDefault();
    const id = e.target.elements.id.value.trim();
    if (id) location.hash = `#/task/${encodeURIComponent(id)}`;
  }}, h("input", {id: "task-search", name: "id", type: "search", placeholder: "task id", "aria-label": "task id"}),
  h("button", {type: "submit"}, "Open"));
  const list = h("div", {id: "tasks-list"});
  const older = h("button", {id: "older", type: "button", hidden: true}, "Older");
  const base = new URLSearchParams(Object.entries(filters).filter(([, v]) => v));
  base.set("limit", "50");
  let shown = [], next = null, paged = false;
  const load = async (before) => {
    const query = new URLSearchParams(base);
    if (before != null) query.set("before", before);
    const data = await api(`api/tasks?${query}`);
    return data;
  };
  const draw = () => {
    list.replaceChildren(taskRows(shown));
    older.hidden = next == null;
  };
  older.addEventListener("click", async () => {
    const data = await load(next);
    shown = shown.concat(data.tasks); next = data.next_before; paged = true;
    draw();
  });
  paint(h("h1", {}, "Tasks"),
    h("div", {class: "filters"}, status, text("filter-name", "name", "task name"), text("filter-queue", "queue", "queue"), search),
    list, older);
  const first = await load(null);
  if (mine !== render) return;
  shown = first.tasks; next = first.next_before;
  draw();
  let last = JSON.stringify(first);
  // The first page follows new tasks as the overview ticks; once paged, the list stays put.
  follow(mine, {}, {overview: async () => {
    if (paged) return;
    const data = await load(null);
    const text = JSON.stringify(data);
    if (text === last || mine !== render) return;
    last = text; shown = data.tasks; next = data.next_before;
    draw();
  }});
}

function field(label, value, id) {
  return [h("dt", {}, label), h("dd", {id, "data-testid": id}, value)];
}

function taskPage(data) {
  const t = data.task;
  const wait = t.started_at != null ? t.started_at - t.queued_at : null;
  const run = t.started_at != null && t.finished_at != null ? t.finished_at - t.started_at : null;
  const outcome = t.error ? [
    h("h2", {}, "Error"),
    h("p", {}, h("strong", {id: "task-error-type"}, t.error.type), ": ", h("span", {id: "task-error-message"}, t.error.message)),
    h("pre", {id: "task-traceback"}, t.error.traceback || ""),
  ] : t.status === "succeeded" ? [h("h2", {}, "Result"), h("pre", {id: "task-result"}, JSON.stringify(t.result, null, 2))] : [];
  paint(
    h("h1", {}, "Task ", h("span", {class: "mono", id: "task-id"}, t.id)),
    h("dl", {class: "fields"},
      field("Name", t.name, "task-name"), field("Status", badge(t.status), "task-status"),
      field("Queue", t.queue, "task-queue"), field("Attempts", t.attempts, "task-attempts"),
      field("Progress", h("span", {}, progressBar(t.progress, "task-progress"), " ",
        h("span", {id: "task-message"}, t.message || "")), "task-progress-field"),
      field("Queued", when(t.queued_at), "task-queued"), field("Started", when(t.started_at), "task-started"),
      field("Finished", when(t.finished_at), "task-finished"),
      field("Waited", seconds(wait), "task-waited"), field("Ran", seconds(run), "task-ran"),
      field("Parent", data.parent ? [taskLink(data.parent.id), ` ${data.parent.name} (${data.parent.status})`] : "—", "task-parent")),
    h("h2", {}, "Call"), h("pre", {id: "task-call"}, t.call ?? "(not available)"),
    outcome,
    Object.keys(t.meta || {}).length ? [h("h2", {}, "Meta"), h("pre", {id: "task-meta"}, JSON.stringify(t.meta, null, 2))] : [],
    h("h2", {}, "Children"),
    data.children.length ? taskRows(data.children) : h("p", {class: "muted", id: "task-children-none"}, "None."),
  );
}

async function task(mine, id) {
  const data = await api(`api/tasks/${encodeURIComponent(id)}`);
  if (mine !== render) return;
  taskPage(data);
  follow(mine, {task: id}, {task: taskPage});
}

async function dead(mine) {
  const status = h("p", {id: "dead-status", class: "muted", role: "status"});
  const list = h("div", {id: "dead-list"});
  const picked = () => [...list.querySelectorAll("input.pick:checked")].map((box) => box.value);
  const refresh = async () => {
    const data = await api("api/dead?limit=100");
    if (mine !== render) return;
    list.replaceChildren(table("dead-table", [
      ["", (d) => h("input", {type: "checkbox", class: "pick", value: d.id, "aria-label": `select ${d.id}`})],
      ["Task", (d) => taskLink(d.id), "dead-id"], ["Name", (d) => d.name ?? "—"], ["Queue", (d) => d.queue],
      ["Reason", (d) => d.reason, "dead-reason"], ["Call", (d) => h("code", {}, d.call ?? "—")], ["Died", (d) => when(d.died_at)],
    ], data.dead, (d) => ({"data-dead-id": d.id})));
  };
  const act = (action, all) => async () => {
    const ids = picked();
    if (!all && !ids.length) { status.textContent = "Select some dead letters first."; return; }
    const what = all ? "every dead letter" : `${ids.length} dead letter(s)`;
    if (action === "purge" && !confirm(`Purge ${what}? They cannot be replayed afterwards.`)) return;
    let said;
    try {
      const done = await api(`api/dead/${action}`, all ? {all: true} : {ids});
      said = `${action === "purge" ? "Purged" : "Replayed"} ${done[action === "purge" ? "purged" : "replayed"].length} task(s).`;
    } catch (error) {
      // The CSRF token is made per gateway process: a page older than a restart must reload.
      said = error.status === 403 ? `Could not ${action}: ${error.message}. Reload the page and try again.`
        : `Could not ${action}: ${error.message}`;
    }
    await refresh();
    status.textContent = said;  // after the list is redrawn, so the message describes what is shown
  };
  paint(h("h1", {}, "Dead letters"),
    h("div", {class: "actions"},
      h("button", {id: "replay-selected", type: "button", onclick: act("replay", false)}, "Replay selected"),
      h("button", {id: "replay-all", type: "button", onclick: act("replay", true)}, "Replay all"),
      h("button", {id: "purge-selected", type: "button", class: "danger", onclick: act("purge", false)}, "Purge selected"),
      h("button", {id: "purge-all", type: "button", class: "danger", onclick: act("purge", true)}, "Purge all"),
      h("button", {id: "dead-refresh", type: "button", onclick: refresh}, "Refresh")),
    status, list);
  await refresh();
}

async function periodic(mine) {
  const data = await api("api/periodic");
  if (mine !== render) return;
  paint(h("h1", {}, "Periodic tasks"), h("p", {class: "muted", id: "timezone"}, `Schedules in ${data.timezone}`),
    table("periodic-table", [
      ["Name", (p) => p.name, "periodic-name"], ["Task", (p) => p.task], ["Schedule", (p) => h("code", {}, p.schedule)],
      ["Queue", (p) => p.queue], ["Next run", (p) => [when(p.next_run), " ", h("span", {class: "muted"}, `(${relative(p.next_run)})`)], "next-run"],
    ], data.periodic, (p) => ({"data-periodic": p.name})));
}

// -- routing ---------------------------------------------------------------------------------
async function route() {
  const mine = ++render;
  stopLive();
  showError("");
  const [path, query] = (location.hash.slice(1) || "/").split("?");
  const params = new URLSearchParams(query || "");
  const parts = path.split("/").filter(Boolean);
  const page = parts[0] || "overview";
  for (const link of document.querySelectorAll("#nav a")) {
    link.classList.toggle("current", link.dataset.route === (page === "task" ? "tasks" : page));
  }
  document.body.dataset.page = page;
  paint(h("p", {class: "muted"}, "Loading…"));
  try {
    if (page === "overview") await overview(mine);
    else if (page === "tasks") await tasks(mine, params);
    else if (page === "task" && parts[1]) await task(mine, decodeURIComponent(parts.slice(1).join("/")));
    else if (page === "workers") await workers(mine);
    else if (page === "dead") await dead(mine);
    else if (page === "periodic") await periodic(mine);
    else paint(h("h1", {}, "Not found"), h("p", {}, h("a", {href: "#/"}, "Back to the overview")));
  } catch (error) {
    if (mine !== render) return;
    paint(h("h1", {}, error.status === 404 ? "Not found" : "Error"));
    showError(error.message);
  }
}

window.addEventListener("hashchange", route);
route();

"""Newsletter statistics for the export: 500,000 rows, written once, fast.

On SQLite the rows are made by the database itself, in one ``INSERT ... SELECT`` over a
recursive CTE: no row crosses into Python, which makes it several times faster than the
fastest executemany. Other databases get batches of executemany from a generator, so neither
model instances nor a list of every row are ever built. The numbers are a deterministic
hash of the row number: the same data every time, on every database.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from itertools import islice

from django.db import connection, transaction

from examples.photos.gallery.models import NewsletterStat

NEWSLETTERS = ("Weekly digest", "Product news", "Photo of the day", "Tips & tricks", "Events", "Offers",
               "Community", "Release notes")
FIELDS = ("newsletter", "sent_on", "recipients", "opened", "clicked", "unsubscribed", "bounced")
START = dt.date(2015, 1, 1)
ROWS_PER_DAY = 100
BATCH = 50_000
_HASH = 2654435761  # Knuth's multiplicative hash: spreads consecutive numbers over 32 bits


def rows(count: int) -> Iterator[tuple[object, ...]]:
    days: dict[int, str] = {}
    for i in range(count):
        h = (i * _HASH) % 2**32
        recipients = 500 + h % 49_501
        opened = recipients * (10 + (h // 2**8) % 50) // 100
        day = i // ROWS_PER_DAY
        sent_on = days.get(day) or days.setdefault(day, (START + dt.timedelta(days=day)).isoformat())
        yield (NEWSLETTERS[i % 8], sent_on, recipients, opened, opened * (2 + (h // 2**14) % 28) // 100,
               recipients * ((h // 2**20) % 10) // 1000, recipients * ((h // 2**24) % 30) // 1000)


def _sqlite_sql(table: str, count: int) -> str:
    quote = connection.ops.quote_name
    names = " ".join(f"WHEN {n} THEN '{name.replace(chr(39), chr(39) * 2)}'" for n, name in enumerate(NEWSLETTERS))
    julian_start = 2440587.5 + (START - dt.date(1970, 1, 1)).days  # the Julian day of START
    # The same formulas as rows(), in SQL (integer division truncates in both).
    return f"""
        INSERT INTO {quote(table)} ({', '.join(quote(f) for f in FIELDS)})
        WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < {count - 1}),
        h AS (SELECT i, (i * {_HASH}) % 4294967296 AS h FROM n),
        r AS (SELECT i, h, 500 + h % 49501 AS recipients FROM h),
        o AS (SELECT i, h, recipients, recipients * (10 + (h / 256) % 50) / 100 AS opened FROM r)
        SELECT CASE i % 8 {names} END, date({julian_start} + i / {ROWS_PER_DAY}), recipients, opened,
               opened * (2 + (h / 16384) % 28) / 100, recipients * ((h / 1048576) % 10) / 1000,
               recipients * ((h / 16777216) % 30) / 1000
        FROM o
    """


def seed(count: int) -> float | None:
    """Insert ``count`` rows unless the table has rows; the seconds it took, or None."""
    if NewsletterStat.objects.exists() or count <= 0:
        return None
    started = time.perf_counter()
    table = NewsletterStat._meta.db_table
    with transaction.atomic(), connection.cursor() as cursor:
        if connection.vendor == "sqlite":
            cursor.execute(_sqlite_sql(table, count))
        else:
            quote = connection.ops.quote_name
            sql = (f"INSERT INTO {quote(table)} ({', '.join(quote(f) for f in FIELDS)}) "
                   f"VALUES ({', '.join(['%s'] * len(FIELDS))})")
            generated = rows(count)
            while batch := list(islice(generated, BATCH)):
                cursor.executemany(sql, batch)
    return time.perf_counter() - started

"""What the per-item state writes cost SQLite itself, without batchpipe around them.

Creates batchpipe's schema (``batchpipe.db.schema``) in a fresh SQLite file with the pragmas
the Store uses (16 KiB pages, WAL, synchronous=NORMAL) and runs, through the bare ``sqlite3``
module, the same writes a job of N rows makes: insert the items (chunks of 10,000 in one
transaction), claim them by range in batches of 100,000 (one UPDATE each), apply one
succeeded result per item (executemany in chunks of 5,000, one transaction per chunk; a
success is not copied into the attempts history, see ``batchpipe/db/history.py``).
Prints the process CPU seconds of each step: the part of ``bench/bench_pipeline.py``'s
batchpipe time that no Python-side change can remove while every item keeps its own row.

    .venv/bin/python bench/store_floor.py --rows 1000000
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sqlite3
import tempfile
from pathlib import Path

import sqlalchemy as sa

from batchpipe.db.connect import SQLITE_PAGE_BYTES
from batchpipe.db.schema import metadata

NOW = "2026-01-01 00:00:00.000000"
TOKEN = "f100f100f1"


def cpu() -> float:
    """User+system CPU seconds of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    path = Path(tempfile.mkdtemp(prefix="batchpipe-store-floor-")) / "state.db"
    fresh = sqlite3.connect(path)  # the page size the Store gives a new file
    fresh.execute(f"PRAGMA page_size = {SQLITE_PAGE_BYTES}")
    fresh.execute("VACUUM")  # writes the (empty) file, fixing its page size
    fresh.close()
    engine = sa.create_engine(f"sqlite:///{path}")
    metadata.create_all(engine)
    engine.dispose()
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")
    db.execute(
        "INSERT INTO jobs (id, name, token, status, spec, created_at, updated_at) "
        "VALUES (1, 'floor', ?, 'running', '{}', ?, ?)",
        (TOKEN, NOW, NOW),
    )
    n = args.rows
    steps: dict[str, float] = {}

    started = cpu()
    db.execute("BEGIN")
    for first in range(0, n, 10_000):
        last = min(n, first + 10_000)
        db.executemany(
            "INSERT INTO items (job_id, row_index, row_key, status, error_message, attempts, "
            "updated_at) VALUES (1, ?, ?, 'pending', NULL, 0, ?)",
            [(i, f"doc-{i:08d}", NOW) for i in range(first, last)],
        )
    db.execute("COMMIT")
    steps["insert items"] = cpu() - started

    started = cpu()
    for batch, first in enumerate(range(0, n, 100_000), start=1):
        db.execute("BEGIN")
        db.execute(
            "INSERT INTO batches (id, job_id, status, round, request_count, request_bytes, "
            "first_custom_id, last_custom_id, intent_at) VALUES (?, 1, 'planned', 1, 0, 0, "
            "'a', 'b', ?)",
            (batch, NOW),
        )
        db.execute(
            "UPDATE items SET status = 'submitted', attempts = attempts + 1, custom_id = ? || "
            "CAST(row_index AS VARCHAR) || '-' || CAST(attempts + 1 AS VARCHAR), batch_id = ?, "
            "updated_at = ? WHERE job_id = 1 AND row_index BETWEEN ? AND ? "
            "AND status = 'pending'",
            (f"{TOKEN}-", batch, NOW, first, first + 99_999),
        )
        db.execute("COMMIT")
    steps["claim by range"] = cpu() - started

    started = cpu()
    for first in range(0, n, 5_000):
        rows = range(first, min(n, first + 5_000))
        db.execute("BEGIN")
        db.executemany(
            "UPDATE items SET status = ?, response_text = ?, stop_reason = ?, model = ?, "
            "input_tokens = ?, output_tokens = ?, cache_creation_input_tokens = ?, "
            "cache_read_input_tokens = ?, error_type = ?, error_message = ?, "
            "cost_usd = CASE WHEN ? IS NULL THEN cost_usd ELSE coalesce(cost_usd, 0) + ? END, "
            "updated_at = ? WHERE job_id = 1 AND row_index = ? AND custom_id = ? "
            "AND status = 'submitted'",
            [
                (
                    "succeeded",
                    f"Answer {i:012x}: a one-line summary.",
                    "end_turn",
                    "claude-haiku-4-5",
                    156,
                    10,
                    0,
                    0,
                    None,
                    None,
                    1e-4,
                    1e-4,
                    NOW,
                    i,
                    f"{TOKEN}-{i}-1",
                )
                for i in rows
            ],
        )
        db.execute("COMMIT")
    steps["apply results"] = cpu() - started

    db.close()
    shutil.rmtree(path.parent, ignore_errors=True)
    print(f"rows {n:,}  SQLite {sqlite3.sqlite_version}")
    for step, seconds in steps.items():
        print(f"{step:16} {seconds:7.2f} s CPU")
    print(f"{'total':16} {sum(steps.values()):7.2f} s CPU")


if __name__ == "__main__":
    main()

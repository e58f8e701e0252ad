"""Generate the benchmark dataset: N rows of ~600-character documents, as Parquet.

Deterministic (seeded): the same ``--rows`` always gives the same bytes, so runs compare.
Columns: ``doc_id`` (string, unique), ``title`` (string), ``body`` (~600 characters).
Written into ``bench/data/`` (git-ignored) unless ``--out`` says otherwise.

    .venv/bin/python bench/gen_data.py --rows 1000000
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

DATA_DIR = Path(__file__).resolve().parent / "data"
_TEXT = (
    "the quick brown fox jumps over a lazy dog while seven wise owls count stars above "
    "quiet hills and rivers carry old stories toward distant seas where ships wait for "
    "morning light product review battery screen delivery price quality support excellent "
    "terrible average returned broken perfect recommend again never always"
)
WORDS = _TEXT.split()
_CHUNK = 50_000


def default_path(rows: int) -> Path:
    """Where the dataset of ``rows`` rows lives by default."""
    return DATA_DIR / f"docs-{rows}.parquet"


def _corpus(rng: random.Random, chars: int) -> str:
    """A long random text; documents are windows into it (generating each is too slow)."""
    out: list[str] = []
    size = 0
    while size < chars:
        word = rng.choice(WORDS)
        out.append(word)
        size += len(word) + 1
    return " ".join(out)


def generate(rows: int, path: Path, body_chars: int = 600, seed: int = 0) -> Path:
    """Write ``rows`` rows to ``path`` (Parquet, zstd) and return the path."""
    rng = random.Random(seed)
    corpus = _corpus(rng, 4_000_000)
    limit = len(corpus) - body_chars
    schema = pa.schema([("doc_id", pa.string()), ("title", pa.string()), ("body", pa.string())])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        for start in range(0, rows, _CHUNK):
            n = min(_CHUNK, rows - start)
            ids = [f"doc-{i:08d}" for i in range(start, start + n)]
            offsets = [rng.randrange(limit) for _ in range(n)]
            bodies = [corpus[o : o + body_chars] for o in offsets]
            titles = [corpus[o : o + 24].strip() for o in offsets]
            table = pa.table({"doc_id": ids, "title": titles, "body": bodies}, schema=schema)
            writer.write_table(table, row_group_size=_CHUNK)
    tmp.replace(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    path = generate(args.rows, args.out or default_path(args.rows))
    print(path)


if __name__ == "__main__":
    main()

"""The floor: only the work any tool must do to push a Parquet file through Message Batches.

Read the Parquet, render each row's prompt and serialize the requests (orjson), POST each
100,000-request body to the API (the emulator), wait for it to end, stream the results JSONL
and parse it (orjson), join the answers back to their rows by custom_id and write Parquet
(zstd) with the same result columns batchpipe writes. No database, no validation pass, no
crash safety: what is left is the cost batchpipe is measured against (bench/bench_pipeline.py).

    ANTHROPIC_BASE_URL=http://127.0.0.1:8765 .venv/bin/python bench/floor.py IN.parquet OUT.parquet
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Iterator

import httpx2
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

HEADERS = {
    "x-api-key": "bench",
    "anthropic-version": "2023-06-01",
    "content-type": "application/json",
}
TOKEN = "f100f100f1"
RESULT_SCHEMA = [
    ("custom_id", pa.string()),
    ("result_status", pa.string()),
    ("response_text", pa.string()),
    ("stop_reason", pa.string()),
    ("input_tokens", pa.int64()),
    ("output_tokens", pa.int64()),
    ("error_type", pa.string()),
    ("error_message", pa.string()),
    ("attempts", pa.int64()),
    ("batch_id", pa.string()),
    ("model", pa.string()),
]


def input_batches(path: str, size: int) -> Iterator[pa.RecordBatch]:
    """The input in record batches of ``size`` rows (one create call each)."""
    parquet = pq.ParquetFile(path)
    yield from parquet.iter_batches(batch_size=size)


def request_body(batch: pa.RecordBatch, first_row: int, args: argparse.Namespace) -> bytes:
    """Render and serialize one create body: ``{"requests": [...]}``."""
    prefix = args.prompt_prefix
    requests = [
        {
            "custom_id": f"{TOKEN}-{first_row + i}-1",
            "params": {
                "model": args.model,
                "max_tokens": args.max_tokens,
                "messages": [{"role": "user", "content": prefix + body}],
            },
        }
        for i, body in enumerate(batch.column(args.column).to_pylist())
    ]
    return orjson.dumps({"requests": requests})


def send_and_wait(client: httpx2.Client, body: bytes) -> dict[str, object]:
    """Create the batch and poll until it has ended; the ended batch object."""
    created = client.post("/v1/messages/batches", content=body)
    created.raise_for_status()
    batch: dict[str, object] = orjson.loads(created.content)
    while batch["processing_status"] != "ended":
        time.sleep(0.05)
        got = client.get(f"/v1/messages/batches/{batch['id']}")
        got.raise_for_status()
        batch = orjson.loads(got.content)
    return batch


def result_columns(
    client: httpx2.Client, url: str, first_row: int, n: int, batch_id: str
) -> list[pa.Array]:
    """Stream and parse the results; place each by its custom_id's row; Arrow arrays."""
    cols: list[list[object]] = [[None] * n for _ in RESULT_SCHEMA]
    cid, status, text, stop, itok, otok, etype, emsg, att, bid, model = cols
    with client.stream("GET", url) as response:
        response.raise_for_status()
        pending = b""
        for chunk in response.iter_bytes():
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop()
            for line in lines:
                if not line:
                    continue
                obj = orjson.loads(line)
                custom_id = obj["custom_id"]
                i = int(custom_id.split("-")[1]) - first_row
                result = obj["result"]
                kind = result["type"]
                cid[i], status[i], att[i], bid[i] = custom_id, kind, 1, batch_id
                if kind == "succeeded":
                    message = result["message"]
                    text[i] = "".join(b["text"] for b in message["content"] if b["type"] == "text")
                    stop[i], model[i] = message["stop_reason"], message["model"]
                    usage = message["usage"]
                    itok[i], otok[i] = usage["input_tokens"], usage["output_tokens"]
                elif kind == "errored":
                    error = result["error"]["error"]
                    etype[i], emsg[i] = error["type"], error["message"]
        assert not pending.strip()
    types = [typ for _, typ in RESULT_SCHEMA]
    return [pa.array(values, type=typ) for values, typ in zip(cols, types, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("--column", default="body")
    parser.add_argument("--prompt-prefix", default="Summarize in one line: ")
    parser.add_argument("--model", default="claude-haiku-4-5")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--batch-requests", type=int, default=100_000)
    args = parser.parse_args()

    base_url = os.environ["ANTHROPIC_BASE_URL"]
    schema = pq.ParquetFile(args.input).schema_arrow
    for name, typ in RESULT_SCHEMA:
        schema = schema.append(pa.field(name, typ))
    first_row = 0
    with (
        httpx2.Client(base_url=base_url, headers=HEADERS, timeout=600) as client,
        pq.ParquetWriter(args.output, schema, compression="zstd") as writer,
    ):
        for batch in input_batches(args.input, args.batch_requests):
            body = request_body(batch, first_row, args)
            ended = send_and_wait(client, body)
            del body
            results = result_columns(
                client, str(ended["results_url"]), first_row, batch.num_rows, str(ended["id"])
            )
            joined = pa.RecordBatch.from_arrays([*batch.columns, *results], schema=schema)
            writer.write_batch(joined)
            first_row += batch.num_rows
    print(f"floor: {first_row} rows -> {args.output}")


if __name__ == "__main__":
    main()

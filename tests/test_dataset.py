"""Reading JSONL/Parquet inputs and writing the joined export (batchpipe.dataset)."""

from __future__ import annotations

import gc
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchpipe.dataset import Dataset, check_writable, write_joined
from batchpipe.errors import InputChangedError, InputError, OutputNotWritable, UsageError
from batchpipe.procs import host_tag

RESULT_COLUMNS = [
    ("custom_id", "string"),
    ("input_tokens", "int64"),
    ("score", "float64"),
    ("ok", "bool"),
]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return path


def results_for(n: int, chunk: int = 1000) -> Iterator[list[list[Any]]]:
    """Result columns for n rows, in chunks that do not line up with the reader's."""
    for start in range(0, n, chunk):
        rows = range(start, min(n, start + chunk))
        yield [
            [f"tok-{i}-1" for i in rows],
            [i * 10 for i in rows],
            [i / 2 for i in rows],
            [i % 2 == 0 for i in rows],
        ]


# ---------------------------------------------------------------- reading


def test_jsonl_rows_in_order_across_chunks(tmp_path: Path) -> None:
    rows = [{"id": i, "text": f"doc {i}"} for i in range(25_000)]
    data = Dataset(str(write_jsonl(tmp_path / "in.jsonl", rows)))
    chunks = list(data.iter_rows(batch_rows=4096))
    assert [len(c) for c in chunks] == [4096] * 6 + [424]
    assert [r for c in chunks for r in c] == rows
    assert data.count_rows() == 25_000
    assert data.columns() == ["id", "text"]


def test_parquet_rows_in_order_across_chunks(tmp_path: Path) -> None:
    path = tmp_path / "in.parquet"
    # Several row groups, so chunks also cross row-group boundaries.
    pq.write_table(
        pa.table({"id": range(25_000), "text": [f"doc {i}" for i in range(25_000)]}),
        path,
        row_group_size=7000,
    )
    data = Dataset(str(path))
    assert data.format == "parquet"
    got = [r for c in data.iter_rows(batch_rows=4096) for r in c]
    assert [r["id"] for r in got] == list(range(25_000))
    assert got[24_999] == {"id": 24_999, "text": "doc 24999"}
    assert data.count_rows() == 25_000
    assert data.columns() == ["id", "text"]


def test_parquet_reads_only_the_columns_asked_for(tmp_path: Path) -> None:
    path = tmp_path / "in.parquet"
    table = pa.table({"id": [1, 2, 3], "a": ["x", "y", "z"], "b": [True, False, None]})
    pq.write_table(table, path)
    data = Dataset(str(path))
    # Only existing columns, in file order; one the file lacks is simply absent from rows.
    rows = [r for c in data.iter_rows(columns={"b", "id", "nope"}) for r in c]
    assert rows == [{"id": 1, "b": True}, {"id": 2, "b": False}, {"id": 3, "b": None}]
    # No column to read still yields every row (the template may use none).
    assert [r for c in data.iter_rows(columns=set()) for r in c] == [
        {"id": 1, "a": "x", "b": True},
        {"id": 2, "a": "y", "b": False},
        {"id": 3, "a": "z", "b": None},
    ]


def test_parquet_chunks_hand_out_plain_columns(tmp_path: Path) -> None:
    """A chunk's columns as lists, where every value is plain text (or a whole number, for
    ids): the rows are the same as iter_rows gives, and anything else says None."""
    path = tmp_path / "in.parquet"
    table = pa.table(
        {
            "s": ["a", "é", ""],
            "big": pa.array(["x", "y", "z"], type=pa.large_string()),
            "n": [1, 2, 3],
            "gap": ["a", None, "c"],
            "f": [1.5, 2.0, 3.0],
            "b": [b"x", b"y", b"z"],
        }
    )
    pq.write_table(table, path)
    data = Dataset(str(path))
    (chunk,) = data.iter_chunks()
    assert len(chunk) == 3
    assert chunk.rows() == [r for c in data.iter_rows() for r in c]
    assert chunk.texts("s") == ["a", "é", ""]
    assert chunk.texts("big") == ["x", "y", "z"]
    assert chunk.ids("n") == [1, 2, 3]
    for name in ("n", "gap", "f", "b", "absent"):
        assert chunk.texts(name) is None, name
    for name in ("gap", "f", "b", "absent"):
        assert chunk.ids(name) is None, name
    jsonl = write_jsonl(tmp_path / "in.jsonl", [{"s": "a"}, {"s": "b"}])
    (rows,) = Dataset(str(jsonl)).iter_chunks()
    assert rows.rows() == [{"s": "a"}, {"s": "b"}]
    assert rows.texts("s") is None  # JSONL goes row by row: each row has its own types
    assert rows.ids("s") is None


def test_jsonl_blank_lines_skipped_and_columns_in_first_seen_order(tmp_path: Path) -> None:
    path = tmp_path / "in.ndjson"
    path.write_bytes(b'\xef\xbb\xbf{"b": 1}\n\n  \r\n{"a": 2, "b": 3}\r\n{"c": null}')
    data = Dataset(str(path))
    assert data.format == "jsonl"
    assert [r for c in data.iter_rows() for r in c] == [{"b": 1}, {"a": 2, "b": 3}, {"c": None}]
    assert data.columns() == ["b", "a", "c"]
    assert data.count_rows() == 3


def test_compressed_jsonl_is_read(tmp_path: Path) -> None:
    import gzip

    path = tmp_path / "in.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"a": 1}\n{"a": 2}\n'))
    assert [r for c in Dataset(str(path)).iter_rows() for r in c] == [{"a": 1}, {"a": 2}]


def test_fingerprint_changes_with_one_byte(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "hello"}] * 1000)
    first = Dataset(str(path)).fingerprint()
    assert first == Dataset(str(path)).fingerprint()
    assert first.startswith("sha256:")
    assert first.endswith(f":{path.stat().st_size}")
    raw = bytearray(path.read_bytes())
    raw[5000] = ord("j") if raw[5000] != ord("j") else ord("k")
    path.write_bytes(bytes(raw))
    assert Dataset(str(path)).fingerprint() != first


def test_fingerprint_like_an_older_one_uses_its_algorithm(tmp_path: Path) -> None:
    # Jobs ingested before sha256 recorded blake2b; they must still compare equal.
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "hello"}] * 10)
    data = path.read_bytes()
    recorded = f"blake2b:{hashlib.blake2b(data, digest_size=20).hexdigest()}:{len(data)}"
    assert Dataset(str(path)).fingerprint(like=recorded) == recorded
    now = Dataset(str(path)).fingerprint()
    assert now == f"sha256:{hashlib.sha256(data).hexdigest()}:{len(data)}"
    assert Dataset(str(path)).fingerprint(like=now) == now
    with pytest.raises(ValueError, match="unknown fingerprint algorithm 'sha3000'"):
        Dataset(str(path)).fingerprint(like="sha3000:00:1")


def test_unknown_extension_names_the_option(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("a,b\n")
    with pytest.raises(UsageError, match=r"in\.csv.*--input-format"):
        Dataset(str(path))
    assert Dataset(str(path), fmt="jsonl").format == "jsonl"


# ---------------------------------------------------------------- bad input


def read_all(path: Path) -> None:
    data = Dataset(str(path))
    for _ in data.iter_rows(batch_rows=2):
        pass


def test_malformed_json_names_file_and_line(tmp_path: Path) -> None:
    lines = [b'{"a": 1}'] * 6 + [b'{"a": 1,,}'] + [b'{"a": 1}']
    path = tmp_path / "messy.jsonl"
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(InputError, match=r"messy\.jsonl, line 7: invalid JSON: .* at column 9"):
        read_all(path)


def test_line_numbers_count_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "gaps.jsonl"
    path.write_bytes(b'{"a": 1}\n\n\n{"a": oops}\n')
    with pytest.raises(InputError, match=r"gaps\.jsonl, line 4:"):
        read_all(path)


def test_line_numbers_across_read_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tiny read blocks: lines straddle blocks and some lines are longer than a block.
    monkeypatch.setattr("batchpipe.jsonl.READ_BLOCK_BYTES", 7)
    rows = [{"i": i, "pad": "x" * (i % 13)} for i in range(300)]
    path = write_jsonl(tmp_path / "blocks.jsonl", rows)
    assert [r for c in Dataset(str(path)).iter_rows(batch_rows=64) for r in c] == rows
    path.write_bytes(path.read_bytes() + b"\n" + b'{"i": nope}')
    with pytest.raises(InputError, match=r"blocks\.jsonl, line 302: invalid JSON"):
        read_all(path)


def test_non_utf8_names_byte_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"a": "ok"}\n{"a": "caf\xe9"}\n')
    with pytest.raises(
        InputError, match=r"latin1\.jsonl, line 2: not valid UTF-8 \(byte 0xe9 at column 11\)"
    ):
        read_all(path)


def test_line_that_is_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "list.jsonl"
    path.write_bytes(b'{"a": 1}\n[1, 2]\n')
    with pytest.raises(InputError, match=r"list\.jsonl, line 2: expected a JSON object.*array"):
        read_all(path)


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_jsonl_without_rows(tmp_path: Path, content: bytes) -> None:
    """Nothing to read is not an error here: a job of it has nothing to send."""
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    assert list(Dataset(str(path)).iter_rows()) == []
    assert Dataset(str(path)).count_rows() == 0
    assert Dataset(str(path)).columns() == []


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"cannot read .*nope\.jsonl: no such file"):
        Dataset(str(tmp_path / "nope.jsonl"))


def test_directory(tmp_path: Path) -> None:
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(InputError, match=r"cannot read .*dir\.jsonl: it is a directory"):
        Dataset(str(tmp_path / "dir.jsonl"))


def _error_of(call: Callable[[], object], error: type[Exception]) -> str:
    """The message of the ``error`` that ``call()`` raises, or "no error"."""
    try:
        call()
    except error as exc:
        return str(exc)
    return "no error"


def _open_error(path: Path) -> str:
    """The InputError message of opening ``path``, or what happened instead."""
    return _error_of(lambda: Dataset(str(path)), InputError)


_NO_DROP = "cannot drop to nobody: "


def _as_nobody(probe: Callable[[], str]) -> str:
    """``probe()`` in a forked child that dropped root for the nobody user.

    Root reads any file, and CI runs as root; the child keeps the loaded interpreter, so it
    needs no access to the virtualenv. It is given 60 s, then killed. A child that cannot
    change user (a user namespace without uid 65534) says so with ``_NO_DROP``.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: whatever happens, it leaves through os._exit
        try:
            os.close(read_end)
            try:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            except OSError as exc:
                message = f"{_NO_DROP}{exc}"
            else:
                try:
                    message = probe()
                except BaseException as exc:  # reported to the parent as text
                    message = f"child failed: {exc!r}"
            os.write(write_end, message.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    deadline = time.monotonic() + 60
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            return "child timed out"
        time.sleep(0.01)
    with os.fdopen(read_end, "rb") as pipe:
        return pipe.read().decode()


def test_unreadable_file(tmp_path: Path) -> None:
    # A directory anyone may enter (pytest's tmp_path is private to its user).
    shared = Path(tempfile.mkdtemp(prefix="batchpipe-perm-"))
    try:
        shared.chmod(0o755)
        path = write_jsonl(shared / "secret.jsonl", [{"a": 1}])
        path.chmod(0)
        message = _as_nobody(lambda: _open_error(path)) if os.geteuid() == 0 else _open_error(path)
    finally:
        shutil.rmtree(shared, ignore_errors=True)
    if message.startswith(_NO_DROP):
        pytest.skip(message)
    assert re.search(r"cannot read .*secret\.jsonl: .*[Pp]ermission denied", message), message


def test_corrupt_parquet(tmp_path: Path) -> None:
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 this is not really parquet at all")
    with pytest.raises(InputError, match=r"broken\.parquet as Parquet"):
        read_all(path)


def test_a_zero_byte_parquet_file_is_not_parquet(tmp_path: Path) -> None:
    path = tmp_path / "empty.parquet"
    path.write_bytes(b"")
    with pytest.raises(InputError, match=r"empty\.parquet as Parquet"):
        read_all(path)


def test_a_parquet_file_without_rows_has_its_columns_and_no_rows(tmp_path: Path) -> None:
    path = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"a": pa.array([], pa.int64())}), path)
    data = Dataset(str(path))
    assert data.columns() == ["a"]
    assert data.count_rows() == 0
    assert list(data.iter_rows()) == []


# ---------------------------------------------------------------- the joined export


def test_joined_parquet_from_jsonl_keeps_rows_order_and_types(tmp_path: Path) -> None:
    n = 10_000
    rows = [
        {"id": i, "text": f"doc {i}", "price": 1.5, "tags": ["a", "b"], "meta": {"k": i}}
        for i in range(n)
    ]
    rows[5000]["price"] = 2  # an int among floats: the column is promoted to double
    data = Dataset(str(write_jsonl(tmp_path / "in.jsonl", rows)))
    dest = tmp_path / "out.parquet"
    assert write_joined(data, results_for(n, chunk=777), RESULT_COLUMNS, str(dest)) == n
    table = pq.read_table(dest)
    assert table.column_names == [
        "id",
        "text",
        "price",
        "tags",
        "meta",
        *[c for c, _ in RESULT_COLUMNS],
    ]
    types = dict(zip(table.column_names, table.schema.types, strict=True))
    assert types["id"] == pa.int64()
    assert types["price"] == pa.float64()
    assert types["tags"] == pa.list_(pa.string())
    assert types["meta"] == pa.struct([("k", pa.int64())])
    assert (types["custom_id"], types["input_tokens"]) == (pa.string(), pa.int64())
    assert (types["score"], types["ok"]) == (pa.float64(), pa.bool_())
    got = table.to_pylist()
    assert [r["id"] for r in got] == list(range(n))
    assert got[5000]["price"] == 2.0
    assert got[1234] == {
        **rows[1234],
        "custom_id": "tok-1234-1",
        "input_tokens": 12340,
        "score": 617.0,
        "ok": True,
    }


def test_joined_parquet_from_parquet_keeps_original_types(tmp_path: Path) -> None:
    src = tmp_path / "in.parquet"
    n = 9000
    pq.write_table(
        pa.table(
            {
                "id": pa.array(range(n), pa.int32()),
                "day": pa.array([19_000 + i % 30 for i in range(n)], pa.int32()).cast(pa.date32()),
                "text": [f"doc {i}" for i in range(n)],
            }
        ),
        src,
        row_group_size=4000,
    )
    dest = tmp_path / "out.parquet"
    assert write_joined(Dataset(str(src)), results_for(n, 5000), RESULT_COLUMNS, str(dest)) == n
    table = pq.read_table(dest)
    assert table.schema.field("id").type == pa.int32()
    assert table.schema.field("day").type == pa.date32()
    assert table.column("id").to_pylist() == list(range(n))
    assert table.column("custom_id").to_pylist() == [f"tok-{i}-1" for i in range(n)]


def test_column_with_mixed_values_becomes_json_text(tmp_path: Path) -> None:
    rows = [{"v": "plain"}, {"v": {"nested": [1, 2]}}, {"v": None}, {"v": 3}]
    data = Dataset(str(write_jsonl(tmp_path / "in.jsonl", rows)))
    dest = tmp_path / "out.parquet"
    write_joined(data, results_for(4), RESULT_COLUMNS, str(dest))
    table = pq.read_table(dest)
    assert table.schema.field("v").type == pa.string()
    # Every non-null cell is JSON text, so each parses back to the original value.
    cells = table.column("v").to_pylist()
    assert [orjson.loads(c) if c is not None else None for c in cells] == [r["v"] for r in rows]


def test_joined_jsonl_has_one_line_per_row_and_no_blank_lines(tmp_path: Path) -> None:
    n = 9000
    rows = [{"id": i, "text": f"line\nbreak {i}"} for i in range(n)]
    data = Dataset(str(write_jsonl(tmp_path / "in.jsonl", rows)))
    dest = tmp_path / "out.jsonl"
    assert write_joined(data, results_for(n, chunk=4000), RESULT_COLUMNS, str(dest)) == n
    raw = dest.read_bytes()
    assert raw.endswith(b"\n")
    assert b"\n\n" not in raw
    lines = raw.split(b"\n")[:-1]
    assert len(lines) == n
    assert orjson.loads(lines[42]) == {
        "id": 42,
        "text": "line\nbreak 42",
        "custom_id": "tok-42-1",
        "input_tokens": 420,
        "score": 21.0,
        "ok": True,
    }


def test_joined_jsonl_from_parquet(tmp_path: Path) -> None:
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": [1, 2], "blob": [b"\x00\x01", None]}), src)
    dest = tmp_path / "out.jsonl"
    write_joined(Dataset(str(src)), results_for(2), RESULT_COLUMNS, str(dest))
    lines = [orjson.loads(x) for x in dest.read_bytes().splitlines()]
    assert [(x["id"], x["blob"], x["custom_id"]) for x in lines] == [
        (1, "AAE=", "tok-0-1"),
        (2, None, "tok-1-1"),
    ]


def test_failing_results_leave_nothing_behind(tmp_path: Path) -> None:
    data = Dataset(str(write_jsonl(tmp_path / "in.jsonl", [{"a": i} for i in range(20_000)])))
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    def results() -> Iterator[list[list[Any]]]:
        yield from results_for(10_000)
        raise RuntimeError("database went away")

    for name in ("out.parquet", "out.jsonl"):
        with pytest.raises(RuntimeError, match="database went away"):
            write_joined(data, results(), RESULT_COLUMNS, str(out_dir / name))
    assert list(out_dir.iterdir()) == []


# A child that starts the export, then hangs in its results: a kill -9 there leaves the
# half-written temporary file behind, as a killed `batchpipe export` does.
_STUCK_EXPORT = """
import sys, time
from batchpipe.dataset import Dataset, write_joined
def results():
    for start in range(0, 20_000, 1000):
        rows = range(start, start + 1000)
        yield [[f"tok-{i}-1" for i in rows], list(rows), [i / 2 for i in rows], [True] * 1000]
        if start >= 12_000:
            time.sleep(600)
cols = [("custom_id", "string"), ("input_tokens", "int64"), ("score", "float64"), ("ok", "bool")]
write_joined(Dataset(sys.argv[1]), results(), cols, sys.argv[2])
"""


def test_an_export_killed_midway_leaves_no_temporary_file_for_good(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [{"a": i} for i in range(20_000)])
    out = tmp_path / "out" / "labels.parquet"
    child = subprocess.Popen([sys.executable, "-c", _STUCK_EXPORT, str(src), str(out)])
    try:
        deadline = time.monotonic() + 60
        while not list(out.parent.glob(".labels.parquet.*.tmp")):
            assert child.poll() is None, "the export ended before it was killed"
            assert time.monotonic() < deadline, "no temporary file appeared"
            time.sleep(0.05)
    finally:
        child.kill()
        child.wait()
    [left] = out.parent.glob(".labels.parquet.*.tmp")
    # Files the sweep must keep: a live writer's here (this process) and another host's.
    host = host_tag()
    live = out.parent / f".labels.parquet.{host}.{os.getpid()}.0a1b2c3d.tmp"
    elsewhere = out.parent / f".labels.parquet.other-host.{child.pid}.0a1b2c3d.tmp"
    # From before temporaries named their writer: only a day-old one is known to be dead.
    old, young = (out.parent / f".labels.parquet.{tag}.tmp" for tag in ("0000aaaa", "1111bbbb"))
    for path in (live, elsewhere, old, young):
        path.write_bytes(b"partial")
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(old, (two_days_ago, two_days_ago))

    assert write_joined(Dataset(str(src)), results_for(20_000), RESULT_COLUMNS, str(out)) == 20_000

    assert pq.read_table(out).num_rows == 20_000
    assert not left.exists()
    assert not old.exists()
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(
        p.name for p in (out, live, elsewhere, young)
    )


def test_existing_output_survives_a_failed_export(tmp_path: Path) -> None:
    data = Dataset(str(write_jsonl(tmp_path / "in.jsonl", [{"a": 1}, {"a": 2}])))
    dest = tmp_path / "out.jsonl"
    dest.write_bytes(b"previous export\n")
    with pytest.raises(InputChangedError):
        write_joined(data, results_for(1), RESULT_COLUMNS, str(dest))
    assert dest.read_bytes() == b"previous export\n"


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
@pytest.mark.parametrize("results", [4999, 5001, 0])
def test_row_count_mismatch_is_refused(tmp_path: Path, fmt: str, results: int) -> None:
    rows = [{"a": i} for i in range(5000)]
    if fmt == "jsonl":
        src = write_jsonl(tmp_path / "in.jsonl", rows)
    else:
        src = tmp_path / "in.parquet"
        pq.write_table(pa.Table.from_pylist(rows), src)
    dest = tmp_path / "out.parquet"
    with pytest.raises(InputChangedError, match=r"in\.(jsonl|parquet) has .*rows"):
        write_joined(Dataset(str(src)), results_for(results), RESULT_COLUMNS, str(dest))
    assert sorted(p.name for p in tmp_path.iterdir()) == [src.name]


@pytest.mark.parametrize("dest", ["out.parquet", "out.jsonl"])
def test_input_column_named_like_a_result_column(tmp_path: Path, dest: str) -> None:
    rows = [{"a": 1}, {"a": 2, "custom_id": "mine"}]
    data = Dataset(str(write_jsonl(tmp_path / "in.jsonl", rows)))
    with pytest.raises(InputError, match=r"in\.jsonl already has column\(s\) 'custom_id'.*rename"):
        write_joined(data, results_for(2), RESULT_COLUMNS, str(tmp_path / dest))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_output_folder_that_cannot_exist(tmp_path: Path) -> None:
    data = Dataset(str(write_jsonl(tmp_path / "in.jsonl", [{"a": 1}])))
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(UsageError, match=r"cannot write .*a-file"):
        write_joined(data, results_for(1), RESULT_COLUMNS, str(tmp_path / "a-file" / "o.jsonl"))


def test_check_writable_refuses_what_the_export_could_not_write(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "a-folder.parquet").mkdir()  # as Spark writes a dataset
    with pytest.raises(OutputNotWritable, match=r"cannot write .*a-file/o\.parquet"):
        check_writable(str(tmp_path / "a-file" / "o.parquet"))
    with pytest.raises(OutputNotWritable, match=r"a-folder\.parquet is a folder; name a file"):
        check_writable(str(tmp_path / "a-folder.parquet"))
    with pytest.raises(OutputNotWritable, match=r"o\.csv as from its extension; end it in one"):
        check_writable(str(tmp_path / "o.csv"))
    with pytest.raises(OutputNotWritable, match=r"cannot write nosuch://x"):
        check_writable("nosuch://x/o.parquet")
    with pytest.raises(OutputNotWritable, match=r"out/ is a folder|out/: it names a folder"):
        check_writable(str(tmp_path / "out") + "/")
    src = write_jsonl(tmp_path / "in.jsonl", [{"a": 1}])
    (tmp_path / "link.jsonl").symlink_to(src)
    for same in (src, tmp_path / "link.jsonl", tmp_path / "a-folder.parquet" / ".." / "in.jsonl"):
        with pytest.raises(OutputNotWritable, match=r"it is the job's input"):
            check_writable(str(same), source=str(src))
    (tmp_path / "link.jsonl").unlink()
    src.unlink()
    # A writable path: its folder is made as the export would, and no probe is left behind.
    check_writable(str(tmp_path / "new" / "o.parquet"))
    assert list((tmp_path / "new").iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "a-folder.parquet", "new"]


def _write_error(dest: Path) -> str:
    """The OutputNotWritable message of checking ``dest``, or what happened instead."""
    return _error_of(lambda: check_writable(str(dest)), OutputNotWritable)


def test_a_folder_without_write_permission_is_refused_before_the_export(tmp_path: Path) -> None:
    # A read-only folder anyone may enter; root writes anywhere, so the check runs as nobody.
    shared = Path(tempfile.mkdtemp(prefix="batchpipe-perm-"))
    try:
        (shared / "ro").mkdir()
        shared.chmod(0o755)
        (shared / "ro").chmod(0o555)
        dest = shared / "ro" / "out.parquet"
        message = (
            _as_nobody(lambda: _write_error(dest)) if os.geteuid() == 0 else _write_error(dest)
        )
        left = sorted(p.name for p in (shared / "ro").iterdir())
    finally:
        shutil.rmtree(shared, ignore_errors=True)
    if message.startswith(_NO_DROP):
        pytest.skip(message)
    assert re.search(r"cannot write .*ro/out\.parquet: .*[Pp]ermission denied", message), message
    assert left == []


def test_a_write_that_fails_late_is_an_output_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = Dataset(str(write_jsonl(tmp_path / "in.jsonl", [{"a": 1}])))

    def disk_full(*_args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(OutputNotWritable, match=r"cannot write .*o\.parquet: .*No space left"):
        write_joined(data, results_for(1), RESULT_COLUMNS, str(tmp_path / "o.parquet"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # no temporary left


# ---------------------------------------------------------------- memory


def _peak_while(fn: Any) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _generate(path: Path, n: int) -> Path:
    doc = "lorem ipsum dolor sit amet " * 22  # ~600 characters
    with path.open("wb") as f:
        for start in range(0, n, 10_000):
            f.write(
                b"".join(
                    orjson.dumps({"id": i, "doc": doc, "n": i * 0.5}) + b"\n"
                    for i in range(start, min(n, start + 10_000))
                )
            )
    return path


@pytest.mark.slow
def test_memory_does_not_grow_with_the_dataset(tmp_path: Path) -> None:
    small = _generate(tmp_path / "small.jsonl", 50_000)
    big = _generate(tmp_path / "big.jsonl", 200_000)

    def read(path: Path) -> None:
        count = 0
        for rows in Dataset(str(path)).iter_rows(batch_rows=4096):
            count += len(rows)
        assert count > 0

    def export(path: Path, n: int) -> None:
        out = path.with_suffix(".out.jsonl")
        write_joined(Dataset(str(path)), results_for(n, 3000), RESULT_COLUMNS, str(out))

    assert _peak_while(lambda: read(big)) < 1.5 * _peak_while(lambda: read(small))
    # The export at a quarter of the size (tracemalloc makes it slow); still a 4x ratio.
    small_out = _generate(tmp_path / "small_out.jsonl", 12_500)
    big_out = _generate(tmp_path / "big_out.jsonl", 50_000)
    assert _peak_while(lambda: export(big_out, 50_000)) < 1.5 * _peak_while(
        lambda: export(small_out, 12_500)
    )


def test_write_joined_creates_the_output_folder(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text('{"a": 1}\n{"a": 2}\n')
    dest = tmp_path / "new" / "deeper" / "out.parquet"
    rows = write_joined(Dataset(str(src)), [[["x", "y"]]], [("answer", "string")], str(dest))
    assert rows == 2
    assert pq.read_table(dest).column("answer").to_pylist() == ["x", "y"]


# Result columns with nulls and a list column, for the chunk layout tests below.
_MIXED_COLUMNS = [
    ("custom_id", "string"),
    ("score", "float64"),
    ("ok", "bool"),
    ("tags", "list<string>"),
]


def _mixed_results(n: int) -> list[list[Any]]:
    return [
        [None if i % 7 == 0 else f"tok-{i}-1" for i in range(n)],
        [None if i % 5 == 0 else i / 4 for i in range(n)],
        [None if i % 3 == 0 else i % 2 == 0 for i in range(n)],
        [None if i % 11 == 0 else [f"t{i}"] * (i % 3) for i in range(n)],
    ]


def _rechunked(columns: list[list[Any]], sizes: list[int]) -> Iterator[list[Any]]:
    """``columns`` cut into chunks of ``sizes`` rows (then the rest), columns as tuples."""
    start = 0
    for size in [*sizes, len(columns[0])]:
        end = min(start + size, len(columns[0]))
        yield [tuple(column[start:end]) for column in columns]
        start = end


@pytest.mark.parametrize("src_fmt", ["parquet", "jsonl"])
@pytest.mark.parametrize("out_fmt", ["parquet", "jsonl"])
def test_the_output_is_the_same_however_the_results_are_chunked(
    tmp_path: Path, src_fmt: str, out_fmt: str
) -> None:
    """One chunk per read, one chunk in all, or odd sizes with empty chunks between: the
    results handed over whole, sliced, or joined from several chunks give the same file."""
    n = 20_000
    rows = [{"a": i} for i in range(n)]
    src = tmp_path / f"in.{src_fmt}"
    if src_fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), src, row_group_size=3000)
    else:
        write_jsonl(src, rows)
    columns = _mixed_results(n)
    layouts = {
        "whole": [columns],
        "aligned": list(_rechunked(columns, [8192, 0, 8192])),
        "odd": list(_rechunked(columns, [1, 0, 777, 4096, 0, 3, 9000, 1])),
        "rows": list(_rechunked(columns, [1] * 50 + [5000] * 3)),
    }
    outputs = {}
    for name, chunks in layouts.items():
        dest = tmp_path / f"{name}.{out_fmt}"
        assert write_joined(Dataset(str(src)), chunks, _MIXED_COLUMNS, str(dest)) == n
        if out_fmt == "parquet":
            outputs[name] = pq.read_table(dest)
        else:
            outputs[name] = [orjson.loads(line) for line in dest.read_bytes().splitlines()]
    names = ["a", *(name for name, _ in _MIXED_COLUMNS)]
    expected = [dict(zip(names, r, strict=True)) for r in zip(range(n), *columns, strict=True)]
    for layout, got in outputs.items():
        if out_fmt == "parquet":
            assert got.equals(outputs["whole"]), layout
        assert (got.to_pylist() if out_fmt == "parquet" else got) == expected, layout


@pytest.mark.parametrize("out_fmt", ["parquet", "jsonl"])
@pytest.mark.parametrize(
    ("chunks", "message"),
    [
        ([[["x", "y"]]], r"result chunks have 1 columns, expected 4"),
        ([[["x", "y"], [1.0, 2.0], [True], [[], []]]], r"columns of a result chunk differ"),
    ],
)
def test_misshapen_result_chunks_are_refused(
    tmp_path: Path, out_fmt: str, chunks: list[list[Any]], message: str
) -> None:
    data = Dataset(str(write_jsonl(tmp_path / "in.jsonl", [{"a": 1}, {"a": 2}])))
    with pytest.raises(ValueError, match=message):
        write_joined(data, chunks, _MIXED_COLUMNS, str(tmp_path / f"o.{out_fmt}"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_a_result_value_of_the_wrong_type_names_its_column(tmp_path: Path) -> None:
    data = Dataset(str(write_jsonl(tmp_path / "in.jsonl", [{"a": 1}, {"a": 2}])))
    chunks = [[["x", "y"], [1.0, "not a number"], [True, None], [[], None]]]
    with pytest.raises(ValueError, match=r"result column 'score' is typed double"):
        write_joined(data, chunks, _MIXED_COLUMNS, str(tmp_path / "o.parquet"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]

"""BatchClient against the emulator, through the real anthropic SDK (in-process and loopback)."""

from __future__ import annotations

import contextlib
import socket
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, timedelta
from typing import Any

import anthropic
import httpx2
import orjson
import pytest
from pydantic import SecretStr
from structlog.testing import capture_logs

from batchpipe import errors
from batchpipe.client import BatchClient
from batchpipe.client.lines import load_line, record_from, split_blocks
from batchpipe.config import Settings
from batchpipe.emulator import IN_PROCESS_BASE_URL, Emulator, EmulatorConfig, EmulatorServer
from batchpipe.emulator.responder import expected_text
from batchpipe.models import ResultRecord, ResultType

KEY = "sk-ant-api03-client-test-key-DO-NOT-LEAK-0123456789"
MODEL = "claude-sonnet-4-5"


def parse_line(line: bytes, *, keep_content: bool) -> ResultRecord | None:
    """One results line as the client reads it (load_line, then record_from)."""
    obj = load_line(line)
    return None if obj is None else record_from(obj, keep_content=keep_content)


def _settings(**overrides: Any) -> Settings:
    return Settings(api_key=SecretStr(KEY), max_retries=2, **overrides)


def _params(i: int, **extra: Any) -> dict[str, Any]:
    prompt = f"Summarise item {i}: the quick brown fox jumps over the lazy dog number {i}."
    return {
        "model": MODEL,
        "max_tokens": 256,
        "messages": [{"role": "user", "content": prompt}],
        **extra,
    }


def _body(n: int, prefix: str = "job") -> tuple[bytes, dict[str, dict[str, Any]]]:
    params = {f"{prefix}-{i}": _params(i) for i in range(n)}
    requests = [{"custom_id": cid, "params": p} for cid, p in params.items()]
    return orjson.dumps({"requests": requests}), params


def _assert_no_key(*texts: object) -> None:
    for text in texts:
        assert KEY not in str(text)
        assert KEY[-20:] not in str(text)


@pytest.fixture
def emu() -> Emulator:
    return Emulator(EmulatorConfig(seed=7, processing_seconds=60.0, cancel_seconds=1.0))


@pytest.fixture
def client(emu: Emulator) -> Iterator[BatchClient]:
    with BatchClient(
        _settings(), http_client=emu.http_client(), base_url=IN_PROCESS_BASE_URL
    ) as bc:
        bc.not_found_delay = 0.0
        yield bc


def _wait_ended(client: BatchClient, emu: Emulator, batch_id: str) -> None:
    for _ in range(30):
        info = client.retrieve(batch_id)
        if info.processing_status == "ended":
            return
        emu.advance(10)
    raise AssertionError(f"batch {batch_id} never ended")


# ---------------------------------------------------------------------- the happy path


def test_create_retrieve_results_roundtrip(client: BatchClient, emu: Emulator) -> None:
    body, params = _body(5)
    with capture_logs() as logs:
        created = client.create(body, count=5)
    assert created.id.startswith("msgbatch_")
    assert created.processing_status == "in_progress"
    assert created.request_counts.processing == 5
    assert created.results_url is None
    assert created.expires_at - created.created_at == timedelta(hours=24)
    (line,) = logs
    assert line["event"] == "api.create"
    assert line["batch_id"] == created.id
    assert line["count"] == 5
    assert line["request_id"].startswith("req_")
    assert isinstance(line["latency_ms"], int)

    _wait_ended(client, emu, created.id)
    ended = client.retrieve(created.id)
    assert ended.request_counts.succeeded == 5
    assert ended.ended_at is not None
    assert ended.results_url is not None

    records = {r.custom_id: r for r in client.results(created.id)}
    assert records.keys() == params.keys()
    for cid, record in records.items():
        assert record.result_type is ResultType.SUCCEEDED
        assert record.response_text == expected_text(params[cid])
        assert record.stop_reason == "end_turn"
        assert record.model == MODEL
        assert record.input_tokens is not None
        assert record.input_tokens > 0
        assert record.output_tokens is not None
        assert record.output_tokens > 0
        assert record.content is None  # only kept on request


def test_results_match_the_sdks_own_decoder(emu: Emulator) -> None:
    """Every result type, errored types and usage agree with anthropic's own results()."""
    emu.configure(errored_rate=0.2, expired_rate=0.15, invalid_rate=0.1, processing_seconds=100.0)
    sdk = anthropic.Anthropic(
        api_key=KEY, base_url=IN_PROCESS_BASE_URL, http_client=emu.http_client()
    )
    client = BatchClient(_settings(), http_client=emu.http_client(), base_url=IN_PROCESS_BASE_URL)
    body, _ = _body(60)
    batch = client.create(body, count=60)
    emu.advance(60)  # about half the requests have finished ...
    canceling = client.cancel(batch.id)  # ... the rest come back canceled
    assert canceling.processing_status == "canceling"
    assert canceling.cancel_initiated_at is not None
    _wait_ended(client, emu, batch.id)

    ours = {r.custom_id: r for r in client.results(batch.id)}
    theirs = {line.custom_id: line.result for line in sdk.messages.batches.results(batch.id)}
    assert ours.keys() == theirs.keys()
    assert {r.result_type for r in ours.values()} == set(ResultType)
    for cid, result in theirs.items():
        record = ours[cid]
        assert record.result_type == result.type
        if result.type == "succeeded":
            message = result.message
            assert record.response_text == "".join(
                b.text for b in message.content if b.type == "text"
            )
            assert record.input_tokens == message.usage.input_tokens
            assert record.output_tokens == message.usage.output_tokens
            assert record.cache_read_input_tokens == message.usage.cache_read_input_tokens
            assert record.cache_creation_input_tokens == (message.usage.cache_creation_input_tokens)
            assert record.stop_reason == message.stop_reason
        elif result.type == "errored":
            assert record.error_type == result.error.error.type
            assert record.error_message == result.error.error.message
            assert record.response_text is None
        else:
            assert (record.response_text, record.error_type, record.input_tokens) == (
                None,
                None,
                None,
            )
    counts = client.retrieve(batch.id).request_counts
    assert counts.total == 60
    assert counts.canceled == sum(r.result_type is ResultType.CANCELED for r in ours.values())
    assert counts.errored == sum(r.result_type is ResultType.ERRORED for r in ours.values())
    error_types = {r.error_type for r in ours.values() if r.error_type}
    assert "invalid_request_error" in error_types
    assert error_types & {"overloaded_error", "api_error"}
    client.close()
    sdk.close()


def test_keep_content_keeps_tool_use_blocks(client: BatchClient, emu: Emulator) -> None:
    tool = {
        "name": "record",
        "description": "Record a label",
        "input_schema": {
            "type": "object",
            "properties": {"label": {"type": "string"}},
            "required": ["label"],
        },
    }
    params = _params(1, tools=[tool], tool_choice={"type": "tool", "name": "record"})
    body = orjson.dumps({"requests": [{"custom_id": "t-1", "params": params}]})
    batch = client.create(body, count=1)
    _wait_ended(client, emu, batch.id)
    (plain,) = client.results(batch.id)
    assert plain.content is None
    assert plain.response_text is None  # no text block at all
    assert plain.stop_reason == "tool_use"
    (kept,) = client.results(batch.id, keep_content=True)
    assert kept.content is not None
    (block,) = kept.content
    assert block["type"] == "tool_use"
    assert block["name"] == "record"
    assert isinstance(block["input"]["label"], str)


def test_text_blocks_are_joined_and_other_blocks_skipped() -> None:
    line = orjson.dumps(
        {
            "custom_id": "x-1",
            "result": {
                "type": "succeeded",
                "message": {
                    "model": MODEL,
                    "content": [
                        {"type": "thinking", "thinking": "hidden", "signature": "s"},
                        {"type": "text", "text": "Hello, "},
                        {"type": "tool_use", "id": "toolu_1", "name": "n", "input": {}},
                        {"type": "text", "text": "world."},
                    ],
                    "stop_reason": "end_turn",
                    "usage": {
                        "input_tokens": 11,
                        "output_tokens": 36,
                        "cache_creation_input_tokens": 5,
                        "cache_read_input_tokens": 7,
                    },
                },
            },
        }
    )
    record = parse_line(line, keep_content=False)
    assert record is not None
    assert record.response_text == "Hello, world."
    assert (record.input_tokens, record.output_tokens) == (11, 36)
    assert (record.cache_creation_input_tokens, record.cache_read_input_tokens) == (5, 7)
    assert parse_line(b'{"custom_id":"x","result":{"type":"mystery"}}', keep_content=False) is None
    assert parse_line(b'{"custom_id":"x","res', keep_content=False) is None
    # One block, the usual answer: its text, or None when it is not a text block.
    for block, text in [
        ({"type": "text", "text": "Only."}, "Only."),
        ({"type": "text", "text": ""}, ""),
        ({"type": "tool_use", "id": "toolu_1", "name": "n", "input": {}}, None),
    ]:
        one = {"custom_id": "x-1", "result": {"type": "succeeded", "message": {"content": [block]}}}
        record = parse_line(orjson.dumps(one), keep_content=False)
        assert record is not None
        assert record.response_text == text


def test_results_lines_split_across_network_chunks() -> None:
    # Lines cut anywhere by the network (even inside "\r\n"), blank lines, a long line
    # spanning several chunks, and a last line without its newline.
    long = b"x" * 50
    data = b"first\r\n\n  \n" + long + b"\nsecond\r\nlast"
    for size in (1, 2, 3, 7, 64, len(data)):
        chunks = iter([data[i : i + size] for i in range(0, len(data), size)])
        blocks = list(split_blocks(chunks, "results", None))
        assert all(lines for lines, _ in blocks)  # no empty blocks
        assert [complete for lines, complete in blocks if not complete] == [False]
        assert [(line, complete) for lines, complete in blocks for line in lines] == [
            (b"first", True),
            (long, True),
            (b"second", True),
            (b"last", False),
        ], size


def test_list_pages_newest_first_and_stops_at_created_after(
    client: BatchClient, emu: Emulator
) -> None:
    ids = []
    for i in range(7):
        ids.append(client.create(_body(1, prefix=f"b{i}")[0], count=1).id)
        emu.advance(60)
    cutoff = client.retrieve(ids[2]).created_at
    with capture_logs() as logs:
        listed = [b.id for b in client.list_batches(created_after=cutoff, page_size=2)]
    assert listed == list(reversed(ids[2:]))  # newest first, b2 (== cutoff) included
    pages = [entry for entry in logs if entry["event"] == "api.list"]
    assert len(pages) == 3  # [b6 b5] [b4 b3] [b2 b1]: stops inside the third page
    everything = [b.id for b in client.list_batches(page_size=3)]
    assert everything == list(reversed(ids))
    naive = cutoff.astimezone(UTC).replace(tzinfo=None)  # naive datetimes mean UTC
    assert [b.id for b in client.list_batches(created_after=naive)] == listed


def test_api_now_follows_the_date_of_the_apis_answers(client: BatchClient, emu: Emulator) -> None:
    assert client.api_now() is None  # nothing has answered yet
    created = client.create(_body(1)[0], count=1)
    emu.advance(6 * 3600)  # the API's clock, six hours ahead of this host's
    client.retrieve(created.id)
    seen = client.api_now()
    assert seen is not None
    assert abs(seen.timestamp() - emu.now()) < 2
    time.sleep(0.2)  # and it keeps running between answers
    later = client.api_now()
    assert later is not None
    assert later - seen >= timedelta(seconds=0.2)
    emu.advance(3600)
    assert list(client.list_batches())  # a list's first page is dated too
    listed = client.api_now()
    assert listed is not None
    assert abs(listed.timestamp() - emu.now()) < 2


def test_count_tokens_drops_keys_the_endpoint_rejects(client: BatchClient) -> None:
    params = _params(3, temperature=0.2, system="Be brief.", metadata={"user_id": "u1"})
    tokens = client.count_tokens(params)
    assert tokens > 0
    assert tokens > client.count_tokens(_params(3))  # the system prompt counts


# ---------------------------------------------------------------------- errors


def test_missing_key_is_authentication_failed(emu: Emulator) -> None:
    with pytest.raises(errors.AuthenticationFailed, match="ANTHROPIC_API_KEY is not set"):
        BatchClient(Settings(), http_client=emu.http_client(), base_url=IN_PROCESS_BASE_URL)
    assert errors.AuthenticationFailed.exit_code == errors.EXIT_USAGE


@pytest.mark.parametrize("status", [401, 403])
def test_rejected_key_is_authentication_failed(
    client: BatchClient, emu: Emulator, status: int
) -> None:
    emu.configure(fail_next=[status])
    with pytest.raises(errors.AuthenticationFailed) as info:
        client.create(_body(1)[0], count=1)
    assert f"create batch failed: {status} " in str(info.value)
    assert info.value.request_id is not None
    assert info.value.request_id.startswith("req_")


def test_bad_request_is_api_error_with_request_id(client: BatchClient) -> None:
    body = orjson.dumps({"requests": [{"custom_id": "bad id!", "params": _params(1)}]})
    with pytest.raises(errors.APIError) as info:
        client.create(body, count=1)
    exc = info.value
    assert type(exc) is errors.APIError
    assert exc.request_id is not None
    assert str(exc).startswith(
        "create batch failed: 400 invalid_request_error: requests.0.custom_id"
    )
    assert str(exc).endswith(f"(request id {exc.request_id})")


def test_not_found_is_retried_then_batch_not_found(client: BatchClient, emu: Emulator) -> None:
    with capture_logs() as logs, pytest.raises(errors.APIError) as info:
        client.retrieve("msgbatch_01DoesNotExist")
    # Its own class, so the pipeline can tell a lost batch from a refusal (collect.lost_batch).
    assert type(info.value) is errors.BatchNotFound
    assert info.value.exit_code == 1
    assert "retrieve batch msgbatch_01DoesNotExist failed: 404 not_found_error" in str(info.value)
    assert len(logs) == client.not_found_retries + 1  # one line per call made
    assert emu.stats()["calls"]["retrieve"] == client.not_found_retries + 1


def test_transient_not_found_after_create_is_ridden_out(client: BatchClient, emu: Emulator) -> None:
    batch = client.create(_body(1)[0], count=1)
    emu.configure(fail_next=[404, 404])
    waits: list[float] = []
    client.sleep, client.not_found_delay = waits.append, 1.0
    assert client.retrieve(batch.id).id == batch.id
    assert waits == [1.0, 2.0]  # the waits grow, through the client's own sleep


def test_too_large_is_api_error(client: BatchClient, emu: Emulator) -> None:
    emu.configure(fail_next=[413])
    with pytest.raises(errors.APIError) as info:
        client.create(_body(1)[0], count=1)
    assert type(info.value) is errors.APIError
    assert "create batch failed: 413 request_too_large:" in str(info.value)


@pytest.mark.parametrize("status", [429, 503, 529])
def test_refused_creates_are_retried(client: BatchClient, emu: Emulator, status: int) -> None:
    emu.configure(fail_next=[status], retry_after=0.01)
    batch = client.create(_body(2)[0], count=2)
    assert batch.request_counts.processing == 2
    assert emu.stats()["faults"][f"http_{status}"] == 1
    assert emu.stats()["batches_created"] == 1


@pytest.mark.parametrize(
    ("status", "error_type"),
    [
        (429, "rate_limit_error"),
        (500, "api_error"),
        (529, "overloaded_error"),
        (408, "timeout_error"),
    ],
)
def test_persistent_transient_statuses_are_transient_api_error(
    emu: Emulator, status: int, error_type: str
) -> None:
    client = BatchClient(
        _settings(), http_client=emu.http_client(), base_url=IN_PROCESS_BASE_URL, max_retries=0
    )
    emu.configure(fail_next=[status])
    with capture_logs() as logs, pytest.raises(errors.TransientAPIError) as info:
        client.create(_body(1)[0], count=1)
    assert info.value.exit_code == errors.EXIT_TEMPFAIL
    assert f"create batch failed: {status} {error_type}:" in str(info.value)
    (line,) = logs
    assert line["error_type"] == error_type
    assert line["status"] == status
    assert line["request_id"] == info.value.request_id
    client.close()


def test_unreachable_api_is_transient() -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = BatchClient(_settings(), base_url=f"http://127.0.0.1:{port}", max_retries=0, timeout=5)
    with pytest.raises(errors.TransientAPIError, match="retrieve batch msgbatch_x failed"):
        client.retrieve("msgbatch_x")
    client.close()


def test_a_create_that_never_connected_is_retried_and_said_to_have_created_nothing() -> None:
    """A refused connection sent nothing, so the caller may release its intent at once
    instead of waiting out the orphan grace period (11 minutes) for a batch that cannot be."""
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = BatchClient(_settings(), base_url=f"http://127.0.0.1:{port}", timeout=5)
    waits: list[float] = []
    client.sleep = waits.append
    with pytest.raises(errors.CreateRefused, match="could not connect"):
        client.create(_body(1)[0], count=1)
    assert len(waits) == 2  # max_retries=2: three tries
    client.close()


def test_a_create_that_may_have_reached_the_api_is_never_said_to_have_created_nothing(
    emu: Emulator,
) -> None:
    """A 500 or a read timeout can follow a batch the API did create: the caller must keep
    its intent and look for the batch (recovery), not release it as CreateRefused."""
    with EmulatorServer(emu, host="127.0.0.1", port=0) as server:
        client = BatchClient(_settings(), base_url=server.url, timeout=0.5)
        client.sleep = lambda _s: None
        emu.configure(processing_seconds=0, fail_next=[500])
        with pytest.raises(errors.TransientAPIError) as err:
            client.create(_body(1)[0], count=1)
        assert not isinstance(err.value, errors.CreateRefused)
        emu.configure(slow_rate=1.0, slow_seconds=1.5)
        with pytest.raises(errors.TransientAPIError, match="timed out") as err:
            client.create(_body(1)[0], count=1)
        assert not isinstance(err.value, errors.CreateRefused)
        client.close()
        # The timed-out create reached the API all the same (its handler was still at
        # work): exactly why such a create must never be sent again blindly.
        deadline = time.monotonic() + 10
        while emu.stats()["batches_created"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert emu.stats()["batches_created"] == 1


def test_a_key_with_a_line_end_is_trimmed_and_one_with_inner_junk_refused(emu: Emulator) -> None:
    settings = Settings.load(env={"ANTHROPIC_API_KEY": KEY + "\r\n"})
    with BatchClient(settings, http_client=emu.http_client(), base_url=IN_PROCESS_BASE_URL) as bc:
        assert bc.create(_body(1)[0], count=1).id.startswith("msgbatch_")
    bad = Settings.load(env={"ANTHROPIC_API_KEY": "sk-ant-abc\tdef"})
    with pytest.raises(errors.AuthenticationFailed, match="holds a space, a control") as err:
        BatchClient(bad)
    assert "abc" not in str(err.value)
    assert err.value.exit_code == 2


def test_results_before_the_end_is_api_error(client: BatchClient) -> None:
    batch = client.create(_body(1)[0], count=1)
    with pytest.raises(errors.APIError, match="has not ended yet"):
        list(client.results(batch.id))


def test_archived_results_fail_without_retrying(client: BatchClient, emu: Emulator) -> None:
    batch = client.create(_body(1)[0], count=1)
    emu.advance(30 * 24 * 3600)
    assert client.retrieve(batch.id).archived_at is not None
    with pytest.raises(errors.APIError, match="archived"):
        list(client.results(batch.id))
    assert emu.stats()["calls"].get("results", 0) == 0


def test_broken_results_stream_in_process_is_transient(client: BatchClient, emu: Emulator) -> None:
    batch = client.create(_body(6)[0], count=6)
    _wait_ended(client, emu, batch.id)
    emu.configure(results_break_rate=1.0, results_break_after=2)
    got: list[ResultRecord] = []
    with pytest.raises(errors.TransientAPIError, match="broke off"):
        got.extend(client.results(batch.id))
    assert len(got) == 2
    emu.configure(results_break_rate=0.0)
    assert len(list(client.results(batch.id))) == 6  # the next download is whole


def _truncating_app(emu: Emulator, keep: bytes) -> Any:
    """The emulator behind a proxy that ends every results download cleanly but early.

    ``keep`` is applied to the whole body: b"2" keeps two whole lines, b"2.5" also half
    of the third (a last line cut short without a newline).
    """

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        body = b"".join(emu.wsgi_app(environ, start_response))
        if not environ["PATH_INFO"].endswith("/results"):
            return [body]
        lines = body.splitlines(keepends=True)
        whole, _, half = keep.partition(b".")
        out = b"".join(lines[: int(whole)])
        if half:
            out += lines[int(whole)][:20]
        return [out]

    return app


@pytest.mark.parametrize(("keep", "why"), [(b"2", "2 of 5 lines"), (b"2.5", "cut short")])
def test_results_ending_early_is_transient(emu: Emulator, keep: bytes, why: str) -> None:
    emu.configure(processing_seconds=0.0)
    proxy = httpx2.Client(
        transport=httpx2.WSGITransport(app=_truncating_app(emu, keep)), base_url=IN_PROCESS_BASE_URL
    )
    client = BatchClient(_settings(), http_client=proxy, base_url=IN_PROCESS_BASE_URL)
    batch = client.create(_body(5)[0], count=5)
    got: list[ResultRecord] = []
    with pytest.raises(errors.TransientAPIError, match=why):
        got.extend(client.results(batch.id))
    assert len(got) == 2
    client.close()


def test_key_echoed_by_a_server_is_redacted() -> None:
    """A misbehaving proxy that echoes the credential in its error message: still no key."""

    def echo(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        body = {
            "type": "error",
            "error": {"type": "invalid_request_error", "message": environ["HTTP_AUTHORIZATION"]},
        }
        start_response("400 Bad Request", [("content-type", "application/json")])
        return [orjson.dumps(body)]

    proxy = httpx2.Client(transport=httpx2.WSGITransport(app=echo))
    client = BatchClient(_settings(), http_client=proxy, base_url=IN_PROCESS_BASE_URL)
    with capture_logs() as logs, pytest.raises(errors.APIError) as info:
        client.cancel("msgbatch_x")
    assert "Bearer [redacted]" in str(info.value)
    assert "request id unknown" in str(info.value)
    _assert_no_key(info.value, *logs)
    client.close()


def test_cancel_ended_batch_is_api_error(client: BatchClient, emu: Emulator) -> None:
    batch = client.create(_body(1)[0], count=1)
    _wait_ended(client, emu, batch.id)
    with pytest.raises(errors.APIError, match=f"cancel batch {batch.id} failed: 400"):
        client.cancel(batch.id)


@pytest.mark.parametrize("loopback", [False, True])
def test_create_streams_a_body_file_and_resends_it_whole(loopback: bool) -> None:
    """A refused create is sent again from the start of the same file, over either transport."""
    emu = Emulator(EmulatorConfig(seed=5, processing_seconds=0.0, retry_after=0.01))
    body, params = _body(300)
    with tempfile.TemporaryFile() as file, contextlib.ExitStack() as stack:
        file.write(body)
        file.seek(17)  # wherever the writer left it: create starts from the beginning
        if loopback:
            server = stack.enter_context(EmulatorServer(emu))
            client = BatchClient(_settings(base_url=server.url))
        else:
            client = BatchClient(
                _settings(), http_client=emu.http_client(), base_url=IN_PROCESS_BASE_URL
            )
        stack.callback(client.close)
        emu.configure(fail_next=[529])
        with capture_logs() as logs:
            batch = client.create(file, count=300, nbytes=len(body))
        assert emu.stats()["faults"]["http_529"] == 1
        assert [entry["bytes"] for entry in logs if entry["event"] == "api.create"] == [
            len(body)
        ] * 2
        _wait_ended(client, emu, batch.id)
        answered = {r.custom_id: r for r in client.results(batch.id)}
    assert answered.keys() == params.keys()
    assert all(r.response_text == expected_text(params[c]) for c, r in answered.items())


# ---------------------------------------------------------------------- real loopback HTTP


def test_over_loopback_with_faults_and_a_broken_stream() -> None:
    emu = Emulator(EmulatorConfig(seed=3, processing_seconds=30.0, retry_after=0.01))
    with EmulatorServer(emu) as server, capture_logs() as logs:
        client = BatchClient(_settings(base_url=server.url))  # base_url from settings
        emu.configure(fail_next=[429])
        body, params = _body(8)
        batch = client.create(body, count=8)
        _wait_ended(client, emu, batch.id)
        assert client.retrieve(batch.id).results_url.startswith(server.url)  # type: ignore[union-attr]

        emu.configure(results_break_rate=1.0, results_break_after=3)
        got: list[ResultRecord] = []
        with pytest.raises(errors.TransientAPIError, match="broke off") as broken:
            got.extend(client.results(batch.id))
        assert len(got) == 3
        assert broken.value.request_id is not None

        emu.configure(results_break_rate=0.0)
        records = list(client.results(batch.id))
        assert {r.custom_id for r in records} == params.keys()
        assert all(r.result_type is ResultType.SUCCEEDED for r in records)
        assert [b.id for b in client.list_batches()] == [batch.id]

        emu.configure(fail_next=[401])
        with pytest.raises(errors.AuthenticationFailed) as denied:
            client.retrieve(batch.id)
        client.close()

    assert emu.stats()["faults"]["http_429"] == 1
    events = {entry["event"] for entry in logs}
    assert {"api.create", "api.retrieve", "api.results", "api.list"} <= events
    _assert_no_key(denied.value, broken.value, denied.value.__cause__, *logs)

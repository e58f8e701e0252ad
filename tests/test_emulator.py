"""The emulator's endpoints, driven through the official SDK, checked against the OpenAPI spec.

Most tests run twice: over real loopback HTTP (``EmulatorServer``) and in-process (httpx2's
WSGI transport), so both ways of serving stay equivalent.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import pytest
from jsonschema import Draft202012Validator

from batchpipe.emulator import IN_PROCESS_BASE_URL, Emulator, EmulatorServer

SPEC_PATH = Path(__file__).resolve().parents[2] / "shared/reference/anthropic-openapi-subset.json"


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    if not SPEC_PATH.exists():
        pytest.skip(f"OpenAPI subset not found at {SPEC_PATH}")
    return dict(json.loads(SPEC_PATH.read_text()))


def check(spec: dict[str, Any], name: str, body: Any) -> None:
    """Fail unless ``body`` is valid for the spec's schema ``name``."""
    root = {"$ref": f"#/components/schemas/{name}", "components": spec["components"]}
    Draft202012Validator(root).validate(body)


def req(custom_id: str, text: str = "hello", **params: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": text}]
    body = {"model": "claude-haiku-4-5", "max_tokens": 64, "messages": messages}
    body.update(params)
    return {"custom_id": custom_id, "params": body}


@pytest.fixture(params=["loopback", "inprocess"])
def client(request: pytest.FixtureRequest, emulator: Emulator) -> Iterator[anthropic.Anthropic]:
    """The SDK against the ``emulator`` fixture, over each transport."""
    if request.param == "loopback":
        with EmulatorServer(emulator) as server:
            sdk = anthropic.Anthropic(api_key="test", base_url=server.url, max_retries=0)
            yield sdk
            sdk.close()
    else:
        sdk = anthropic.Anthropic(
            api_key="test",
            base_url=IN_PROCESS_BASE_URL,
            http_client=emulator.http_client(),
            max_retries=0,
        )
        yield sdk
        sdk.close()


def test_batch_lifecycle_and_results(
    client: anthropic.Anthropic, emulator: Emulator, spec: dict[str, Any]
) -> None:
    requests = [req(f"r{i}", f"question {i}") for i in range(8)]
    requests.append(req("bad-params", max_tokens=0))  # rejected later, not at create
    raw = client.messages.batches.with_raw_response.create(requests=requests)  # type: ignore[arg-type]
    assert raw.headers["request-id"].startswith("req_")
    created = raw.http_response.json()
    check(spec, "MessageBatch", created)
    assert created["id"].startswith("msgbatch_01")
    assert created["processing_status"] == "in_progress"
    assert created["request_counts"] == {
        "processing": 9, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0
    }  # fmt: skip
    assert created["results_url"] is None
    assert created["ended_at"] is None
    batch = client.messages.batches.retrieve(created["id"])
    assert (batch.expires_at - batch.created_at).total_seconds() == 86_400
    assert batch.processing_status == "in_progress"
    with pytest.raises(anthropic.AnthropicError, match="No `results_url`"):
        list(client.messages.batches.results(batch.id))

    emulator.advance(2.0)
    raw_batch = client.messages.batches.with_raw_response.retrieve(batch.id).http_response.json()
    check(spec, "MessageBatch", raw_batch)
    assert raw_batch["processing_status"] == "ended"
    assert raw_batch["request_counts"] == {
        "processing": 0, "succeeded": 8, "errored": 1, "canceled": 0, "expired": 0
    }  # fmt: skip
    base = str(client.base_url).rstrip("/")
    assert raw_batch["results_url"] == f"{base}/v1/messages/batches/{batch.id}/results"

    # The raw bytes: x-jsonl, one compact line per request, newline-terminated, no blank line.
    http = client._client  # the SDK's own httpx2 client, to see the raw results body
    raw_results = http.get(
        raw_batch["results_url"], headers={"x-api-key": "k", "anthropic-version": "2023-06-01"}
    )
    assert raw_results.headers["content-type"] == "application/x-jsonl"
    assert raw_results.content.endswith(b"\n")
    lines = raw_results.content.split(b"\n")[:-1]
    assert len(lines) == 9
    assert all(lines)
    for line in lines:
        check(spec, "MessageBatchIndividualResponse", json.loads(line))

    results = {r.custom_id: r.result for r in client.messages.batches.results(batch.id)}
    assert set(results) == {f"r{i}" for i in range(8)} | {"bad-params"}
    ok = results["r3"]
    assert ok.type == "succeeded"
    assert ok.message.content[0].type == "text"
    assert ok.message.content[0].text
    bad = results["bad-params"]
    assert bad.type == "errored"
    assert bad.error.error.type == "invalid_request_error"
    assert "max_tokens" in bad.error.error.message
    # Downloading again returns the same answers and bills nothing more.
    again = {r.custom_id: r.result for r in client.messages.batches.results(batch.id)}
    assert again == results
    stats = emulator.stats()
    assert stats["results_succeeded"] == 8
    assert stats["results_errored"] == 1
    assert stats["batches_created"] == 1
    assert stats["requests_received"] == 9
    assert stats["calls"]["results"] == 3
    assert stats["duplicate_successes"] == 0


def test_model_limits_are_errored_results_not_create_errors(
    client: anthropic.Anthropic, emulator: Emulator, spec: dict[str, Any]
) -> None:
    """Over a model's output limit or context window: accepted at create (the API checks
    params asynchronously), then an errored result with invalid_request_error and the API's
    wording. 200,001 tokens is 800,004 characters with the emulator's tokenizer."""
    huge = "x" * (4 * 200_000 + 1)
    requests = [
        req("haiku-out", max_tokens=100_000),
        req("haiku-at-limit", max_tokens=64_000),
        req("opus46-out", model="claude-opus-4-6", max_tokens=100_000),
        req("haiku-long", huge),
        req("opus46-long", huge, model="claude-opus-4-6"),
    ]
    created = client.messages.batches.create(requests=requests)  # type: ignore[arg-type]
    assert created.processing_status == "in_progress"
    emulator.advance(2.0)
    results = {r.custom_id: r.result for r in client.messages.batches.results(created.id)}
    raw = client._client.get(  # the lines as sent, checked against the spec
        f"{str(client.base_url).rstrip('/')}/v1/messages/batches/{created.id}/results",
        headers={"x-api-key": "k", "anthropic-version": "2023-06-01"},
    )
    for line in raw.content.splitlines():
        check(spec, "MessageBatchIndividualResponse", json.loads(line))
    errors = {
        cid: (r.error.error.type, r.error.error.message)
        for cid, r in results.items()
        if r.type == "errored"
    }
    assert errors == {
        "haiku-out": (
            "invalid_request_error",
            "max_tokens: 100000 > 64000, which is the maximum allowed number of output tokens "
            "for claude-haiku-4-5",
        ),
        "haiku-long": (
            "invalid_request_error",
            "prompt is too long: 200001 tokens > 200000 maximum",
        ),
    }
    for ok in ("haiku-at-limit", "opus46-out", "opus46-long"):
        assert results[ok].type == "succeeded", ok


def test_every_known_model_has_its_limits() -> None:
    from batchpipe.emulator.model_limits import MODEL_LIMITS
    from batchpipe.emulator.settings import KNOWN_MODELS

    assert set(KNOWN_MODELS) == set(MODEL_LIMITS)


def test_results_url_keeps_host_and_path_prefix(emulator_server: EmulatorServer) -> None:
    emulator_server.emulator.configure(processing_seconds=0)
    sdk = anthropic.Anthropic(
        api_key="k", base_url=f"{emulator_server.url}/gw/anthropic", max_retries=0
    )
    batch = sdk.messages.batches.create(requests=[req("a")])  # type: ignore[list-item]
    ended = sdk.messages.batches.retrieve(batch.id)  # processing_seconds=0: ended at first look
    assert ended.processing_status == "ended"
    assert (
        ended.results_url
        == f"{emulator_server.url}/gw/anthropic/v1/messages/batches/{batch.id}/results"
    )
    assert [r.custom_id for r in sdk.messages.batches.results(batch.id)] == ["a"]


def test_list_pages_newest_first(
    client: anthropic.Anthropic, emulator: Emulator, spec: dict[str, Any]
) -> None:
    empty = client.messages.batches.with_raw_response.list().http_response.json()
    check(spec, "ListResponse_MessageBatch_", empty)
    assert empty == {"data": [], "has_more": False, "first_id": None, "last_id": None}
    ids = []
    for i in range(5):
        ids.append(client.messages.batches.create(requests=[req(f"x{i}")]).id)  # type: ignore[list-item]
        emulator.advance(1)
    newest_first = ids[::-1]

    page = client.messages.batches.with_raw_response.list(limit=2).http_response.json()
    check(spec, "ListResponse_MessageBatch_", page)
    assert [b["id"] for b in page["data"]] == newest_first[:2]
    assert page["has_more"] is True
    assert (page["first_id"], page["last_id"]) == (newest_first[0], newest_first[1])
    older = client.messages.batches.list(limit=2, after_id=newest_first[1])
    assert [b.id for b in older.data] == newest_first[2:4]
    assert older.has_more
    last = client.messages.batches.list(limit=2, after_id=newest_first[3])
    assert [b.id for b in last.data] == newest_first[4:]
    assert not last.has_more
    newer = client.messages.batches.list(limit=2, before_id=newest_first[3])
    assert [b.id for b in newer.data] == newest_first[1:3]
    assert newer.has_more
    assert [b.id for b in client.messages.batches.list(limit=2)] == newest_first  # auto-paging
    for bad in (0, 1001):
        with pytest.raises(anthropic.BadRequestError, match="limit"):
            client.messages.batches.list(limit=bad)


def test_cancel_keeps_finished_requests_and_cancels_the_rest(
    client: anthropic.Anthropic, emulator: Emulator, spec: dict[str, Any]
) -> None:
    emulator.configure(processing_seconds=100, cancel_seconds=1)
    batch = client.messages.batches.create(requests=[req(f"c{i}") for i in range(40)])  # type: ignore[misc]
    emulator.advance(50)
    raw = client.messages.batches.with_raw_response.cancel(batch.id).http_response.json()
    check(spec, "MessageBatch", raw)
    assert raw["processing_status"] == "canceling"
    assert raw["cancel_initiated_at"] is not None
    assert raw["request_counts"]["processing"] == 40
    emulator.advance(1)
    ended = client.messages.batches.retrieve(batch.id)
    assert ended.processing_status == "ended"
    counts = ended.request_counts
    assert counts.succeeded > 0
    assert counts.canceled > 0
    assert counts.succeeded + counts.canceled == 40
    kinds = [r.result.type for r in client.messages.batches.results(batch.id)]
    assert kinds.count("canceled") == counts.canceled
    with pytest.raises(anthropic.BadRequestError, match="already ended"):
        client.messages.batches.cancel(batch.id)


def test_delete_only_after_end(
    client: anthropic.Anthropic, emulator: Emulator, spec: dict[str, Any]
) -> None:
    batch = client.messages.batches.create(requests=[req("d")])  # type: ignore[list-item]
    with pytest.raises(anthropic.BadRequestError, match="in_progress"):
        client.messages.batches.delete(batch.id)
    emulator.advance(3)
    raw = client.messages.batches.with_raw_response.delete(batch.id).http_response.json()
    check(spec, "DeleteMessageBatchResponse", raw)
    assert raw == {"id": batch.id, "type": "message_batch_deleted"}
    for call in (client.messages.batches.retrieve, client.messages.batches.delete):
        with pytest.raises(anthropic.NotFoundError):
            call(batch.id)
    assert client.messages.batches.list().data == []


def test_unknown_id_is_not_found_with_the_error_envelope(
    client: anthropic.Anthropic, spec: dict[str, Any]
) -> None:
    with pytest.raises(anthropic.NotFoundError) as caught:
        client.messages.batches.retrieve("msgbatch_01nope")
    body = caught.value.response.json()
    check(spec, "ErrorResponse", body)
    assert body["error"]["type"] == "not_found_error"
    assert (
        body["request_id"] == caught.value.request_id == caught.value.response.headers["request-id"]
    )


def test_every_answer_is_dated_by_the_emulator_clock(
    client: anthropic.Anthropic, emulator: Emulator
) -> None:
    emulator.advance(3 * 86_400)  # the API's clock is what stamps created_at and expires_at
    raw = client.messages.batches.with_raw_response.list(limit=1)
    dated = parsedate_to_datetime(raw.headers["date"])
    assert abs(dated.timestamp() - emulator.now()) < 2
    assert len(raw.http_response.headers.get_list("date")) == 1  # not the wall clock's too
    missing = client.messages.batches.with_raw_response.retrieve
    with pytest.raises(anthropic.NotFoundError) as caught:
        missing("msgbatch_01nothere")
    assert abs(parsedate_to_datetime(caught.value.response.headers["date"]).timestamp()
               - emulator.now()) < 2  # fmt: skip


def test_auth_and_version_headers(client: anthropic.Anthropic, spec: dict[str, Any]) -> None:
    no_auth = client.with_options(default_headers={"Authorization": anthropic.Omit()})
    with pytest.raises(anthropic.AuthenticationError) as caught:
        no_auth.messages.batches.list()
    check(spec, "ErrorResponse", caught.value.response.json())
    x_api_key = client.with_options(
        default_headers={"x-api-key": "k", "Authorization": anthropic.Omit()}
    )
    assert x_api_key.messages.batches.list().data == []
    no_version = client.with_options(default_headers={"anthropic-version": anthropic.Omit()})
    with pytest.raises(anthropic.BadRequestError, match="anthropic-version: header is required"):
        no_version.messages.batches.list()
    # A ?beta=true twin of a path is the same endpoint.
    assert client.messages.batches.list(extra_query={"beta": "true"}).data == []


@pytest.mark.parametrize(
    ("requests", "extra", "message"),
    [
        ([], None, "requests: List should have at least 1 item"),
        ([req("a"), req("a")], None, "requests.1.custom_id: Duplicate custom_id"),
        (
            [req("a"), req("b"), req("c"), req("no spaces")],
            None,
            "requests.3.custom_id: String should match",
        ),
        ([req("x" * 65)], None, "requests.0.custom_id: String should have at most 64 characters"),
        ([req("a"), {"custom_id": "b"}], None, "requests.1.params: Field required"),
        ([{**req("a"), "extra": 1}], None, "requests.0.extra: Extra inputs are not permitted"),
        ([req("a")], {"metadata": {}}, "metadata: Extra inputs are not permitted"),
        (
            [req("a"), {"custom_id": "b", "params": []}],
            None,
            "requests.1.params: Input should be a valid dictionary",
        ),
    ],
)
def test_create_validation_names_the_index(
    client: anthropic.Anthropic,
    spec: dict[str, Any],
    requests: list[Any],
    extra: dict[str, Any] | None,
    message: str,
) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.batches.create(requests=requests, extra_body=extra)
    assert caught.value.body is not None
    assert message in caught.value.response.json()["error"]["message"]
    check(spec, "ErrorResponse", caught.value.response.json())


def test_too_many_requests_in_one_batch(inprocess_client: anthropic.Anthropic) -> None:
    requests = [{"custom_id": f"i{i}", "params": {}} for i in range(100_001)]
    with pytest.raises(anthropic.BadRequestError, match="at most 100000 items"):
        inprocess_client.messages.batches.create(requests=requests)  # type: ignore[arg-type]


def test_count_tokens(client: anthropic.Anthropic, spec: dict[str, Any]) -> None:
    raw = client.messages.with_raw_response.count_tokens(
        model="claude-haiku-4-5", messages=[{"role": "user", "content": "a" * 40}]
    )
    body = raw.http_response.json()
    check(spec, "CountMessageTokensResponse", body)
    assert body["input_tokens"] > 0
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.count_tokens(model="claude-haiku-4-5", messages="nope")  # type: ignore[arg-type]
    check(spec, "ErrorResponse", caught.value.response.json())


def test_unknown_route_is_404_over_plain_http(emulator_server: EmulatorServer) -> None:
    headers = {"x-api-key": "k", "anthropic-version": "2023-06-01"}
    with httpx2.Client(base_url=emulator_server.url) as http:
        resp = http.get("/v1/nothing/here", headers=headers)
        assert resp.status_code == 404
        assert resp.json()["error"]["type"] == "not_found_error"
        assert resp.headers["request-id"].startswith("req_")
        # keep-alive survives error answers: the same connection serves the next call
        assert http.get("/v1/messages/batches", headers=headers).status_code == 200


def test_a_body_without_a_length_is_refused_like_any_api_error(
    emulator_server: EmulatorServer, emulator: Emulator, spec: dict[str, Any]
) -> None:
    """A chunked upload gets 411 in the API's error shape, dated by the emulator's clock,
    and the connection closes (its body was never read)."""
    emulator.advance(86_400)
    headers = {"x-api-key": "k", "anthropic-version": "2023-06-01"}
    pieces = iter([b'{"requests": ', b"[]}"])  # a generator body: httpx2 sends it chunked
    with httpx2.Client(base_url=emulator_server.url) as http:
        resp = http.post("/v1/messages/batches", headers=headers, content=pieces)
    assert resp.status_code == 411
    check(spec, "ErrorResponse", resp.json())
    assert resp.json()["error"]["type"] == "invalid_request_error"
    assert resp.headers["connection"] == "close"
    assert abs(parsedate_to_datetime(resp.headers["date"]).timestamp() - emulator.now()) < 2
    assert len(resp.headers.get_list("date")) == 1
    assert emulator.stats()["batches_created"] == 0

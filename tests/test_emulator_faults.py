"""The emulator's fault injection, clock, billing stats, snapshots, controls and CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import pytest
from jsonschema import Draft202012Validator

from batchpipe.emulator import (
    IN_PROCESS_BASE_URL,
    Emulator,
    EmulatorConfig,
    EmulatorServer,
    ResultsStreamBroken,
)
from batchpipe.emulator.wsgi import ORGANIZATION_ID

SPEC_PATH = Path(__file__).resolve().parents[2] / "shared/reference/anthropic-openapi-subset.json"
DAY = 86_400.0


def req(custom_id: str, text: str = "hello") -> dict[str, Any]:
    params = {
        "model": "claude-haiku-4-5",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": text}],
    }
    return {"custom_id": custom_id, "params": params}


def sdk(emu: Emulator, **options: Any) -> anthropic.Anthropic:
    options.setdefault("max_retries", 0)
    return anthropic.Anthropic(
        api_key="t", base_url=IN_PROCESS_BASE_URL, http_client=emu.http_client(), **options
    )


def run_batch(emu: Emulator, n: int, prefix: str = "r") -> dict[str, Any]:
    client = sdk(emu)
    batch = client.messages.batches.create(
        requests=[req(f"{prefix}{i}", f"q{i}") for i in range(n)]
    )  # type: ignore[misc]
    emu.advance(emu.config.processing_seconds + 1)
    return {r.custom_id: r.result for r in client.messages.batches.results(batch.id)}


def test_fail_next_statuses_surface_as_the_sdk_classes(emulator_server: EmulatorServer) -> None:
    emu = emulator_server.emulator
    emu.configure(fail_next=[429, 529, 500, 503, 504], retry_after=7)
    client = anthropic.Anthropic(api_key="t", base_url=emulator_server.url, max_retries=0)
    with pytest.raises(anthropic.RateLimitError) as rate:
        client.messages.batches.list()
    assert rate.value.response.headers["retry-after"] == "7"
    assert rate.value.response.json()["error"]["type"] == "rate_limit_error"
    # Control endpoints are never faulted, and do not use up the queue.
    stats = httpx2.get(f"{emulator_server.url}/_emulator/stats").json()
    assert stats["faults"] == {"http_429": 1}
    with pytest.raises(anthropic.OverloadedError):
        client.messages.batches.list()
    with pytest.raises(anthropic.InternalServerError) as internal:
        client.messages.batches.list()
    assert internal.value.status_code == 500
    assert internal.value.response.json()["error"]["type"] == "api_error"
    with pytest.raises(anthropic.ServiceUnavailableError):
        client.messages.batches.list()
    with pytest.raises(anthropic.GatewayTimeoutError):
        client.messages.batches.list()
    assert client.messages.batches.list().data == []  # the queue is used up
    if SPEC_PATH.exists():
        body = internal.value.response.json()
        spec = json.loads(SPEC_PATH.read_text())
        root = {"$ref": "#/components/schemas/ErrorResponse", "components": spec["components"]}
        Draft202012Validator(root).validate(body)


def test_sdk_retries_through_transient_faults(emulator: Emulator) -> None:
    emulator.configure(fail_next=[429, 529], retry_after=0.01)
    client = sdk(emulator, max_retries=2)
    batch = client.messages.batches.create(requests=[req("a")])  # type: ignore[list-item]
    assert batch.processing_status == "in_progress"
    stats = emulator.stats()
    assert stats["calls"]["create"] == 3  # two faulted attempts, then the real one
    assert stats["batches_created"] == 1
    assert stats["faults"] == {"http_429": 1, "http_529": 1}


def test_retry_headers_steer_the_sdk_as_the_api_does(emulator_server: EmulatorServer) -> None:
    emu = emulator_server.emulator
    url = emulator_server.url
    # retry-after-ms wins over retry-after: a 30 s retry-after would stall this test.
    emu.configure(fail_next=[429], retry_after=30, retry_after_ms=5)
    client = anthropic.Anthropic(api_key="t", base_url=url, max_retries=1)
    raw = client.messages.batches.with_raw_response.list()
    assert raw.headers["anthropic-organization-id"] == ORGANIZATION_ID
    assert emu.stats()["calls"]["list"] == 2
    # x-should-retry overrides the status: false stops the SDK retrying even a 500, true
    # makes it retry a 400 it would otherwise give up on.
    emu.configure(fail_next=[500], should_retry="false", retry_after=0, retry_after_ms=0)
    with pytest.raises(anthropic.InternalServerError) as err:
        client.messages.batches.list()
    assert err.value.response.headers["x-should-retry"] == "false"
    assert emu.stats()["calls"]["list"] == 3  # not retried
    emu.configure(fail_next=[400], should_retry="true")
    assert client.messages.batches.list().data == []
    assert emu.stats()["calls"]["list"] == 5  # the 400, then its retry


def test_fault_rates_replay_with_the_same_seed() -> None:
    def outcomes(seed: int) -> list[str]:
        emu = Emulator(EmulatorConfig(seed=seed, http_429_rate=0.3, http_500_rate=0.2))
        client = sdk(emu)
        seen = []
        for _ in range(40):
            try:
                client.messages.batches.list()
                seen.append("ok")
            except anthropic.APIStatusError as exc:
                seen.append(str(exc.status_code))
        return seen

    first = outcomes(5)
    assert first == outcomes(5)
    assert {"ok", "429", "500"} <= set(first)
    assert first != outcomes(6)


def test_slow_calls_time_out_over_http(emulator_server: EmulatorServer) -> None:
    emulator_server.emulator.configure(slow_rate=1.0, slow_seconds=0.6)
    client = anthropic.Anthropic(
        api_key="t", base_url=emulator_server.url, max_retries=0, timeout=0.2
    )
    with pytest.raises(anthropic.APITimeoutError):
        client.messages.batches.list()
    assert emulator_server.emulator.stats()["faults"]["slow"] == 1


def test_broken_results_download_is_an_error_not_a_short_file(
    emulator_server: EmulatorServer,
) -> None:
    emu = emulator_server.emulator
    client = anthropic.Anthropic(api_key="t", base_url=emulator_server.url, max_retries=0)
    batch = client.messages.batches.create(requests=[req(f"b{i}") for i in range(2000)])  # type: ignore[misc]
    emu.advance(3)
    emu.configure(results_break_rate=1.0, results_break_after=1500)
    received: list[str] = []

    def download() -> None:
        for line in client.messages.batches.results(batch.id):
            received.append(line.custom_id)

    with pytest.raises(httpx2.RemoteProtocolError):
        download()
    assert 0 < len(received) < 2000
    with pytest.raises(ResultsStreamBroken):  # in-process: same base class
        list(sdk(emu).messages.batches.results(batch.id))
    emu.configure(results_break_rate=0.0)
    assert len(list(client.messages.batches.results(batch.id))) == 2000
    assert emu.stats()["faults"]["results_break"] == 2


def test_per_request_faults_are_seeded_per_custom_id() -> None:
    cfg = EmulatorConfig(seed=3, errored_rate=0.3, invalid_rate=0.1, expired_rate=0.1)
    first = run_batch(Emulator(cfg), 300)
    second = run_batch(Emulator(cfg), 300)
    kinds = {cid: r.type for cid, r in first.items()}
    assert kinds == {cid: r.type for cid, r in second.items()}
    errors = [r.error.error.type for r in first.values() if r.type == "errored"]
    assert set(errors) == {"overloaded_error", "api_error", "invalid_request_error"}
    assert 60 <= len(errors) <= 160
    expired = sum(r.type == "expired" for r in first.values())
    assert 10 <= expired <= 60
    errored = next(r for r in first.values() if r.type == "errored")
    assert errored.error.type == "error"
    assert errored.error.request_id is None


def test_requests_past_24_hours_expire_and_results_are_archived(emulator: Emulator) -> None:
    emulator.configure(processing_seconds=2 * DAY)  # half the requests would finish too late
    client = sdk(emulator)
    batch = client.messages.batches.create(requests=[req(f"e{i}") for i in range(50)])  # type: ignore[misc]
    emulator.advance(DAY - 10)
    assert client.messages.batches.retrieve(batch.id).processing_status == "in_progress"
    emulator.advance(10)
    ended = client.messages.batches.retrieve(batch.id)
    assert ended.processing_status == "ended"
    assert ended.ended_at == ended.expires_at
    assert ended.request_counts.expired > 0
    assert ended.request_counts.succeeded + ended.request_counts.expired == 50
    emulator.advance(28 * DAY)
    archived = client.messages.batches.retrieve(batch.id)
    assert archived.archived_at is not None
    with pytest.raises(anthropic.NotFoundError, match="archived"):
        list(client.messages.batches.results(batch.id))


def test_duplicate_successes_count_billed_repeats_once_per_params() -> None:
    emu = Emulator(EmulatorConfig(processing_seconds=0))
    assert emu.stats()["duplicate_successes"] == 0
    run_batch(emu, 5, prefix="first")
    run_batch(emu, 2, prefix="again")  # params of first0 and first1, new custom_ids
    stats = emu.stats()
    assert stats["duplicate_successes"] == 2
    assert stats["results_succeeded"] == 7
    run_batch(emu, 2, prefix="third")  # the same two a third time: still two params
    assert emu.stats()["duplicate_successes"] == 2


def test_unlooked_batches_are_billed_when_their_time_comes(emulator: Emulator) -> None:
    client = sdk(emulator)
    client.messages.batches.create(requests=[req("a", "same")])  # type: ignore[list-item]
    client.messages.batches.create(requests=[req("b", "same")])  # type: ignore[list-item]
    assert emulator.stats()["results_succeeded"] == 0
    emulator.advance(3)
    assert emulator.stats()["duplicate_successes"] == 1


def test_snapshot_carries_state_to_another_emulator(tmp_path: Path) -> None:
    emu = Emulator(EmulatorConfig(seed=9, errored_rate=0.5))
    client = sdk(emu)
    batch = client.messages.batches.create(requests=[req(f"s{i}") for i in range(20)])  # type: ignore[misc]
    path = tmp_path / "emu.json"
    emu.save(path)
    later = Emulator.load(path)
    assert later.config.errored_rate == 0.5
    later.advance(5)
    other = sdk(later)
    assert other.messages.batches.retrieve(batch.id).processing_status == "ended"
    results = {r.custom_id: r.result.type for r in other.messages.batches.results(batch.id)}
    emu.advance(5)
    assert results == {
        r.custom_id: r.result.type for r in client.messages.batches.results(batch.id)
    }
    assert later.stats()["batches_created"] == 1


def test_control_endpoints(emulator_server: EmulatorServer) -> None:
    url = emulator_server.url
    emu = emulator_server.emulator
    client = anthropic.Anthropic(api_key="t", base_url=url, max_retries=0)
    batch = client.messages.batches.create(requests=[req("c")])  # type: ignore[list-item]
    with httpx2.Client(base_url=url) as http:
        resp = http.post("/_emulator/faults", json={"http_500_rate": 2})
        assert resp.status_code == 400
        assert "http_500_rate" in resp.json()["error"]["message"]
        assert (
            http.post("/_emulator/faults", json={"errored_rate": 1.0}).json()["errored_rate"] == 1
        )
        assert http.post("/_emulator/clock", json={"advance": 5}).status_code == 200
        result = next(iter(client.messages.batches.results(batch.id))).result
        assert result.type == "errored"
        stats = http.get("/_emulator/stats").json()
        assert stats["results_errored"] == 1
        assert stats["calls"]["create"] == 1
        assert http.post("/_emulator/reset").status_code == 200
    assert emu.stats()["batches_created"] == 0
    with pytest.raises(anthropic.NotFoundError):
        client.messages.batches.retrieve(batch.id)


def test_create_body_over_256_mb_is_413(emulator: Emulator) -> None:
    client = sdk(emulator)
    huge = req("big", "x" * (256 * 1024 * 1024))
    with pytest.raises(anthropic.ContentTooLargeError) as caught:
        client.messages.batches.create(requests=[huge])  # type: ignore[list-item]
    assert caught.value.response.json()["error"]["type"] == "request_too_large"
    assert emulator.stats()["batches_created"] == 0


def test_cli_serves_until_sigterm(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchpipe", "emulator", "--port", "0", "--state", str(state),
         "--processing-seconds", "0", "--fail-next", "529"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "ANTHROPIC_API_KEY": ""},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        client = anthropic.Anthropic(api_key="anything", base_url=url, max_retries=0)
        with pytest.raises(anthropic.OverloadedError):
            client.messages.batches.list()
        batch = client.messages.batches.create(requests=[req("cli")])  # type: ignore[list-item]
        assert [r.custom_id for r in client.messages.batches.results(batch.id)] == ["cli"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    assert proc.returncode == 0
    assert Emulator.load(state).stats()["batches_created"] == 1


def test_an_unknown_model_or_a_mistyped_sampling_param_comes_back_errored(
    emulator_server: EmulatorServer, anthropic_client: anthropic.Anthropic
) -> None:
    """As the API answers them: the model by not_found_error (never worth resending), the
    params by invalid_request_error naming the field; both in the results, not at create."""

    def request(custom_id: str, **params: object) -> dict[str, object]:
        base = {"model": "claude-haiku-4-5", "max_tokens": 8}
        body = {**base, "messages": [{"role": "user", "content": "hi"}], **params}
        return {"custom_id": custom_id, "params": body}

    requests = [
        request("typo", model="claude-nonexistent-9"),
        request("topk", top_k="five"),
        request("topp", top_p=1.5),
        request("fine", top_k=5, top_p=0.5),
    ]
    batch = anthropic_client.messages.batches.create(requests=requests)  # type: ignore[arg-type]
    emulator_server.emulator.advance(3)
    results = {r.custom_id: r.result for r in anthropic_client.messages.batches.results(batch.id)}
    errors = {
        cid: (r.error.error.type, r.error.error.message)
        for cid, r in results.items()
        if r.type == "errored"
    }
    assert errors == {
        "typo": ("not_found_error", "model: claude-nonexistent-9"),
        "topk": ("invalid_request_error", "top_k: Input should be a valid integer"),
        "topp": ("invalid_request_error", "top_p: Input should be between 0 and 1"),
    }
    assert results["fine"].type == "succeeded"
    with pytest.raises(anthropic.NotFoundError, match="model: claude-nonexistent-9"):
        anthropic_client.messages.count_tokens(
            model="claude-nonexistent-9", messages=[{"role": "user", "content": "hi"}]
        )
    emulator_server.emulator.configure(models=("*",))  # a stand-in for a model not yet listed
    assert (
        anthropic_client.messages.count_tokens(
            model="claude-nonexistent-9", messages=[{"role": "user", "content": "hi"}]
        ).input_tokens
        > 0
    )

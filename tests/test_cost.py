"""Costs: the estimate against an emulator run's actual cost, caching, the budget cap, re-runs.

The pipeline runs through the SDK against the loopback emulator (test_pipeline's Harness);
actual costs are recomputed here from the emulator's usage and the public prices.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jsonschema
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import run_batchpipe
from test_pipeline import Harness, spec_for, write_docs

from batchpipe import pipeline, pricing
from batchpipe.cli import cli
from batchpipe.db import upgrade
from batchpipe.errors import BudgetExceeded, UsageError
from batchpipe.structured import labels_schema

if TYPE_CHECKING:
    from batchpipe.emulator import Emulator

HAIKU = pricing.PRICES["claude-haiku-4-5"]
STATUS_SCHEMA = json.loads(
    (Path(__file__).parent.parent / "docs" / "status.schema.json").read_text()
)


@pytest.fixture
def harness(sqlite_url: str) -> Iterator[Harness]:
    with Harness.serving(sqlite_url, seed=3, processing_seconds=0.1) as h:
        yield h


def summary(harness: Harness, job: Any) -> dict[str, Any]:
    ctx = harness.context()
    try:
        return pipeline.job_summary(ctx, harness.store.get_job(job.id), with_batches=False)
    finally:
        ctx.close()


def list_price(usage: dict[str, int]) -> float:
    """Standard (non-batch) dollars for token totals, straight from the public prices."""
    return (
        usage["input_tokens"] * 1.0
        + usage["output_tokens"] * 5.0
        + usage["cache_creation_input_tokens"] * 1.25
        + usage["cache_read_input_tokens"] * 0.10
    ) / 1e6


def test_price_table_matches_models_and_applies_the_batch_discount() -> None:
    assert pricing.price_for("claude-haiku-4-5-20251001") == HAIKU
    assert pricing.price_for("claude-sonnet-4-5") == pricing.PRICES["claude-sonnet-4-5"]
    assert pricing.price_for("gpt-4") is None
    standard = pricing.cost_usd("claude-haiku-4-5", input_tokens=10**6, batch=False)
    assert standard == 1.0
    assert pricing.cost_usd("claude-haiku-4-5", input_tokens=10**6) == 0.5
    assert pricing.cost_usd("claude-haiku-4-5", cache_read_input_tokens=10**6) == 0.05


@pytest.mark.parametrize("model", ["claude-opus-4-6", "claude-opus-4-7"])
def test_newer_opus_models_cost_their_published_price(tmp_path: Path, model: str) -> None:
    """Opus 4.6 and 4.7 list at $5/$25 per MTok (cache $6.25 write, $0.50 read), not the
    $15/$75 of Opus 4.0 whose ``claude-opus-4`` prefix they used to fall under: a run's
    cost in `status --json` is that, at half price for batches."""
    src = tmp_path / "docs.jsonl"
    write_docs(src, 4)
    root = ["--db", f"sqlite:///{tmp_path / 'state.db'}"]
    args = [str(src), "--prompt", "Summarise: {{ body }}", "--max-tokens", "16"]
    ran = CliRunner().invoke(
        cli, [*root, "run", *args, "--model", model, "--job", "o", "--emulate"]
    )
    assert ran.exit_code == 0, ran.output
    status = CliRunner().invoke(cli, [*root, "status", "o", "--json"])
    (job,) = json.loads(status.stdout)["jobs"]
    usage = job["usage"]
    published = (
        usage["input_tokens"] * 5.0
        + usage["output_tokens"] * 25.0
        + usage["cache_creation_input_tokens"] * 6.25
        + usage["cache_read_input_tokens"] * 0.50
    ) / 1e6
    assert usage["input_tokens"] > 0
    assert job["cost_usd"] == pytest.approx(0.5 * published, rel=1e-6)
    assert job["price_table"] == pricing.PRICE_TABLE_VERSION


def test_estimate_against_the_actual_cost_of_a_run(harness: Harness, tmp_path: Path) -> None:
    src = tmp_path / "docs.jsonl"
    write_docs(src, 40)
    spec = spec_for(tmp_path, src, max_tokens=64)
    ctx = harness.context()
    try:
        counted = pipeline.estimate(ctx, spec, sample=100)  # every row counted: exact input
        sampled = pipeline.estimate(ctx, spec, sample=8)
        offline = pipeline.estimate(ctx, spec, offline=True)
    finally:
        ctx.close()
    assert counted.method == "count_tokens"
    assert counted.sampled == 40
    assert offline.method == "offline"
    job = harness.run(spec)
    s = summary(harness, job)
    usage = s["usage"]
    # Input: count_tokens over every row is exactly what the run billed.
    assert counted.input_tokens == usage["input_tokens"]
    assert sampled.input_tokens == pytest.approx(usage["input_tokens"], rel=0.1)
    assert offline.input_tokens == pytest.approx(usage["input_tokens"], rel=0.6)
    # Actual cost is the list price of the used tokens, halved by the batch discount.
    assert s["cost_usd"] == pytest.approx(0.5 * list_price(usage), rel=1e-6)
    assert counted.input_cost_usd == pytest.approx(0.5 * usage["input_tokens"] * 1.0 / 1e6)
    # Never above the maximum; the expected figure is in the right range.
    assert s["cost_usd"] <= counted.max_cost_usd
    assert counted.input_cost_usd < s["cost_usd"]
    assert counted.expected_cost_usd == pytest.approx(s["cost_usd"], rel=1.0)
    # Per row: cost_usd sums to the job's total.
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert sum(r["cost_usd"] for r in rows) == pytest.approx(s["cost_usd"])


def test_cached_system_prompt_is_priced_as_cache_reads(harness: Harness, tmp_path: Path) -> None:
    src = tmp_path / "docs.jsonl"
    write_docs(src, 20)
    system = "You label product reviews. " * 40  # one long shared prefix
    plain = harness.run(spec_for(tmp_path, src, system=system), name="plain")
    cached = harness.run(spec_for(tmp_path, src, system=system, cache_system=True), name="c")
    p, c = summary(harness, plain), summary(harness, cached)
    assert p["usage"]["cache_read_input_tokens"] == 0
    assert c["usage"]["cache_creation_input_tokens"] > 0
    assert c["usage"]["cache_read_input_tokens"] > c["usage"]["cache_creation_input_tokens"]
    assert c["cost_usd"] == pytest.approx(0.5 * list_price(c["usage"]), rel=1e-6)
    assert c["cost_usd"] < p["cost_usd"]


def test_budget_below_the_estimate_refuses_to_submit(harness: Harness, tmp_path: Path) -> None:
    src = tmp_path / "docs.jsonl"
    write_docs(src, 30)
    with pytest.raises(BudgetExceeded, match=r"over the budget --max-cost \$0\.0000"):
        harness.run(spec_for(tmp_path, src, max_cost=0.00001))
    job = harness.store.get_job("job")
    assert job is not None
    assert job.status == "failed"
    assert "budget" in (job.error or "")
    assert harness.emulator.stats()["requests_received"] == 0


def test_budget_stops_further_batches(harness: Harness, tmp_path: Path) -> None:
    """Expected cost fits, worst case does not: batches go until the next could pass the cap."""
    src = tmp_path / "docs.jsonl"
    write_docs(src, 40)
    spec = spec_for(tmp_path, src, max_tokens=64, max_batch_requests=10)
    ctx = harness.context()
    try:
        found = pipeline.estimate(ctx, spec, offline=True)
    finally:
        ctx.close()
    cap = found.max_cost_usd * 0.6  # above the expected cost, below the worst case
    assert found.expected_cost_usd < cap
    with pytest.raises(BudgetExceeded, match="would be passed"):
        harness.run(spec.model_copy(update={"max_cost": cap}))
    job = harness.store.get_job("job")
    assert job is not None
    assert job.status == "failed"
    assert "row(s) were not sent" in (job.error or "")
    sent = harness.emulator.stats()["requests_received"]
    assert 0 < sent < 40
    assert f"; {40 - sent} row(s) were not sent" in (job.error or "")
    # The bound it was held to, and what budget would have let the next batch go.
    assert "the next batch (10 rows) could cost up to $" in (job.error or "")
    needed = float((job.error or "").split("A --max-cost of $")[1].split()[0])
    assert needed > cap
    s = summary(harness, job)
    assert s["cost_usd"] <= cap
    assert s["counts"]["pending"] == 40 - sent


def test_budget_stop_through_the_cli_exits_1(tmp_path: Path, monkeypatch: Any) -> None:
    src = tmp_path / "docs.jsonl"
    write_docs(src, 10)
    monkeypatch.chdir(tmp_path)
    args = [
        "--db",
        f"sqlite:///{tmp_path / 'cli.db'}",
        "run",
        str(src),
        "--prompt",
        "Classify: {{ body }}",
        "--model",
        "claude-haiku-4-5",
        "--max-tokens",
        "50",
        "--emulate",
        "--max-cost",
        "0.000001",
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1
    assert "budget --max-cost" in result.stderr


def test_rerun_submits_only_the_changed_rows(harness: Harness, tmp_path: Path) -> None:
    src = tmp_path / "docs.jsonl"
    write_docs(src, 30)
    # A template that only uses `stars` for some rows: changing that part changes those rows.
    prompt = "Classify: {{ body }}{% if stars == 4 %} (four stars){% endif %}"
    first = spec_for(tmp_path, src, prompt=prompt, output_schema=labels_schema(["a", "b"]))
    harness.run(first)
    before = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert harness.emulator.stats()["requests_received"] == 30
    changed = first.model_copy(update={"prompt": prompt.replace("four stars", "4 stars")})
    ctx = harness.context()
    try:
        plan = pipeline.check_rerun(ctx, "job", changed)
        assert plan is not None
        assert (plan.changed, plan.unchanged) == (6, 24)
        with pytest.raises(UsageError, match=r"6 of 30 row\(s\).*--yes"):
            pipeline.prepare(ctx, "job", changed)
    finally:
        ctx.close()
    assert harness.emulator.stats()["requests_received"] == 30  # nothing sent without --yes
    ctx = harness.context()
    try:
        job = pipeline.prepare(ctx, "job", changed, confirm_rerun=True)
        job = pipeline.run(ctx, job)
    finally:
        ctx.close()
    assert harness.emulator.stats()["requests_received"] == 36  # only the 6 changed rows
    after = pq.read_table(tmp_path / "out.parquet").to_pylist()
    for old, new in zip(before, after, strict=True):
        if old["stars"] == 4:
            assert new["attempts"] == 2
            assert new["custom_id"] != old["custom_id"]
            assert new["cost_usd"] > old["cost_usd"]  # both sends are paid for
        else:
            assert new["custom_id"] == old["custom_id"]
            assert new["label"] == old["label"]
    # The same settings again: nothing changes, nothing is sent.
    ctx = harness.context()
    try:
        assert pipeline.check_rerun(ctx, "job", changed) is None
    finally:
        ctx.close()


def test_a_model_without_a_price_shows_cost_unknown_not_zero(tmp_path: Path) -> None:
    """A model the price table lacks used tokens that cost money, just not a known amount:
    status and report say so rather than "$0.0000", and estimate names the priced id a
    mistyped model is closest to."""
    src = tmp_path / "docs.jsonl"
    write_docs(src, 5)
    root = ["--db", f"sqlite:///{tmp_path / 'state.db'}"]
    args = [str(src), "--prompt", "Summarise: {{ body }}", "--max-tokens", "8"]
    ran = CliRunner().invoke(
        cli, [*root, "run", *args, "--model", "claude-mythos-preview", "--job", "m", "--emulate"]
    )
    assert ran.exit_code == 0, ran.output
    unknown = "cost unknown: model 'claude-mythos-preview' is not in the price table "
    unknown += pricing.PRICE_TABLE_VERSION
    status = CliRunner().invoke(cli, [*root, "status", "m"])
    assert status.exit_code == 0, status.output
    assert f"  {unknown}; truncated at max_tokens:" in status.stdout
    assert "$0.0000" not in status.stdout
    # --json too: null (unknown), not 0.0 (free), and the documented schema allows it.
    as_json = CliRunner().invoke(cli, [*root, "status", "m", "--json"])
    assert as_json.exit_code == 0, as_json.output
    (job,) = json.loads(as_json.stdout)["jobs"]
    assert job["cost_usd"] is None
    jsonschema.validate(json.loads(as_json.stdout), STATUS_SCHEMA)
    report = CliRunner().invoke(cli, [*root, "report", "m", "--sample", "0"])
    assert report.exit_code == 0, report.output
    assert f"\n{unknown}\n" in report.stdout
    assert "$0.0000" not in report.stdout
    typo = CliRunner().invoke(
        cli, [*root, "estimate", *args, "--model", "claude-haiku-4.5", "--offline"]
    )
    assert typo.exit_code == 2, typo.output
    assert typo.stderr.startswith(
        "error: model 'claude-haiku-4.5' is not in the price table "
        f"{pricing.PRICE_TABLE_VERSION} (did you mean claude-haiku-4-5?), so its cost "
        "cannot be estimated; check --model (priced: claude-3-5-haiku, "
    )


def test_rows_of_a_model_without_a_price_have_no_cost_after_a_resend(
    db_url: str, emulator: Emulator, cli_env: dict[str, str], tmp_path: Path
) -> None:
    """A row answered by a model the price table lacks has cost_usd null (unknown), also
    when an earlier attempt errored or expired for free: not 0.0, which sums as free. And
    once some rows' cost is unknown, `status`, `status --json`, `report` and the end of
    `run` say the job's cost is unknown, even after a re-run moved it to a priced model."""
    upgrade(db_url)  # a PostgreSQL database is migrated before its first use
    emulator.configure(processing_seconds=0.1, errored_rate=0.3, expired_rate=0.1, seed=5)
    src = tmp_path / "docs.jsonl"
    write_docs(src, 30)
    out = tmp_path / "u.parquet"
    common = ["--max-tokens", "16", "--labels", "a,b", "--poll-interval", "0.1"]
    ran = run_batchpipe(
        db_url, cli_env, "run", str(src), "--prompt", "C: {{ body }}", "--id-column", "doc_id",
        "--model", "claude-mythos-preview", "-o", str(out), "--job", "u", *common,
    )  # fmt: skip
    assert "cost unknown: model 'claude-mythos-preview'" in ran.stderr, ran.stderr
    rows = pq.read_table(out).to_pylist()
    answered = [r for r in rows if r["result_status"] == "succeeded"]
    assert {r["attempts"] > 1 for r in answered} == {True, False}  # both kinds are there
    assert [r["cost_usd"] for r in answered] == [None] * len(answered)
    # A row that never got an answer was never billed: $0, known.
    assert {r["cost_usd"] for r in rows if r["result_status"] != "succeeded"} <= {0.0}

    # The same job re-run with a priced model: each row's earlier, unpriced answer was paid
    # for too, so those rows stay unknown, and so does the job's total.
    emulator.configure(errored_rate=0.0, expired_rate=0.0)
    rerun = run_batchpipe(
        db_url, cli_env, "run", "--job", "u", "--model", "claude-haiku-4-5", "--yes", *common
    )
    assert rerun.returncode == 0, rerun.stderr
    unknown = "cost unknown: some answers came from a model not in the price table "
    unknown += pricing.PRICE_TABLE_VERSION
    assert f"  {unknown}" in rerun.stderr
    after = {r["doc_id"]: r for r in pq.read_table(out).to_pylist()}
    for row in answered:
        assert after[row["doc_id"]]["cost_usd"] is None
    never_answered = [r for r in rows if r["result_status"] != "succeeded"]
    for row in never_answered:
        assert after[row["doc_id"]]["cost_usd"] > 0  # free tries, then a priced answer
    status = run_batchpipe(db_url, cli_env, "status", "u")
    assert f"  {unknown}; truncated at max_tokens:" in status.stdout, status.stdout
    as_json = run_batchpipe(db_url, cli_env, "status", "u", "--json")
    (job,) = json.loads(as_json.stdout)["jobs"]
    assert job["cost_usd"] is None
    jsonschema.validate(json.loads(as_json.stdout), STATUS_SCHEMA)
    report = run_batchpipe(db_url, cli_env, "report", "u", "--sample", "0")
    assert f"\n{unknown}\n" in report.stdout, report.stdout
    assert "per 1,000 rows" not in report.stdout


@pytest.mark.parametrize("batch", [True, False])
def test_usage_cost_is_cost_usd_with_the_price_looked_up(batch: bool) -> None:
    """collect prices a line with the model's price looked up once (usage_cost): the same
    float as cost_usd, to the last bit, for any usage."""
    price = pricing.price_for("claude-sonnet-4-5")
    assert price is not None
    for usage in [
        (0, 0, 0, 0),
        (156, 16, 0, 0),
        (None, 7, None, 3),
        (10**6, 1, 2, 3),
        (1, 2, 3, 4),
    ]:
        expected = pricing.cost_usd(
            "claude-sonnet-4-5",
            input_tokens=usage[0],
            output_tokens=usage[1],
            cache_creation_input_tokens=usage[2],
            cache_read_input_tokens=usage[3],
            batch=batch,
        )
        assert pricing.usage_cost(price, *usage, batch=batch) == expected

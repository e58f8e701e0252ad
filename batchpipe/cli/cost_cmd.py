"""`batchpipe estimate`: what a job would cost, before anything is sent."""

from __future__ import annotations

import json
from typing import Any

import click

from batchpipe import pipeline
from batchpipe.cli.app import State, cli, handle_errors
from batchpipe.cli.jobs_cmd import _spec_from, job_options
from batchpipe.cli.wiring import pipeline_context, require_api_key


@cli.command()
@job_options
@click.option("--offline", is_flag=True, help="Approximate tokens locally; no API calls.")
@click.option(
    "--sample",
    type=int,
    default=pipeline.DEFAULT_SAMPLE,
    show_default=True,
    help="Rows whose input tokens are counted by the API (count_tokens).",
)
@click.option(
    "--expected-output-tokens", type=int, help="Output tokens you expect per row (for the mean)."
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
@click.pass_obj
@handle_errors
def estimate(
    state: State,
    /,
    *,
    emulate: bool,
    offline: bool,
    sample: int,
    expected_output_tokens: int | None,
    as_json: bool,
    **kwargs: Any,
) -> None:
    """Estimate a job's cost before running it (same options as `run`; nothing is sent).

    Input tokens are counted by the API on a random sample of rows (or approximated with
    --offline); output is shown as expected and as the maximum (every row at --max-tokens).
    Batch prices (50% off), from the price table named in the output.
    """
    _, spec = _spec_from({**kwargs, "emulate": emulate})
    if not (emulate or offline):
        require_api_key(state)  # after the flags are checked, before any row is read
    with pipeline_context(state, emulate=emulate) as ctx:
        found = pipeline.estimate(
            ctx,
            spec,
            sample=sample,
            offline=offline,
            expected_output_tokens=expected_output_tokens,
        )
    if as_json:
        click.echo(json.dumps(found.as_dict(), indent=2))
        return
    how = (
        f"counted by the API on {found.sampled} sampled row(s)"
        if found.method == "count_tokens"
        else "approximated offline (4 characters per token)"
    )
    click.echo(
        "\n".join(
            [
                f"{found.rows} row(s) to send to {found.model} "
                f"(batch prices, table {found.price_table})",
                f"  input tokens   {found.input_tokens:>12,}  {how}",
                f"  output tokens  {found.expected_output_tokens:>12,}  expected: "
                f"{found.output_assumption}",
                f"                 {found.max_output_tokens:>12,}  "
                "at most (every row at max_tokens)",
                f"  cost expected  ${found.expected_cost_usd:>11,.4f}",
                f"  cost at most   ${found.max_cost_usd:>11,.4f}",
            ]
        )
    )
    if found.invalid_rows:
        outcome = (
            "they will be exported as invalid, unsent"
            if spec.skip_invalid
            else "`run` refuses the job unless --skip-invalid"
        )
        click.echo(
            f"warning: {spec.input}: {found.invalid_rows:,} row(s) fail validation and are "
            f"not priced; {outcome}:\n  " + "\n  ".join(found.invalid_causes),
            err=True,
        )

"""Job options for structured output, caching, truncation and cost; --yes/--dry-run for re-runs."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from batchpipe import pipeline
from batchpipe.cli.app import State
from batchpipe.cli.wiring import pipeline_context, settings_for
from batchpipe.db import sqlite_path
from batchpipe.errors import UsageError
from batchpipe.models import JobSpec
from batchpipe.structured import labels_schema, read_schema_file


def structured_options() -> list[Callable[[Callable[..., Any]], Callable[..., Any]]]:
    """Options added to `job_options` (shared by run, submit and estimate)."""
    return [
        click.option(
            "--labels",
            metavar="A,B,…",
            help="Answer with one of these labels (column `label`), e.g. positive,negative.",
        ),
        click.option(
            "--output-schema",
            "schema_file",
            type=click.Path(path_type=Path),
            help="JSON Schema file of the answer; each property becomes a typed column.",
        ),
        click.option(
            "--output-mode",
            type=click.Choice(["tool", "json"]),
            help="Ask for the schema with a forced tool (default) or JSON output.",
        ),
        click.option(
            "--cache-system",
            is_flag=True,
            default=None,
            help="Mark the system prompt cacheable (cache_control ephemeral).",
        ),
        click.option(
            "--retry-truncated-max-tokens",
            type=int,
            metavar="N",
            help="Send answers cut at max_tokens once more with max_tokens N.",
        ),
        click.option(
            "--max-cost",
            type=float,
            metavar="USD",
            help="Budget: refuse or stop submitting before the cost would pass it.",
        ),
    ]


def confirm_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--yes and --dry-run, for a known job whose requests the new settings change."""
    func = click.option(
        "--dry-run",
        is_flag=True,
        help="Only count the rows a settings change would send again; print the count.",
    )(func)
    return click.option(
        "--yes", is_flag=True, help="Send the rows whose request changed (template, model …)."
    )(func)


def output_schema_from(labels: str | None, schema_file: Path | None) -> dict[str, Any] | None:
    """The output schema from --labels or --output-schema (not both); None for neither."""
    if labels and schema_file:
        raise UsageError("give --labels or --output-schema, not both")
    if labels:
        return labels_schema(labels.split(","))
    if schema_file is None:
        return None
    return read_schema_file(schema_file, "--output-schema")


def job_name_for(ctx: pipeline.Context, name: str | None, spec: JobSpec) -> str:
    """The job's name: the one given, or the default, unless that would redo another job.

    A default name hashes the settings, so changing the prompt and running the same command
    would start a new job that pays for every row again. When another job already wrote
    this output from this input, stop and say how to re-run only what changed.
    """
    if name is not None:
        return name
    name = pipeline.default_job_name(spec, emulated=ctx.emulated)
    earlier = pipeline.earlier_job(ctx, name, spec)
    if earlier is not None:
        job, fields = earlier
        differ = f"different {', '.join(fields)}" if fields else "other settings"
        raise UsageError(
            f"job {job.id} ({job.name}) already ran this input into {spec.output}, with "
            f"{differ}; without --job this command would start a new job that sends "
            f"(and pays for) every row again and overwrites that output. To send only the "
            f"rows whose request changed, add --job {job.name} (with --dry-run to count "
            "them first); to keep both, give this job its own -o or --job NAME"
        )
    return name


def stored_spec(state: State, name: str) -> JobSpec | None:
    """The settings job ``name`` holds now, or None when there is no such job.

    A state database that does not exist yet is not created to look (see dbcheck).
    """
    path = sqlite_path(settings_for(state).database_url)
    if path is not None and not path.exists():
        return None
    with pipeline_context(state) as ctx:
        job = ctx.store.get_job(name)
    return None if job is None else JobSpec.model_validate(job.spec)


def parse_params(values: tuple[str, ...]) -> dict[str, Any] | None:
    """``--param KEY=JSON`` values as a dict (a bare word is a string); None for none."""
    params: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--param {item!r}: expected KEY=VALUE (VALUE as JSON, e.g. top_k=5)")
        try:
            params[key] = json.loads(raw)
        except json.JSONDecodeError as exc:
            if raw.lstrip()[:1] in {"[", "{", '"'}:
                # Meant as JSON and broken: sent as a string, every request would come back
                # errored, and only after the batch's wait.
                raise UsageError(
                    f"--param {key}: {raw!r} is not valid JSON ({exc.msg} at character "
                    f"{exc.pos + 1}); quote it for the shell, e.g. --param '{key}=[\"a\"]'"
                ) from None
            params[key] = raw  # a bare word is a string: --param service_tier=auto
    return params or None

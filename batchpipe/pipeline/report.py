"""A job's report for analysts: labels, outcomes, attempts, cost and a sample to review.

Plain data (a :class:`Report`); the CLI renders it as text or as a self-contained HTML page.
Everything comes from the store, streamed once (label counts, a reservoir sample of rows);
the sampled rows' input columns are read back from the input, when it is still the file
the job was ingested from.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson

from batchpipe import jsontext, pricing
from batchpipe.dataset import Dataset
from batchpipe.db import ItemRow, JobRow
from batchpipe.errors import InputError, StoreError
from batchpipe.models import ItemStatus
from batchpipe.pipeline.context import Context, job_spec
from batchpipe.pipeline.fingerprint import check_fingerprint
from batchpipe.pipeline.outcome import output_schema

_TEXT_LIMIT = 300  # characters of an input or answer shown per sampled row
# More distinct answers than this are free text, not a label set: no distribution is shown,
# and counting stops (a counter of a million distinct answers would grow with the job).
MAX_LABELS = 50


@dataclass
class Report:
    """Everything `batchpipe report` shows about one job."""

    job_id: int
    job_name: str
    status: str
    model: str
    rows: int
    label_field: str | None
    labels: list[tuple[str, int]]  # empty when there were more than MAX_LABELS distinct
    too_many_labels: bool
    statuses: list[tuple[str, str | None, int]]
    attempts: dict[int, int]
    truncated: int
    cost_usd: float | None  # None when the price table lacks the model (see cost_unknown)
    cost_per_1000_rows: float | None
    usage: dict[str, int]
    cost_unknown: str | None = None  # why the cost is unknown, when it is
    error: str | None = None  # why the job stopped (failed, needs attention), as status says
    price_table: str = pricing.PRICE_TABLE_VERSION
    sample: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return dict(self.__dict__)


def _label_of(item: ItemRow, field_name: str | None) -> str | None:
    if item.status is not ItemStatus.SUCCEEDED or item.response_text is None:
        return None
    if field_name is None:
        return item.response_text.strip()[:60] or None
    try:
        value = orjson.loads(item.response_text).get(field_name)
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return None if value is None else str(value)


def _clip(value: Any) -> str:
    """A value as the sample shows it: text as it is, numbers and nested values as JSON,
    anything else (a time, a decimal) as its own text, never quoted twice."""
    if isinstance(value, str):
        text = value
    elif value is None or isinstance(value, bool | int | float | dict | list):
        # jsontext: a row's integer may be wider than orjson writes (a 24-digit id, say).
        text = jsontext.dumps(value, default=str).decode()
    else:
        text = str(value)
    return text if len(text) <= _TEXT_LIMIT else text[: _TEXT_LIMIT - 1] + "…"


def build_report(ctx: Context, job: JobRow, *, sample: int = 10, seed: int = 0) -> Report:
    """Gather the report for ``job``; ``sample`` rows are drawn at random (seeded)."""
    spec = job_spec(job)
    outputs = output_schema(spec)
    # The label column: the first string-typed field of the schema (``label`` for --labels).
    label_field = None
    if outputs is not None:
        label_field = next((n for n, t in outputs.columns() if t == "string"), None)
    labels: Counter[str] | None = Counter()
    rng = random.Random(seed)
    chosen: list[ItemRow] = []
    for seen, item in enumerate(ctx.store.iter_items(job.id), start=1):
        if labels is not None and (label_field or outputs is None):
            label = _label_of(item, label_field)
            if label is not None:
                labels[label] += 1
                if len(labels) > MAX_LABELS:
                    labels = None
        if len(chosen) < sample:
            chosen.append(item)
        elif (j := rng.randrange(seen)) < sample:
            chosen[j] = item
    chosen.sort(key=lambda i: i.row_index)
    totals = ctx.store.job_totals(job.id)
    answered = sum(n for a, n in ctx.store.attempts_histogram(job.id).items() if a > 0)
    inputs = _input_rows(job, {i.row_index for i in chosen})
    rows = []
    for item in chosen:
        row = inputs.get(item.row_index, {})
        rows.append(
            {
                # Counted from 1, as validation messages and editors count lines.
                "row": item.row_index + 1,
                # A row without a usable id has a blank stand-in key (requests.standin_key).
                "key": item.row_key if item.row_key.strip() else None,
                "status": item.status.value,
                "label": _label_of(item, label_field),
                "answer": _clip(item.response_text) if item.response_text else None,
                "error": item.error_message,
                "input": {k: _clip(v) for k, v in row.items()},
                "cost_usd": item.cost_usd,
            }
        )
    # Rows of a model the price table lacks have no cost_usd: a total of the others (or $0)
    # would read as all that was paid.
    unknown = pricing.unknown_cost(spec.model, totals.unpriced > 0)
    return Report(
        job_id=job.id,
        job_name=job.name,
        status=job.status.value,
        model=spec.model,
        rows=job.row_count,
        label_field=label_field,
        labels=labels.most_common() if labels is not None else [],
        too_many_labels=labels is None,
        statuses=ctx.store.status_breakdown(job.id),
        attempts=ctx.store.attempts_histogram(job.id),
        truncated=totals.truncated,
        cost_usd=None if unknown else totals.cost_usd,
        cost_per_1000_rows=totals.cost_usd / answered * 1000 if answered and not unknown else None,
        usage=totals.usage,
        cost_unknown=unknown,
        error=job.error,
        sample=rows,
    )


def _input_rows(job: JobRow, wanted: set[int]) -> dict[int, dict[str, Any]]:
    """The input rows at ``wanted`` indexes; empty if the input is gone or changed."""
    if not wanted:
        return {}
    spec = job_spec(job)
    try:
        dataset = Dataset(spec.input, spec.input_format)
        check_fingerprint(dataset, job)
    except (InputError, StoreError, OSError):
        return {}
    found: dict[int, dict[str, Any]] = {}
    index = 0
    last = max(wanted)
    for chunk in dataset.iter_rows():
        for row in chunk:
            if index in wanted:
                found[index] = row
            index += 1
        if index > last:
            break
    return found

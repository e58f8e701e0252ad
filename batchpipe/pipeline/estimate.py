"""What a job will cost before it is sent: input tokens counted or approximated, output bounded.

Input tokens come from the API's count_tokens endpoint on a random sample of rows (the
emulator answers it too), scaled to the whole input by the sample's tokens per request byte,
so long and short rows weigh right; a sample as large as the input gives the exact count.
``offline`` approximates instead (one token per four characters of the request, no calls).

Output is given two ways: the *maximum* (every row uses its whole ``max_tokens``, the bound a
budget can rely on) and the *expected* (``expected_output_tokens`` per row if given; for an
output schema, the size of a typical answer; otherwise half of ``max_tokens``, an assumption
the result says it made). Prices are the batch prices of :mod:`batchpipe.pricing`.
"""

from __future__ import annotations

import contextlib
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

from batchpipe import pricing
from batchpipe.dataset import Dataset
from batchpipe.db import ScratchKeys
from batchpipe.errors import UsageError
from batchpipe.log import get_logger
from batchpipe.models import COUNT_TOKENS_KEYS, JobSpec
from batchpipe.pipeline.context import Context
from batchpipe.pipeline.ingest import (
    check_chunks,
    check_columns,
    describe_problem,
    duplicates_error,
)
from batchpipe.pipeline.preflight import check_output_limit
from batchpipe.pipeline.problems import ProblemTally
from batchpipe.requests import RequestRenderer, RowProblem
from batchpipe.structured import TOOL_NAME

log = get_logger(__name__)

DEFAULT_SAMPLE = 50
_TYPICAL = {"string": "a typical short answer", "integer": 1234, "number": 12.5, "boolean": True}


@dataclass(frozen=True)
class Estimate:
    """A job's expected and maximum cost, with what they rest on."""

    model: str
    rows: int
    sampled: int
    method: str  # count_tokens | offline
    input_tokens: int
    expected_output_tokens: int
    max_output_tokens: int
    output_assumption: str
    input_cost_usd: float
    expected_cost_usd: float
    max_cost_usd: float
    price_table: str = pricing.PRICE_TABLE_VERSION
    batch_discount: float = pricing.BATCH_DISCOUNT
    # Rows that fail validation (not priced: the run refuses them, or with --skip-invalid
    # never sends them), what the first of them says, and one line per cause
    # ("3 rows: column 'body' is null (rows 1, 4, 9)", as the run's refusal lists them).
    invalid_rows: int = 0
    first_invalid: str | None = None
    invalid_causes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return asdict(self)


def _typical_answer(prop: Any) -> Any:
    if not isinstance(prop, dict):
        return "x"
    if "enum" in prop:
        return max((str(v) for v in prop["enum"]), key=len, default="x")
    kind = prop.get("type")
    if kind == "object":
        return {k: _typical_answer(v) for k, v in (prop.get("properties") or {}).items()}
    if kind == "array":
        return [_typical_answer(prop.get("items")), _typical_answer(prop.get("items"))]
    return _TYPICAL.get(str(kind), "x")


def expected_output(spec: JobSpec, given: int | None) -> tuple[int, str]:
    """Expected output tokens per row and the assumption behind the number."""
    if given is not None:
        return min(given, spec.max_tokens), "as given (--expected-output-tokens)"
    if spec.output_schema is not None:
        answer = orjson.dumps(_typical_answer(spec.output_schema))
        tokens = pricing.approx_tokens(answer) + (
            pricing.approx_tokens(TOOL_NAME) if spec.output_mode == "tool" else 0
        )
        return min(tokens, spec.max_tokens), "a typical answer for the output schema"
    return max(1, spec.max_tokens // 2), "half of max_tokens (set --expected-output-tokens)"


def _text_of(value: Any) -> int:
    """Characters of prompt text in a system or message content (string or blocks)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(
            len(b["text"]) if b.get("type") == "text" else len(orjson.dumps(b))
            for b in value
            if isinstance(b, dict)
        )
    return 0


def _counted(params: dict[str, Any]) -> int:
    """Characters of what count_tokens sees: prompt texts, tool and format definitions."""
    size = _text_of(params.get("system"))
    size += sum(_text_of(m.get("content")) for m in params.get("messages", []))
    for key in sorted(COUNT_TOKENS_KEYS - {"model", "messages", "system"}):
        if key in params:
            size += len(orjson.dumps(params[key]))
    return size


@dataclass
class _Scan:
    """What one pass over the input found: valid rows, their sample, the invalid ones."""

    reservoir: list[dict[str, Any]] = field(default_factory=list)
    rows: int = 0
    total_bytes: int = 0
    invalid: int = 0
    first_invalid: str | None = None
    problems: ProblemTally = field(default_factory=ProblemTally)


def _scan(
    dataset: Dataset,
    spec: JobSpec,
    renderer: RequestRenderer,
    *,
    sample: int,
    seed: int,
    keys: ScratchKeys | None,
) -> _Scan:
    """Check every row as ingest would, keep a uniform sample of the valid rows' requests,
    and put each row's key in ``keys`` (when given) for the duplicate check."""
    rng = random.Random(seed)
    found = _Scan()
    for first_row, checked_rows in check_chunks(dataset, spec, renderer):
        chunk_keys: list[tuple[int, str]] = []
        for row_index, checked in enumerate(checked_rows, first_row):
            if isinstance(checked, RowProblem):
                found.invalid += 1
                found.first_invalid = found.first_invalid or describe_problem(checked)
                found.problems.add(checked)
                if checked.row_key is not None:  # a bad request, a good id: ingest keeps it
                    chunk_keys.append((row_index, checked.row_key))
                continue
            key, params = checked
            assert params is not None  # check_chunks builds the requests by default
            chunk_keys.append((row_index, key))
            found.rows += 1
            found.total_bytes += _counted(params)
            # Reservoir sampling: a uniform sample in one pass and bounded memory.
            if len(found.reservoir) < sample:
                found.reservoir.append(params)
            elif (j := rng.randrange(found.rows)) < sample:
                found.reservoir[j] = params
        if keys is not None:
            keys.add(chunk_keys)
    return found


def estimate(
    ctx: Context,
    spec: JobSpec,
    *,
    sample: int = DEFAULT_SAMPLE,
    offline: bool = False,
    expected_output_tokens: int | None = None,
    seed: int = 0,
    check_ids: bool = True,
) -> Estimate:
    """Estimate the job's cost; streams the input once. Rows that fail validation are not
    priced; the estimate counts them (``invalid_rows``).

    With an id column, an input that repeats ids is refused as ingest refuses it
    (PreflightFailed, same message): the job could not start. ``check_ids=False`` skips that
    for a job already ingested, which was checked then.
    """
    price = pricing.price_for(spec.model)
    if price is None:
        raise UsageError(
            f"{pricing.unpriced(spec.model)}, so its cost cannot be estimated; check --model "
            f"(priced: {', '.join(sorted(pricing.PRICES))})"
        )
    check_output_limit(spec)  # the run would refuse it: no estimate of a job that cannot start
    dataset = Dataset(spec.input, spec.input_format)
    # The columns as the run would check them: an estimate of a job that cannot start
    # (an --id-column or template column the input lacks) is refused the same way.
    renderer = RequestRenderer(spec)
    check_columns(dataset, spec, renderer)
    with contextlib.ExitStack() as stack:
        keys = stack.enter_context(ScratchKeys()) if spec.id_column and check_ids else None
        scan = _scan(dataset, spec, renderer, sample=sample, seed=seed, keys=keys)
        duplicates = keys.duplicates() if keys is not None else []
    if duplicates:
        raise duplicates_error(dataset, spec, duplicates)
    reservoir, rows, total_bytes = scan.reservoir, scan.rows, scan.total_bytes
    if offline or not reservoir:
        input_tokens = pricing.approx_tokens(total_bytes)
        method = "offline"
    else:
        started = time.perf_counter()
        counted = sum(ctx.client.count_tokens(p) for p in reservoir)
        # One line for the whole sample (each call's own line is at debug).
        log.info(
            "estimate.tokens_counted",
            calls=len(reservoir),
            input_tokens=counted,
            latency_ms=round((time.perf_counter() - started) * 1000),
        )
        sample_bytes = sum(_counted(p) for p in reservoir) or 1
        input_tokens = (
            counted if len(reservoir) == rows else round(counted * total_bytes / sample_bytes)
        )
        method = "count_tokens"
    per_row, assumption = expected_output(spec, expected_output_tokens)
    # A cacheable system prompt may be written to the cache by any row: price the bound so.
    input_rate = price.cache_write if spec.cache_system else price.input
    input_cost = pricing.BATCH_DISCOUNT * input_tokens * price.input / 1e6
    max_input_cost = pricing.BATCH_DISCOUNT * input_tokens * input_rate / 1e6
    out_rate = pricing.BATCH_DISCOUNT * price.output / 1e6
    return Estimate(
        model=spec.model,
        rows=rows,
        sampled=len(reservoir) if method == "count_tokens" else 0,
        method=method,
        input_tokens=input_tokens,
        expected_output_tokens=per_row * rows,
        max_output_tokens=spec.max_tokens * rows,
        output_assumption=assumption,
        input_cost_usd=input_cost,
        expected_cost_usd=input_cost + per_row * rows * out_rate,
        max_cost_usd=max_input_cost + spec.max_tokens * rows * out_rate,
        invalid_rows=scan.invalid,
        first_invalid=scan.first_invalid,
        invalid_causes=scan.problems.lines(dataset) if scan.invalid else [],
    )

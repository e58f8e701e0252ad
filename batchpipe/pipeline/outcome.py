"""What a succeeded answer means for its row: price, schema check, truncation retry.

`collect` classifies a result by the API's result type; this module refines that for
structured output and truncation and prices every attempt:

- **cost**: a succeeded answer costs its usage at batch prices (cache tokens included); an
  errored, expired or canceled request is not billed (0).
- **truncation**: an answer that stopped at ``max_tokens`` is sent once more with
  ``retry_truncated_max_tokens`` when the job allows it. Whether this answer was already that
  retry is read from its usage: a cut answer used exactly its ``max_tokens``, so fewer output
  tokens than the retry limit means it was cut at the job's original limit.
- **schema**: with an output schema, the answer is checked; one that does not fit becomes
  ``invalid_output`` with the reason (nothing is dropped silently).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Final

from batchpipe import pricing
from batchpipe.models import (
    TRUNCATED_STOP_REASON,
    ItemStatus,
    JobSpec,
    PlainSuccess,
    ResultRecord,
    ResultType,
)
from batchpipe.requests import own_id_reader
from batchpipe.structured import OutputSchema

TRUNCATED = TRUNCATED_STOP_REASON
_UNSEEN: Final = pricing.ModelPrice(-1.0, -1.0, -1.0, -1.0)  # a model not looked up yet
# Models whose price a reader keeps: a job sees one or two; a file naming thousands
# (not an API's) must not grow memory.
_PRICES_KEPT = 16


def output_schema(spec: JobSpec) -> OutputSchema | None:
    """The job's output schema, if it has one."""
    if spec.output_schema is None:
        return None
    return OutputSchema(spec.output_schema, spec.output_mode)


def refine(
    record: ResultRecord,
    row_index: int,
    attempt: int,
    status: ItemStatus,
    spec: JobSpec,
    *,
    outputs: OutputSchema | None,
    user_canceled: bool,
) -> ResultRecord:
    """Complete ``record`` as the update of its item, in place, and return it: its row,
    attempt and price, and ``status`` as classified, refined by the schema and truncation
    decisions."""
    cost: float | None = 0.0  # errored, expired and canceled requests are not billed
    if record.result_type is ResultType.SUCCEEDED:
        cost = pricing.cost_usd(
            record.model or spec.model,
            input_tokens=record.input_tokens,
            output_tokens=record.output_tokens,
            cache_creation_input_tokens=record.cache_creation_input_tokens,
            cache_read_input_tokens=record.cache_read_input_tokens,
        )
        limit = spec.retry_truncated_max_tokens
        if (
            record.stop_reason == TRUNCATED
            and limit is not None
            and (record.output_tokens or 0) < limit
            and not user_canceled
        ):
            # Pending with stop_reason kept: submit sends it again with the larger max_tokens.
            status = ItemStatus.PENDING
        elif outputs is not None:
            record.response_text, reason = outputs.extract(
                record.content, record.response_text, record.stop_reason
            )
            if reason is not None:
                status = ItemStatus.INVALID_OUTPUT
                record.error_type, record.error_message = "invalid_output", reason
    # Read: the blocks need not wait in the store's buffer with the record.
    record.content = None
    record.row_index = row_index
    record.attempt = attempt
    record.status = status
    record.cost_usd = cost
    return record


def may_resize(stop_reasons: Iterable[str | None], spec: JobSpec) -> bool:
    """Whether :func:`request_for` may give one of the items whose last answers stopped for
    ``stop_reasons`` other params than its row renders to (read only when it can)."""
    return spec.retry_truncated_max_tokens is not None and TRUNCATED in stop_reasons


def request_for(stop_reason: str | None, params: dict[str, Any], spec: JobSpec) -> dict[str, Any]:
    """The params to send for an item whose last answer stopped for ``stop_reason``: a
    truncated answer's retry gets the larger max_tokens."""
    limit = spec.retry_truncated_max_tokens
    if limit is not None and stop_reason == TRUNCATED and limit > params["max_tokens"]:
        return {**params, "max_tokens": limit}
    return params


def plain_reader(token: str, spec: JobSpec) -> Callable[[dict[str, Any]], PlainSuccess | None]:
    """A reader of the commonest line, straight from its JSON object: a success of job
    ``token`` with one text block, for a job without an output schema, that is not a
    truncated answer the job may retry. The reader gives None for any other line, which then
    takes the general path (a ResultRecord, ``classify`` and :func:`refine`), with the same
    outcome for the lines taken here.

    Skipping the record and the calls per line took collect's CPU for a million answers
    from 8.8 to 7.1 s on SQLite (one round, bench/bench_pipeline.py). One reader per batch
    holds what is the same for every line: the id reader of the job's token
    (``requests.own_id_reader``) and each model's price, looked up once.
    """
    own_id = own_id_reader(token)
    retry_cut = spec.retry_truncated_max_tokens is not None
    default_model = spec.model
    prices: dict[Any, pricing.ModelPrice | None] = {}
    usage_cost = pricing.usage_cost

    def read(obj: dict[str, Any]) -> PlainSuccess | None:
        result = obj["result"]
        if result["type"] != "succeeded":
            return None
        message = result.get("message")
        content = message.get("content") if type(message) is dict else None
        if type(content) is not list or len(content) != 1:
            return None
        block = content[0]
        text = block.get("text") if type(block) is dict and block.get("type") == "text" else None
        custom_id = obj["custom_id"]
        if type(text) is not str or type(custom_id) is not str:
            return None
        stop_reason = message.get("stop_reason")
        if stop_reason == TRUNCATED and retry_cut:
            return None
        ids = own_id(custom_id)
        if ids is None:
            return None
        model = message.get("model")
        usage = message.get("usage") or {}
        # Four names, not a tuple unpacked twice: the result is built in one step.
        inp = usage.get("input_tokens")
        out = usage.get("output_tokens")
        cache_write = usage.get("cache_creation_input_tokens")
        cache_read = usage.get("cache_read_input_tokens")
        priced_as = model or default_model
        # As pricing.cost_usd prices it (price_for, usage_cost), the lookup kept per model.
        price = prices.get(priced_as, _UNSEEN)
        if price is _UNSEEN:
            price = pricing.price_for(priced_as)
            if len(prices) < _PRICES_KEPT:
                prices[priced_as] = price
        cost = None if price is None else usage_cost(price, inp, out, cache_write, cache_read)
        row, attempt = ids
        return (row, custom_id, attempt, text, stop_reason, model, inp, out, cache_write,
                cache_read, cost)  # fmt: skip

    return read

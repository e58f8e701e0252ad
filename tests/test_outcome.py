"""The commonest results line read without a record gives what the general path gives."""

from __future__ import annotations

from typing import Any

import pytest

from batchpipe.client.lines import record_from
from batchpipe.models import ItemStatus, JobSpec
from batchpipe.pipeline.collect import classify
from batchpipe.pipeline.outcome import plain_reader, refine
from batchpipe.requests import parse_custom_id

TOKEN = "0123456789"
SPEC = JobSpec(input="in.jsonl", prompt="{{ text }}", model="claude-haiku-4-5", max_tokens=50)


def line(custom_id: str = f"{TOKEN}-7-2", **message: Any) -> dict[str, Any]:
    """A succeeded line; ``message`` overrides fields of a one-text-block answer."""
    body: dict[str, Any] = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-haiku-4-5-20251001",
        "content": [{"type": "text", "text": "positive"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 120,
            "output_tokens": 3,
            "cache_creation_input_tokens": 10,
            "cache_read_input_tokens": 20,
        },
    }
    body.update(message)
    return {"custom_id": custom_id, "result": {"type": "succeeded", "message": body}}


def general(obj: dict[str, Any], spec: JobSpec) -> tuple[Any, ...]:
    """What collect's general path stores for ``obj``: the record after classify and refine."""
    record = record_from(obj, keep_content=False)
    parsed = parse_custom_id(record.custom_id)
    assert parsed is not None
    _, row, attempt = parsed
    status = classify(record, attempt, spec.max_attempts, user_canceled=False)
    r = refine(record, row, attempt, status, spec, outputs=None, user_canceled=False)
    assert r.status is ItemStatus.SUCCEEDED
    return (
        r.row_index, r.custom_id, r.attempt, r.response_text, r.stop_reason, r.model,
        r.input_tokens, r.output_tokens, r.cache_creation_input_tokens,
        r.cache_read_input_tokens, r.cost_usd,
    )  # fmt: skip


@pytest.mark.parametrize(
    "obj",
    [
        line(),
        line(content=[{"type": "text", "text": ""}]),  # an empty answer is still an answer
        line(usage={"input_tokens": 5, "output_tokens": 1}),  # no cache fields
        line(usage=None),
        line(model="a-model-without-a-price"),  # unpriced: cost None
        line(model=None),  # priced as the job's model
        line(stop_reason="max_tokens"),  # cut, but the job does not retry cut answers
        line(stop_reason="stop_sequence", stop_sequence="###"),
    ],
)
def test_a_plain_success_is_stored_as_the_general_path_would_store_it(obj: dict[str, Any]) -> None:
    fast = plain_reader(TOKEN, SPEC)(obj)
    assert fast is not None
    assert fast == general(obj, SPEC)


def test_the_usual_answer_is_row_attempt_text_usage_and_batch_price() -> None:
    fast = plain_reader(TOKEN, SPEC)(line())
    assert fast is not None
    row, custom_id, attempt, text, stop, model, *tokens, cost = fast
    assert (row, custom_id, attempt, text, stop) == (7, f"{TOKEN}-7-2", 2, "positive", "end_turn")
    assert (model, tokens) == ("claude-haiku-4-5-20251001", [120, 3, 10, 20])
    assert cost is not None
    assert cost > 0


@pytest.mark.parametrize(
    ("obj", "spec"),
    [
        # Several blocks, no text, a tool call: the general path joins or keeps them.
        (line(content=[{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]), SPEC),
        (line(content=[]), SPEC),
        (line(content=[{"type": "tool_use", "id": "t", "name": "f", "input": {}}]), SPEC),
        (line(content=[{"type": "text", "text": None}]), SPEC),
        # A cut answer the job sends again with more tokens: refine decides.
        (
            line(stop_reason="max_tokens"),
            SPEC.model_copy(update={"retry_truncated_max_tokens": 99}),
        ),
        # Another job's line, or not one of ours at all: counted as foreign by the general path.
        (line(custom_id="9999999999-7-2"), SPEC),
        (line(custom_id="someone-else"), SPEC),
        (line(custom_id=7), SPEC),  # type: ignore[arg-type]
        # Not a success.
        ({"custom_id": f"{TOKEN}-1-1", "result": {"type": "expired"}}, SPEC),
        (
            {
                "custom_id": f"{TOKEN}-1-1",
                "result": {
                    "type": "errored",
                    "error": {
                        "type": "error",
                        "error": {"type": "overloaded_error", "message": "x"},
                    },
                },
            },
            SPEC,
        ),
    ],
)
def test_any_other_line_takes_the_general_path(obj: dict[str, Any], spec: JobSpec) -> None:
    assert plain_reader(TOKEN, spec)(obj) is None


def test_one_reader_prices_each_model_as_the_general_path_does() -> None:
    """The reader keeps each model's price after its first line; lines of several models,
    priced and not, in any order, still cost what the general path says."""
    read = plain_reader(TOKEN, SPEC)
    models = ["claude-haiku-4-5", "claude-opus-4-1-x", None, "unpriced-model", "", "claude-3-haiku"]
    for n, model in enumerate(models * 3):
        obj = line(f"{TOKEN}-{n}-1", model=model, usage={"input_tokens": n, "output_tokens": 7})
        assert read(obj) == general(obj, SPEC)


def test_a_model_that_is_not_a_string_fails_as_on_the_general_path() -> None:
    """A malformed model (not an API's answer) raises the error the general path raises."""
    obj = line(model=["claude-haiku-4-5"])
    with pytest.raises(TypeError):
        general(obj, SPEC)
    with pytest.raises(TypeError):
        plain_reader(TOKEN, SPEC)(obj)

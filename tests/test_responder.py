"""The emulator's responder: deterministic answers, validation, tool/JSON output and caching.

Every Message produced here is checked against the ``Message`` schema of the reference
OpenAPI spec, and every generated tool input / JSON answer against its own schema.
"""

from __future__ import annotations

import copy
import json
import threading
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from batchpipe.emulator import responder
from batchpipe.emulator.responder import (
    InvalidParams,
    PromptCache,
    approx_tokens,
    count_tokens,
    expected_text,
    validate_params,
)
from batchpipe.emulator.schema_values import value_for
from batchpipe.emulator.settings import KNOWN_MODELS

SPEC_PATH = Path(__file__).resolve().parents[2] / "shared/reference/anthropic-openapi-subset.json"
MODEL = "claude-haiku-4-5"


@pytest.fixture(scope="module")
def message_validator() -> Draft202012Validator:
    if not SPEC_PATH.exists():
        pytest.skip(f"reference spec not found at {SPEC_PATH}")
    spec = json.loads(SPEC_PATH.read_text())
    root = {"$ref": "#/components/schemas/Message", "components": spec["components"]}
    return Draft202012Validator(root)


@pytest.fixture
def respond(message_validator: Draft202012Validator) -> Any:
    """``responder.respond`` that also checks the Message against the spec, every time."""

    def call(params: dict[str, Any], cache: PromptCache | None = None) -> dict[str, Any]:
        before = copy.deepcopy(params)
        message = responder.respond(params, cache=cache if cache is not None else PromptCache())
        message_validator.validate(message)
        assert json.loads(json.dumps(message)) == message  # plain JSON, ready for a result line
        assert params == before, "respond() must not mutate the request"
        return message

    return call


def counted(params: dict[str, Any]) -> int:
    """``count_tokens`` for a create body (count_tokens takes no max_tokens)."""
    return count_tokens({k: v for k, v in params.items() if k != "max_tokens"})


def req(content: Any = "What is the capital of France?", **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "max_tokens": 256,
        "messages": [{"role": "user", "content": content}],
        **extra,
    }


# ---------------------------------------------------------------- plain text answers


def test_same_request_same_answer(respond: Any) -> None:
    params = req(system="Be terse.")
    first, second = respond(params), respond(copy.deepcopy(params))
    assert first == second
    assert first["id"].startswith("msg_01")
    assert len(first["id"]) == 28
    assert first["model"] == MODEL
    assert first["usage"]["service_tier"] == "batch"


def test_answer_is_pinned() -> None:
    # A golden value: answers must not drift between releases (or Python versions), or
    # recorded fixtures and benchmarks elsewhere silently stop matching.
    assert expected_text(req("Translate 'good morning' into French, please.")) == (
        "Answer 6d2f3e4e6442: Translate good morning into French."
    )
    assert expected_text({**req("hello there number 4"), "model": "m"}) == (
        "Answer 689b2784b728: hello there number in is plus form so about and it topic reply "
        "with short."
    )


def test_distinct_prompts_get_distinct_answers_of_varied_length(respond: Any) -> None:
    texts, ids, lengths = set(), set(), set()
    for i in range(2000):
        message = respond(req(f"Summarise review number {i} in one line"))
        text = message["content"][0]["text"]
        assert text == expected_text(req(f"Summarise review number {i} in one line"))
        assert "Summarise" in text  # it echoes the prompt
        texts.add(text)
        ids.add(message["id"])
        lengths.add(message["usage"]["output_tokens"])
    assert len(texts) == 2000
    assert len(ids) == 2000
    assert min(lengths) <= 10
    assert max(lengths) >= 35


def test_answer_depends_on_model_system_and_history() -> None:
    base = req("Hello there")
    variants = [
        base,
        {**base, "model": "claude-sonnet-4-5"},
        {**base, "system": "You are a pirate."},
        {**base, "messages": [*base["messages"], {"role": "assistant", "content": "Arr"}]},
        {**base, "messages": [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}]},
    ]
    assert len({expected_text(v) for v in variants}) == len(variants)
    # Params that do not shape the prompt do not change the answer.
    assert expected_text({**base, "max_tokens": 7, "temperature": 0.5}) == expected_text(base)


def test_end_turn_reports_output_tokens(respond: Any) -> None:
    message = respond(req())
    text = message["content"][0]["text"]
    assert message["stop_reason"] == "end_turn"
    assert message["stop_sequence"] is None
    assert text == expected_text(req())
    assert message["usage"]["output_tokens"] == approx_tokens(text)
    assert message["content"][0]["citations"] is None


def test_max_tokens_truncates(respond: Any) -> None:
    full = expected_text(req())
    assert approx_tokens(full) > 3
    message = respond(req(max_tokens=3))
    assert message["stop_reason"] == "max_tokens"
    assert message["content"][0]["text"] == full[:12]
    assert message["usage"]["output_tokens"] == 3


def test_answer_exactly_at_max_tokens_is_end_turn(respond: Any) -> None:
    full = expected_text(req())
    message = respond(req(max_tokens=approx_tokens(full)))
    assert message["stop_reason"] == "end_turn"
    assert message["content"][0]["text"] == full


def test_stop_sequence_cuts_at_earliest(respond: Any) -> None:
    full = expected_text(req())  # "Answer <12 hex>: What ... ."
    late, early = full.split()[-1].rstrip("."), full[10:14]
    message = respond(req(stop_sequences=[late, early, "not-in-text"]))
    assert message["stop_reason"] == "stop_sequence"
    assert message["stop_sequence"] == early
    assert message["content"][0]["text"] == full[:10]
    assert message["usage"]["output_tokens"] == approx_tokens(full[:10])


def test_stop_sequence_from_the_prompt(respond: Any) -> None:
    # The answer always echoes the prompt's first word, so a prompt word can stop it.
    message = respond(req("Zanzibar is an island", stop_sequences=["Zanzibar"]))
    assert message["stop_reason"] == "stop_sequence"
    assert message["content"][0]["text"] == expected_text(req("Zanzibar is an island"))[:21]


def test_stop_sequence_beyond_budget_is_max_tokens(respond: Any) -> None:
    full = expected_text(req())
    last = full.split()[-1].rstrip(".")
    message = respond(req(stop_sequences=[last], max_tokens=full.index(last) // 4))
    assert message["stop_reason"] == "max_tokens"
    assert message["stop_sequence"] is None


def test_approx_tokens() -> None:
    assert [approx_tokens("x" * n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


# ---------------------------------------------------------------- validation

VALID = req()


def _with(**changes: Any) -> dict[str, Any]:
    params = copy.deepcopy(VALID)
    for key, value in changes.items():
        if value is _DROP:
            del params[key]
        else:
            params[key] = value
    return params


_DROP = object()
_TOOL = {"name": "lookup", "input_schema": {"type": "object"}}

INVALID: list[tuple[object, str]] = [
    ("not an object", "params: Input should be a valid dictionary or object"),
    (["a", "list"], "params: Input should be a valid dictionary or object"),
    (_with(model=_DROP), "model: Field required"),
    (_with(max_tokens=_DROP), "max_tokens: Field required"),
    (_with(messages=_DROP), "messages: Field required"),
    (_with(model=7), "model: Input should be a valid string"),
    (_with(max_tokens=0), "max_tokens: Input should be greater than 0"),
    (_with(max_tokens=-5), "max_tokens: Input should be greater than 0"),
    (_with(max_tokens="10"), "max_tokens: Input should be a valid integer"),
    (_with(max_tokens=True), "max_tokens: Input should be a valid integer"),
    (_with(max_tokens=2.5), "max_tokens: Input should be a valid integer"),
    (
        _with(max_tokens=64_001),
        "max_tokens: 64001 > 64000, which is the maximum allowed number of output tokens for "
        "claude-haiku-4-5",
    ),
    (
        _with(model="claude-opus-4-1", max_tokens=32_001),
        "max_tokens: 32001 > 32000, which is the maximum allowed number of output tokens for "
        "claude-opus-4-1",
    ),
    (
        _with(model="claude-3-haiku-20240307", max_tokens=4097),
        "max_tokens: 4097 > 4096, which is the maximum allowed number of output tokens for "
        "claude-3-haiku-20240307",
    ),
    (_with(model="claude-opus-4-6", max_tokens=128_001), "max_tokens: 128001 > 128000"),
    (_with(model="not-in-the-table", max_tokens=128_001), "max_tokens: 128001 > 128000"),
    (_with(messages=[]), "messages: at least one message is required"),
    (_with(messages="hi"), "messages: Input should be a valid list"),
    (_with(messages=["hi"]), "messages.0: Input should be a valid dictionary"),
    (
        _with(messages=[{"role": "system", "content": "x"}]),
        "messages.0.role: Input should be 'user' or 'assistant'",
    ),
    (
        _with(messages=[{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]),
        "messages.1.role: Input should be 'user' or 'assistant'",
    ),
    (_with(messages=[{"content": "x"}]), "messages.0.role: Field required"),
    (_with(messages=[{"role": "user"}]), "messages.0.content: Field required"),
    (
        _with(messages=[{"role": "assistant", "content": "x"}]),
        'messages: first message must use the "user" role',
    ),
    (
        _with(messages=[{"role": "user", "content": 42}]),
        "messages.0.content: Input should be a valid string or a list of content blocks",
    ),
    (
        _with(messages=[{"role": "user", "content": [{"text": "x"}]}]),
        "messages.0.content.0.type: Field required",
    ),
    (
        _with(messages=[{"role": "user", "content": [{"type": "text", "text": 3}]}]),
        "messages.0.content.0.text: Input should be a valid string",
    ),
    (
        _with(messages=[{"role": "user", "content": ""}]),
        "messages.0: all messages must have non-empty content",
    ),
    (
        _with(messages=[{"role": "user", "content": "x", "name": "bob"}]),
        "messages.0.name: Extra inputs are not permitted",
    ),
    (_with(stream=True), "stream: streaming is not supported for batch requests"),
    (_with(colour="blue"), "colour: Extra inputs are not permitted"),
    (_with(stop_sequences="END"), "stop_sequences: Input should be a valid list"),
    (_with(stop_sequences=["END", 5]), "stop_sequences.1: Input should be a valid string"),
    (_with(temperature=1.5), "temperature: Input should be between 0 and 1"),
    (_with(system=5), "system: Input should be a valid string or a list of text blocks"),
    (
        _with(system=[{"type": "image", "source": {}}]),
        "system.0.type: Input should be 'text'",
    ),
    (
        _with(tools=[_TOOL], tool_choice={"type": "tool", "name": "missing"}),
        "tool_choice.name: Tool 'missing' not found in tools",
    ),
    (
        _with(tool_choice={"type": "tool", "name": "lookup"}),
        "tool_choice.name: Tool 'lookup' not found in tools",
    ),
    (_with(tool_choice={"type": "any"}), "tool_choice: tool_choice.type 'any' requires"),
    (_with(tool_choice={"type": "sometimes"}), "tool_choice.type: Input should be 'auto'"),
    (_with(tools=[{"name": "x"}]), "tools.0.input_schema: Field required"),
    (
        _with(tools=[{"name": "x", "input_schema": {"type": "array"}}]),
        "tools.0.input_schema.type: Input should be 'object'",
    ),
    (_with(tools=[{**_TOOL, "name": "bad name"}]), "tools.0.name: String should match pattern"),
    (_with(tools=[_TOOL, _TOOL]), "tools: Tool names must be unique."),
    (
        _with(output_config={"format": {"type": "xml"}}),
        "output_config.format.type: Input should be 'json_schema'",
    ),
    (
        _with(output_config={"format": {"type": "json_schema"}}),
        "output_config.format.schema: Field required",
    ),
    (
        _with(system=[{"type": "text", "text": "s", "cache_control": {"type": "forever"}}]),
        "system.0.cache_control.type: Input should be 'ephemeral'",
    ),
    (
        _with(cache_control={"type": "ephemeral", "ttl": "2d"}),
        "cache_control.ttl: Input should be '5m' or '1h'",
    ),
    (
        _with(
            system=[
                {"type": "text", "text": str(i), "cache_control": {"type": "ephemeral"}}
                for i in range(5)
            ]
        ),
        "A maximum of 4 blocks with cache_control may be provided. Found 5.",
    ),
]


@pytest.mark.parametrize(("params", "message"), INVALID, ids=[m[:40] for _, m in INVALID])
def test_validation_failures(params: object, message: str) -> None:
    with pytest.raises(InvalidParams) as caught:
        validate_params(params)
    assert str(caught.value).startswith(message)
    # respond() validates too, so a caller that skips validate_params still gets the error.
    if isinstance(params, dict):
        with pytest.raises(InvalidParams):
            responder.respond(params, cache=PromptCache())


@pytest.mark.parametrize(
    "params",
    [
        VALID,
        _with(stream=False, temperature=1, top_p=0.9, metadata={"user_id": "u"}),
        _with(messages=[{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]),
        _with(tools=[_TOOL, {"type": "web_search_20250305", "name": "web_search"}]),
        _with(tools=[_TOOL], tool_choice={"type": "auto"}),
        _with(output_config={"effort": "low"}),
    ],
)
def test_valid_params_pass(params: dict[str, Any], respond: Any) -> None:
    validate_params(params)
    respond(params)


# ---------------------------------------------------------------- forced tool use

SCHEMAS: dict[str, dict[str, Any]] = {
    "enum": {
        "type": "object",
        "properties": {"label": {"type": "string", "enum": ["positive", "negative", "neutral"]}},
        "required": ["label"],
        "additionalProperties": False,
    },
    "numbers": {
        "type": "object",
        "properties": {
            "score": {"type": "number", "minimum": 0, "maximum": 1},
            "stars": {"type": "integer", "minimum": 1, "maximum": 5},
            "offset": {"type": "integer", "exclusiveMinimum": -3, "exclusiveMaximum": 3},
            "step": {"type": "number", "multipleOf": 0.25, "maximum": 2},
            "big": {"type": "integer", "minimum": 1000},
        },
        "required": ["score", "stars", "offset", "step", "big"],
    },
    "boolean": {
        "type": "object",
        "properties": {"spam": {"type": "boolean"}, "fixed": {"const": "v1"}},
        "required": ["spam", "fixed"],
    },
    "list": {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 4},
            "codes": {
                "type": "array",
                "items": {"enum": ["a", "b", "c"]},
                "uniqueItems": True,
                "maxItems": 3,
            },
            "pair": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "boolean"}]},
        },
        "required": ["tags", "codes", "pair"],
    },
    "nested": {
        "type": "object",
        "properties": {
            "person": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "minLength": 30, "maxLength": 40},
                    "initials": {"type": "string", "maxLength": 2},
                    "address": {
                        "type": "object",
                        "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                        "required": ["city"],
                        "additionalProperties": False,
                    },
                },
                "required": ["name", "initials", "address"],
            },
            "when": {"type": "string", "format": "date-time"},
        },
        "required": ["person", "when"],
    },
    "nullable": {
        "type": "object",
        "properties": {
            "maybe": {"type": ["string", "null"], "enum": ["x", "y", None]},
            "count": {"type": ["integer", "null"], "minimum": 10, "maximum": 12},
            "either": {"anyOf": [{"type": "integer", "minimum": 5}, {"type": "null"}]},
            "choice": {"oneOf": [{"type": "boolean"}, {"type": "string"}]},
        },
        "required": ["maybe", "count", "either", "choice"],
    },
    "pydantic_refs": {
        "$defs": {
            "Item": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string"},
                    "qty": {"type": "integer", "minimum": 1},
                    "child": {"anyOf": [{"$ref": "#/$defs/Item"}, {"type": "null"}]},
                },
                "required": ["sku", "qty", "child"],
            }
        },
        "type": "object",
        "properties": {
            "items": {"type": "array", "items": {"$ref": "#/$defs/Item"}, "minItems": 1},
            "meta": {"allOf": [{"$ref": "#/$defs/Item"}, {"required": ["sku"]}]},
        },
        "required": ["items", "meta"],
    },
}


def _tool_request(schema: dict[str, Any], prompt: str, **extra: Any) -> dict[str, Any]:
    tools = [
        {"name": "first_tool", "input_schema": {"type": "object"}},
        {"name": "record", "description": "Record the result", "input_schema": schema},
    ]
    return req(prompt, tools=tools, tool_choice={"type": "tool", "name": "record"}, **extra)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_tool_input_valid_for_schema(name: str, respond: Any) -> None:
    schema = SCHEMAS[name]
    validator = Draft202012Validator(schema)
    inputs = []
    for i in range(150):
        message = respond(_tool_request(schema, f"Classify row {i}: the food was fine"))
        assert message["stop_reason"] == "tool_use"
        (block,) = message["content"]
        assert block["type"] == "tool_use"
        assert block["name"] == "record"
        assert block["id"].startswith("toolu_01")
        assert len(block["id"]) == 30
        validator.validate(block["input"])
        inputs.append(json.dumps(block["input"], sort_keys=True))
    assert len(set(inputs)) > 1, "different prompts should get different inputs"


def test_enum_labels_spread_over_prompts(respond: Any) -> None:
    labels = [
        respond(_tool_request(SCHEMAS["enum"], f"review {i}"))["content"][0]["input"]["label"]
        for i in range(300)
    ]
    counts = {label: labels.count(label) for label in set(labels)}
    assert set(counts) == {"positive", "negative", "neutral"}
    assert min(counts.values()) > 50


def test_nullable_fields_are_sometimes_null() -> None:
    values = [value_for(SCHEMAS["nullable"], bytes([i, i * 7 % 256]) * 4) for i in range(200)]
    counts = [v["count"] for v in values]
    assert None in counts
    assert 11 in counts


def test_tool_choice_any_picks_first_custom_tool(respond: Any) -> None:
    params = _tool_request(SCHEMAS["enum"], "hi")
    params["tools"].insert(0, {"type": "web_search_20250305", "name": "web_search"})
    params["tool_choice"] = {"type": "any"}
    message = respond(params)
    assert message["content"][0]["name"] == "first_tool"
    assert message["content"][0]["input"] == {}


def test_tool_choice_auto_answers_in_text(respond: Any) -> None:
    params = _tool_request(SCHEMAS["enum"], "hi")
    params["tool_choice"] = {"type": "auto"}
    message = respond(params)
    assert message["stop_reason"] == "end_turn"
    assert message["content"][0]["text"] == expected_text(params)


def test_tool_input_over_budget_is_empty_with_max_tokens(respond: Any) -> None:
    message = respond(_tool_request(SCHEMAS["nested"], "long input", max_tokens=5))
    assert message["stop_reason"] == "max_tokens"
    assert message["content"][0]["input"] == {}
    assert message["usage"]["output_tokens"] == 5


def test_tool_output_tokens_count_the_input(respond: Any) -> None:
    message = respond(_tool_request(SCHEMAS["numbers"], "row"))
    block = message["content"][0]
    compact = json.dumps(block["input"], separators=(",", ":"))
    assert message["usage"]["output_tokens"] == approx_tokens("record") + approx_tokens(compact)


# ---------------------------------------------------------------- JSON output


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_output_valid_for_schema(name: str, respond: Any) -> None:
    validator = Draft202012Validator(SCHEMAS[name])
    config = {"format": {"type": "json_schema", "schema": SCHEMAS[name]}}
    for i in range(50):
        message = respond(req(f"Extract from row {i}", output_config=config, max_tokens=4000))
        assert message["stop_reason"] == "end_turn"
        (block,) = message["content"]
        assert block["type"] == "text"
        assert ", " not in block["text"]
        assert ": " not in block["text"]
        validator.validate(json.loads(block["text"]))


def test_json_output_truncated_at_max_tokens(respond: Any) -> None:
    config = {"format": {"type": "json_schema", "schema": SCHEMAS["nested"]}}
    full = respond(req("x", output_config=config, max_tokens=4000))["content"][0]["text"]
    cut = respond(req("x", output_config=config, max_tokens=3))
    assert cut["stop_reason"] == "max_tokens"
    assert cut["content"][0]["text"] == full[:12]


# ---------------------------------------------------------------- usage and prompt caching


def _cached_system(user: str, ttl: str | None = None) -> dict[str, Any]:
    control: dict[str, Any] = {"type": "ephemeral"}
    if ttl:
        control["ttl"] = ttl
    system = [{"type": "text", "text": "S" * 400, "cache_control": control}]  # 100 tokens
    return req(user, system=system)


def test_no_cache_control_means_no_cache_tokens(respond: Any) -> None:
    params = req("x" * 40, system="y" * 20)
    usage = respond(params)["usage"]
    assert usage["input_tokens"] == 15 == counted(params)
    assert usage["cache_creation_input_tokens"] == 0
    assert usage["cache_read_input_tokens"] == 0
    assert usage["cache_creation"] == {
        "ephemeral_5m_input_tokens": 0,
        "ephemeral_1h_input_tokens": 0,
    }


def test_first_request_writes_later_ones_read(respond: Any) -> None:
    cache = PromptCache()
    first = respond(_cached_system("a" * 40), cache)["usage"]
    assert first["cache_creation_input_tokens"] == 100
    assert first["cache_creation"] == {
        "ephemeral_5m_input_tokens": 100,
        "ephemeral_1h_input_tokens": 0,
    }
    assert first["cache_read_input_tokens"] == 0
    assert first["input_tokens"] == 10
    second = respond(_cached_system("b" * 80), cache)["usage"]
    assert second["cache_read_input_tokens"] == 100
    assert second["cache_creation_input_tokens"] == 0
    assert second["input_tokens"] == 20
    total = second["input_tokens"] + second["cache_read_input_tokens"]
    assert total == counted(_cached_system("b" * 80))
    # Another model has its own cache.
    other = respond({**_cached_system("b"), "model": "claude-opus-4-6"}, cache)["usage"]
    assert other["cache_creation_input_tokens"] == 100


def test_one_hour_ttl(respond: Any) -> None:
    usage = respond(_cached_system("q", ttl="1h"))["usage"]
    assert usage["cache_creation"] == {
        "ephemeral_5m_input_tokens": 0,
        "ephemeral_1h_input_tokens": 100,
    }


def test_tools_and_messages_breakpoints_partial_hit(respond: Any) -> None:
    cache = PromptCache()
    tool = {"name": "t", "input_schema": {"type": "object"}, "cache_control": {"type": "ephemeral"}}
    tool_tokens = approx_tokens(
        json.dumps(
            {k: v for k, v in tool.items() if k != "cache_control"},
            separators=(",", ":"),
            sort_keys=True,
        )
    )

    def params(doc: str) -> dict[str, Any]:
        content = [
            {"type": "text", "text": doc, "cache_control": {"type": "ephemeral", "ttl": "1h"}},
            {"type": "text", "text": "question?"},
        ]
        return req(content, tools=[tool])

    first = respond(params("D" * 200), cache)["usage"]
    assert first["cache_creation"]["ephemeral_5m_input_tokens"] == tool_tokens
    assert first["cache_creation"]["ephemeral_1h_input_tokens"] == 50
    assert first["input_tokens"] == approx_tokens("question?")
    # A new document: the tools prefix is read, the document written.
    second = respond(params("E" * 200), cache)["usage"]
    assert second["cache_read_input_tokens"] == tool_tokens
    assert second["cache_creation_input_tokens"] == 50
    assert second["cache_creation"]["ephemeral_1h_input_tokens"] == 50


def test_top_level_cache_control_caches_whole_prompt(respond: Any) -> None:
    cache = PromptCache()
    params = req("z" * 60, cache_control={"type": "ephemeral"})
    first = respond(params, cache)["usage"]
    assert (first["input_tokens"], first["cache_creation_input_tokens"]) == (0, 15)
    again = respond(params, cache)["usage"]
    assert (again["input_tokens"], again["cache_read_input_tokens"]) == (0, 15)


def test_cache_marker_does_not_change_the_answer() -> None:
    plain = req("same words", system=[{"type": "text", "text": "sys"}])
    marked = req(
        "same words",
        system=[{"type": "text", "text": "sys", "cache_control": {"type": "ephemeral"}}],
    )
    assert expected_text(plain) == expected_text(marked)


def test_concurrent_first_requests_write_once() -> None:
    cache = PromptCache()
    results: list[dict[str, Any]] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        usage = responder.respond(_cached_system(f"user {i}"), cache=cache)["usage"]
        with lock:
            results.append(usage)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    writes = [u for u in results if u["cache_creation_input_tokens"]]
    reads = [u for u in results if u["cache_read_input_tokens"]]
    assert (len(writes), len(reads)) == (1, 15)


def test_prompt_cache_is_bounded() -> None:
    cache = PromptCache(max_entries=3)
    for key in (b"a", b"b", b"c", b"d"):
        assert cache.settle([key]) == -1
    assert len(cache) == 3
    assert cache.settle([b"a"]) == -1  # evicted as least recently used
    assert cache.settle([b"x", b"d"]) == 1


# ---------------------------------------------------------------- count_tokens


def test_count_tokens_matches_respond_and_validates(respond: Any) -> None:
    body = {
        "model": MODEL,
        "system": "You sort mail.",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Sort this " * 30}]}],
        "tools": [{"name": "sort", "input_schema": {"type": "object"}}],
    }
    assert count_tokens(body) == respond({**body, "max_tokens": 10})["usage"]["input_tokens"]
    for broken, message in [
        ({k: v for k, v in body.items() if k != "model"}, "model: Field required"),
        ({k: v for k, v in body.items() if k != "messages"}, "messages: Field required"),
        ({**body, "max_tokens": 5}, "max_tokens: Extra inputs are not permitted"),
        ({**body, "messages": []}, "messages: at least one message is required"),
    ]:
        with pytest.raises(InvalidParams, match=message):
            count_tokens(broken)


# ---------------------------------------------------------------- schema_values edge cases

EDGE_SCHEMAS: list[dict[str, Any]] = [
    {"type": "number", "multipleOf": 0.1, "minimum": 0, "maximum": 3},
    {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 0.02},
    {"type": "number", "exclusiveMaximum": -5},
    {"type": "integer", "minimum": 7, "maximum": 7},
    {"type": "integer", "exclusiveMinimum": 0.5, "maximum": 3},
    {"type": "integer", "multipleOf": 5, "minimum": 3, "maximum": 30},
    {"type": "string", "minLength": 50},
    {"type": "string", "maxLength": 1},
    {"type": "string", "format": "uuid"},
    {"type": "string", "format": "email"},
    {
        "type": "array",
        "items": {"type": "boolean"},
        "minItems": 2,
        "maxItems": 2,
        "uniqueItems": True,
    },
    {"type": "array", "minItems": 6, "items": {"type": ["null", "integer"]}},
    {"const": {"nested": [1, 2]}},
    {"enum": [1, "two", None, {"three": 3}]},
    {"type": "object", "properties": {"x": {"type": "integer"}}, "allOf": [{"required": ["x"]}]},
    {"anyOf": [{"type": "string", "maxLength": 3}, {"type": "integer"}]},
    {},
]


@pytest.mark.parametrize("schema", EDGE_SCHEMAS, ids=[json.dumps(s)[:50] for s in EDGE_SCHEMAS])
def test_schema_values_edge_cases(schema: dict[str, Any]) -> None:
    validator = Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)
    for i in range(300):
        seed = i.to_bytes(2, "little") * 4
        value = value_for(schema, seed)
        validator.validate(value)
        assert value == value_for(schema, seed)


def test_schema_values_infinite_schema_terminates() -> None:
    # A required, non-nullable self-reference has no finite instance: stop, do not crash.
    schema = {"type": "object", "properties": {"me": {"$ref": "#"}}, "required": ["me"]}
    value = value_for(schema, b"seedseed")
    assert isinstance(value, dict)


# ---------------------------------------------------------------- thinking


def test_thinking_comes_before_the_answer_and_counts_as_output(respond: Any) -> None:
    plain = respond(req(max_tokens=4096))
    thinking = {"type": "enabled", "budget_tokens": 2048}
    message = respond(req(max_tokens=4096, thinking=thinking))
    kinds = [block["type"] for block in message["content"]]
    assert kinds == ["thinking", "text"]
    thought = message["content"][0]
    assert thought["thinking"]
    assert thought["signature"]
    assert message["content"][1]["text"] == plain["content"][0]["text"]
    used = approx_tokens(thought["thinking"])
    assert message["usage"]["output_tokens"] == plain["usage"]["output_tokens"] + used
    omitted = respond(req(max_tokens=4096, thinking={"type": "adaptive", "display": "omitted"}))
    assert omitted["content"][0]["thinking"] == ""
    assert omitted["content"][0]["signature"]
    assert respond(req(thinking={"type": "disabled"}))["content"][0]["type"] == "text"


@pytest.mark.parametrize(
    ("thinking", "extra", "message"),
    [
        ({"type": "enabled", "budget_tokens": 512}, {}, "greater than or equal to 1024"),
        ({"type": "enabled", "budget_tokens": 4096}, {}, "max_tokens` must be greater"),
        ({"type": "enabled"}, {}, "budget_tokens: Field required"),
        ({"type": "sometimes"}, {}, "thinking.type"),
        ({"type": "adaptive", "budget_tokens": 2048}, {}, "Extra inputs"),
        ({"type": "adaptive"}, {"temperature": 0.2}, "temperature"),
    ],
)
def test_thinking_settings_the_api_refuses(
    thinking: dict[str, Any], extra: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidParams, match=message):
        validate_params(req(max_tokens=4096, thinking=thinking, **extra))


def test_thinking_with_a_forced_tool_is_refused() -> None:
    tool = {"name": "t", "input_schema": {"type": "object"}}
    params = req(
        max_tokens=4096,
        thinking={"type": "adaptive"},
        tools=[tool],
        tool_choice={"type": "tool", "name": "t"},
    )
    with pytest.raises(InvalidParams, match="forces tool use"):
        validate_params(params)


def test_the_emulators_models_are_the_specs() -> None:
    """KNOWN_MODELS is the spec's Model constants, copied: caught here when the spec moves."""
    if not SPEC_PATH.exists():
        pytest.skip(f"reference spec not found at {SPEC_PATH}")
    model = json.loads(SPEC_PATH.read_text())["components"]["schemas"]["Model"]
    listed = [choice["const"] for choice in model["anyOf"] if "const" in choice]
    assert list(KNOWN_MODELS) == listed


def test_each_models_output_limit_is_allowed_up_to_it(respond: Any) -> None:
    for model, limit in [("claude-haiku-4-5", 64_000), ("claude-opus-4-6", 128_000),
                         ("claude-opus-4-1-20250805", 32_000)]:  # fmt: skip
        assert respond(req(model=model, max_tokens=limit))["stop_reason"] == "end_turn"


def test_a_prompt_over_the_context_window_is_invalid(respond: Any) -> None:
    # approx_tokens is one token per 4 characters: 200,000 tokens fit haiku's window exactly.
    at_limit = "x" * (4 * 200_000)
    assert counted(req(at_limit)) == 200_000
    assert respond(req(at_limit))["stop_reason"] == "end_turn"
    over = at_limit + "y"
    assert counted(req(over)) == 200_001
    with pytest.raises(InvalidParams) as caught:
        responder.respond(req(over), cache=PromptCache())
    assert str(caught.value) == "prompt is too long: 200001 tokens > 200000 maximum"
    # The system prompt counts too; a 1M-token model takes the same prompt.
    with pytest.raises(InvalidParams, match=r"^prompt is too long: 200002 tokens > 200000"):
        responder.respond(req(at_limit, system="abcdefgh"), cache=PromptCache())
    assert respond(req(over, model="claude-opus-4-6"))["stop_reason"] == "end_turn"

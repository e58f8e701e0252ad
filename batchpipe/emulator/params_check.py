"""Validation of Messages ``params`` the way the API reports it, for the emulator.

The API validates each batch request asynchronously and reports a bad one as an ``errored``
result with ``invalid_request_error`` and a pydantic-style message that names the field
(``messages.0.role: Input should be 'user' or 'assistant'``). ``check_message_params`` and
``check_count_tokens_body`` raise ``InvalidParams`` with such a message on the first problem
found. The allowed keys are the properties of ``CreateMessageParams`` and
``CountMessageTokensParams`` in the reference OpenAPI spec (both ``additionalProperties:
false``).

Only plain dict/list/str checks here: this runs for each of 100,000 requests in a batch.
"""

from __future__ import annotations

import re
from typing import Any

from batchpipe.emulator.model_limits import limits_for

# The properties of CreateMessageParams / CountMessageTokensParams in the spec.
MESSAGE_KEYS = frozenset(
    {
        "cache_control", "container", "inference_geo", "max_tokens", "messages", "metadata",
        "model", "output_config", "service_tier", "stop_sequences", "stream", "system",
        "temperature", "thinking", "tool_choice", "tools", "top_k", "top_p",
    }
)  # fmt: skip
COUNT_TOKENS_KEYS = frozenset(
    {"cache_control", "messages", "model", "output_config", "system", "thinking", "tool_choice",
     "tools"}
)  # fmt: skip
# The API allows at most four cache breakpoints per request.
MAX_CACHE_BREAKPOINTS = 4
# ThinkingConfigParam: the keys of each variant, and the smallest budget "enabled" takes.
_THINKING_KEYS = {
    "enabled": frozenset({"type", "budget_tokens", "display"}),
    "adaptive": frozenset({"type", "display"}),
    "disabled": frozenset({"type"}),
}
MIN_THINKING_BUDGET = 1024

# Compiled once: the Tool schema's name pattern.
_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")
_TOOL_CHOICE_TYPES = ("auto", "any", "tool", "none")


class InvalidParams(Exception):
    """Params the API would reject; ``str(exc)`` is the API-style message naming the field."""


def check_message_params(params: object) -> None:
    """Raise ``InvalidParams`` unless ``params`` is a valid Messages create body for a batch."""
    body = _object(params, "params")
    _no_extra_keys(body, MESSAGE_KEYS, "")
    for field in ("model", "max_tokens", "messages"):
        if field not in body:
            raise InvalidParams(f"{field}: Field required")
    _check_model(body["model"])
    max_tokens = body["max_tokens"]
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
        raise InvalidParams("max_tokens: Input should be a valid integer")
    if max_tokens <= 0:
        raise InvalidParams("max_tokens: Input should be greater than 0")
    limit = limits_for(body["model"]).max_output_tokens
    if max_tokens > limit:
        raise InvalidParams(
            f"max_tokens: {max_tokens} > {limit}, which is the maximum allowed "
            f"number of output tokens for {body['model']}"
        )
    if body.get("stream") is True:
        raise InvalidParams("stream: streaming is not supported for batch requests")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise InvalidParams("stream: Input should be a valid boolean")
    _check_stop_sequences(body.get("stop_sequences"))
    _check_unit_interval(body, "temperature")
    _check_unit_interval(body, "top_p")
    top_k = body.get("top_k")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool)):
        raise InvalidParams("top_k: Input should be a valid integer")
    if top_k is not None and top_k < 0:
        raise InvalidParams("top_k: Input should be greater than or equal to 0")
    _check_prompt(body)
    _check_thinking(body)


def _check_unit_interval(body: dict[str, Any], field: str) -> None:
    """A sampling knob, when given, is a number from 0 to 1 (temperature, top_p)."""
    value = body.get(field)
    if value is None:
        return
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise InvalidParams(f"{field}: Input should be a valid number")
    if not 0 <= value <= 1:
        raise InvalidParams(f"{field}: Input should be between 0 and 1")


def check_count_tokens_body(body: object) -> None:
    """Raise ``InvalidParams`` unless ``body`` is a valid ``count_tokens`` request."""
    params = _object(body, "body")
    _no_extra_keys(params, COUNT_TOKENS_KEYS, "")
    for field in ("model", "messages"):
        if field not in params:
            raise InvalidParams(f"{field}: Field required")
    _check_model(params["model"])
    _check_prompt(params)


def _check_prompt(body: dict[str, Any]) -> None:
    """The parts shared by create and count_tokens: messages, system, tools and choices."""
    breakpoints = _check_messages(body["messages"])
    breakpoints += _check_system(body.get("system"))
    tool_names, tool_breakpoints = _check_tools(body.get("tools"))
    breakpoints += tool_breakpoints
    if body.get("cache_control") is not None:
        _check_cache_control(body["cache_control"], "cache_control")
        breakpoints += 1
    if breakpoints > MAX_CACHE_BREAKPOINTS:
        raise InvalidParams(
            f"A maximum of {MAX_CACHE_BREAKPOINTS} blocks with cache_control may be provided. "
            f"Found {breakpoints}."
        )
    _check_tool_choice(body.get("tool_choice"), tool_names)
    _check_output_config(body.get("output_config"))


def _check_thinking(body: dict[str, Any]) -> None:
    """``thinking``: enabled (a budget of 1,024 tokens or more, below max_tokens), adaptive
    or disabled, per the spec's ThinkingConfigParam; not with a forced tool or a
    temperature other than 1."""
    if "thinking" not in body:
        return
    thinking = _object(body["thinking"], "thinking")
    kind = thinking.get("type")
    if kind not in _THINKING_KEYS:
        raise InvalidParams("thinking.type: Input should be 'enabled', 'disabled' or 'adaptive'")
    _no_extra_keys(thinking, _THINKING_KEYS[kind], f"thinking.{kind}.")
    if thinking.get("display") not in (None, "summarized", "omitted"):
        raise InvalidParams(f"thinking.{kind}.display: Input should be 'summarized' or 'omitted'")
    if kind == "disabled":
        return
    if kind == "enabled":
        budget = thinking.get("budget_tokens")
        if budget is None:
            raise InvalidParams("thinking.enabled.budget_tokens: Field required")
        if not isinstance(budget, int) or isinstance(budget, bool):
            raise InvalidParams("thinking.enabled.budget_tokens: Input should be a valid integer")
        if budget < MIN_THINKING_BUDGET:
            raise InvalidParams(
                "thinking.enabled.budget_tokens: Input should be greater than or equal to "
                f"{MIN_THINKING_BUDGET}"
            )
        if body["max_tokens"] <= budget:
            raise InvalidParams("`max_tokens` must be greater than `thinking.budget_tokens`")
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") in ("any", "tool"):
        raise InvalidParams("Thinking may not be enabled when tool_choice forces tool use.")
    if body.get("temperature") not in (None, 1):
        raise InvalidParams("`temperature` may only be set to 1 when thinking is enabled.")


def _object(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidParams(f"{where}: Input should be a valid dictionary or object")
    return value


def _no_extra_keys(value: dict[str, Any], allowed: frozenset[str], prefix: str) -> None:
    for key in value:
        if key not in allowed:
            raise InvalidParams(f"{prefix}{key}: Extra inputs are not permitted")


def _check_model(model: object) -> None:
    if not isinstance(model, str):
        raise InvalidParams("model: Input should be a valid string")
    if not model:
        raise InvalidParams("model: String should have at least 1 character")


def _check_stop_sequences(value: object) -> None:
    if value is None:
        return
    if not isinstance(value, list):
        raise InvalidParams("stop_sequences: Input should be a valid list")
    for i, seq in enumerate(value):
        if not isinstance(seq, str):
            raise InvalidParams(f"stop_sequences.{i}: Input should be a valid string")
        if not seq.strip():
            raise InvalidParams("stop_sequences: each stop sequence must contain non-whitespace")


def _check_messages(messages: object) -> int:
    """Check the conversation; return how many cache breakpoints its blocks carry."""
    if not isinstance(messages, list):
        raise InvalidParams("messages: Input should be a valid list")
    if not messages:
        raise InvalidParams("messages: at least one message is required")
    breakpoints = 0
    last = len(messages) - 1
    for i, message in enumerate(messages):
        where = f"messages.{i}"
        msg = _object(message, where)
        _no_extra_keys(msg, frozenset({"role", "content"}), f"{where}.")
        if "role" not in msg:
            raise InvalidParams(f"{where}.role: Field required")
        role = msg["role"]
        if role not in ("user", "assistant"):
            raise InvalidParams(f"{where}.role: Input should be 'user' or 'assistant'")
        if i == 0 and role != "user":
            raise InvalidParams('messages: first message must use the "user" role')
        if "content" not in msg:
            raise InvalidParams(f"{where}.content: Field required")
        content = msg["content"]
        if isinstance(content, str):
            empty = not content
        elif isinstance(content, list):
            empty = not content
            breakpoints += _check_blocks(content, f"{where}.content")
        else:
            raise InvalidParams(
                f"{where}.content: Input should be a valid string or a list of content blocks"
            )
        # A final assistant turn may be empty (a prefill the model continues from).
        if empty and not (i == last and role == "assistant"):
            raise InvalidParams(
                f"{where}: all messages must have non-empty content except for the optional "
                "final assistant message"
            )
    return breakpoints


def _check_blocks(blocks: list[Any], where: str, *, text_only: bool = False) -> int:
    """Check content blocks; return how many carry a cache_control breakpoint."""
    breakpoints = 0
    for j, raw in enumerate(blocks):
        at = f"{where}.{j}"
        block = _object(raw, at)
        kind = block.get("type")
        if kind is None:
            raise InvalidParams(f"{at}.type: Field required")
        if not isinstance(kind, str):
            raise InvalidParams(f"{at}.type: Input should be a valid string")
        if text_only and kind != "text":
            raise InvalidParams(f"{at}.type: Input should be 'text'")
        if kind == "text":
            text = block.get("text")
            if not isinstance(text, str):
                raise InvalidParams(f"{at}.text: Input should be a valid string")
            if not text:
                raise InvalidParams(f"{at}.text: String should have at least 1 character")
        if block.get("cache_control") is not None:
            _check_cache_control(block["cache_control"], f"{at}.cache_control")
            breakpoints += 1
    return breakpoints


def _check_system(system: object) -> int:
    if system is None or isinstance(system, str):
        return 0
    if not isinstance(system, list):
        raise InvalidParams("system: Input should be a valid string or a list of text blocks")
    return _check_blocks(system, "system", text_only=True)


def _check_cache_control(value: object, where: str) -> None:
    control = _object(value, where)
    if control.get("type") != "ephemeral":
        raise InvalidParams(f"{where}.type: Input should be 'ephemeral'")
    if control.get("ttl", "5m") not in ("5m", "1h"):
        raise InvalidParams(f"{where}.ttl: Input should be '5m' or '1h'")


def _check_tools(tools: object) -> tuple[list[str], int]:
    """Check the tool list; return the tool names in order and the cache breakpoint count."""
    if tools is None:
        return [], 0
    if not isinstance(tools, list):
        raise InvalidParams("tools: Input should be a valid list")
    names: list[str] = []
    breakpoints = 0
    for i, raw in enumerate(tools):
        where = f"tools.{i}"
        tool = _object(raw, where)
        name = tool.get("name")
        if not isinstance(name, str):
            raise InvalidParams(f"{where}.name: Field required")
        if not _TOOL_NAME.match(name):
            raise InvalidParams(
                f"{where}.name: String should match pattern '^[a-zA-Z0-9_-]{{1,128}}$'"
            )
        if name in names:
            raise InvalidParams("tools: Tool names must be unique.")
        names.append(name)
        # Custom tools (no type, or "custom") need an object input_schema; server tools
        # (web_search_20250305 …) are defined by their type and carry none.
        if tool.get("type") in (None, "custom"):
            schema = tool.get("input_schema")
            if not isinstance(schema, dict):
                raise InvalidParams(f"{where}.input_schema: Field required")
            if schema.get("type") != "object":
                raise InvalidParams(f"{where}.input_schema.type: Input should be 'object'")
        if tool.get("cache_control") is not None:
            _check_cache_control(tool["cache_control"], f"{where}.cache_control")
            breakpoints += 1
    return names, breakpoints


def _check_tool_choice(value: object, tool_names: list[str]) -> None:
    if value is None:
        return
    choice = _object(value, "tool_choice")
    kind = choice.get("type")
    if kind not in _TOOL_CHOICE_TYPES:
        raise InvalidParams("tool_choice.type: Input should be 'auto', 'any', 'tool' or 'none'")
    if kind == "tool":
        name = choice.get("name")
        if not isinstance(name, str):
            raise InvalidParams("tool_choice.name: Field required")
        if name not in tool_names:
            raise InvalidParams(f"tool_choice.name: Tool '{name}' not found in tools")
    elif kind == "any" and not tool_names:
        raise InvalidParams("tool_choice: tool_choice.type 'any' requires at least one tool")


def _check_output_config(value: object) -> None:
    if value is None:
        return
    config = _object(value, "output_config")
    _no_extra_keys(config, frozenset({"effort", "format"}), "output_config.")
    fmt = config.get("format")
    if fmt is None:
        return
    fmt = _object(fmt, "output_config.format")
    if fmt.get("type") != "json_schema":
        raise InvalidParams("output_config.format.type: Input should be 'json_schema'")
    if "schema" not in fmt:
        raise InvalidParams("output_config.format.schema: Field required")
    _object(fmt["schema"], "output_config.format.schema")

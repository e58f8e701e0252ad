"""The emulator's "model": turns one Messages request's ``params`` into the Message it answers.

Everything is a pure function of the request (plus the prompt cache), so the same request
always gets the same answer and a test can recompute it:

- **Text.** ``expected_text`` builds a short sentence from a hash of the prompt (model, system
  and messages): ``"Answer 3f9a0c1b2d4e: <a few words of the last user turn> <filler>."``. Its
  natural length varies with the prompt between about 6 and 40 tokens. A stop sequence inside
  it cuts it there (``stop_reason: "stop_sequence"``); beyond ``max_tokens`` it is cut to
  ``4 * max_tokens`` characters (``stop_reason: "max_tokens"``).
- **Forced tool use** (``tool_choice`` ``{"type": "tool", "name": X}``, or ``{"type": "any"}``
  meaning the first custom tool): one ``tool_use`` block whose ``input`` is valid for the tool's
  ``input_schema`` (see ``schema_values``). If that input would not fit ``max_tokens`` the block
  carries an empty input ``{}`` and ``stop_reason`` is ``max_tokens``, as a real model cut off
  mid-arguments leaves nothing parseable.
- **JSON output** (``output_config.format = {"type": "json_schema", "schema": …}``): one text
  block holding compact JSON valid for the schema; cut like any text when over ``max_tokens``.
- **Thinking** (``thinking`` enabled or adaptive): a ``thinking`` block (a short deterministic
  text and a signature; empty text with ``display: omitted``) before the answer; its tokens
  count towards ``max_tokens`` and ``output_tokens``.

Token counts use ``approx_tokens`` (one token per four characters, rounded up), applied to
each piece of the prompt: each tool definition (as JSON), the system prompt (or each system
block), each message's string content or each of its blocks (text blocks by their text, other
blocks by their JSON). ``count_tokens`` reports the same total that ``respond`` bills.

Prompt caching follows the API's prefix order tools → system → messages. Every block with
``cache_control`` (and the top-level ``cache_control``, which marks the end of the prompt) ends a
cacheable prefix. The longest prefix already in the ``PromptCache`` is billed as
``cache_read_input_tokens``; the tokens after it up to the last breakpoint are written
(``cache_creation_input_tokens``, split into ``ephemeral_5m``/``ephemeral_1h`` by the TTL of the
breakpoint that closes each stretch); ``input_tokens`` is what remains. Unlike the API there is
no minimum cacheable length and entries do not expire (the cache is bounded instead), so short
test prompts show cache behaviour deterministically.

A prompt over the model's context window (``model_limits``) raises ``InvalidParams``
(``prompt is too long: N tokens > 200000 maximum``), as the API errors the request.

``respond`` validates the params itself (``params_check``), so a caller that skips
``validate_params`` still gets ``InvalidParams`` rather than a crash on a malformed request.
Measured: 100,000 requests of ~630 prompt characters take about 2 s on one core.
"""

from __future__ import annotations

import base64
import hashlib
import threading
from collections.abc import Sequence
from typing import Any

import orjson

from batchpipe.emulator.model_limits import limits_for
from batchpipe.emulator.params_check import (
    InvalidParams,
    check_count_tokens_body,
    check_message_params,
)
from batchpipe.emulator.schema_values import value_for

__all__ = [
    "InvalidParams",
    "PromptCache",
    "approx_tokens",
    "count_tokens",
    "expected_text",
    "respond",
    "validate_params",
]

_BASE58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
# Byte -> base58 character (b % 58: a slight bias towards the first characters is harmless
# for ids that only need to be unique and look right).
_BASE58_TABLE = bytes(ord(_BASE58[b % 58]) for b in range(256))
# Filler for answers, as one long text built by fixed arithmetic (never from ``random``), so
# answers are the same in every release; answers take whole words from it by slicing.
_FILLER = (
    "noted", "and", "the", "reply", "is", "brief", "so", "here", "it", "goes", "with",
    "care", "plus", "detail", "about", "that", "topic", "in", "short", "form",
)  # fmt: skip
_FILLER_TEXT = " ".join(_FILLER[(i * 7 + i // 3) % len(_FILLER)] for i in range(600))
_FILLER_SPAN = len(_FILLER_TEXT) - 400  # room after any start for the longest filler
_ECHO_STRIP = ".,;:!?\"'()[]{}<>`*"


def approx_tokens(text: str) -> int:
    """The emulator's tokenizer: one token per four characters, rounded up (``ceil(len/4)``).

    Close enough to real English tokenization for budgeting and cost tests, and free to compute.
    """
    return (len(text) + 3) // 4


def validate_params(params: object) -> None:
    """Raise ``InvalidParams`` (an API-style message naming the field) if the API would."""
    check_message_params(params)


class PromptCache:
    """Which cacheable prompt prefixes the emulator has seen (thread-safe, bounded).

    Keys are hashes of (model, prefix). The first request with a prefix writes it; later ones
    read it. Beyond ``max_entries`` the least recently used prefix is forgotten.
    """

    def __init__(self, max_entries: int = 200_000) -> None:
        self._entries: dict[bytes, None] = {}
        self._max = max_entries
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def settle(self, keys: Sequence[bytes]) -> int:
        """Index of the longest prefix in ``keys`` already cached (-1: none); then cache all.

        One lock for lookup and insert, so of two concurrent first requests exactly one writes.
        """
        with self._lock:
            hit = -1
            for i in range(len(keys) - 1, -1, -1):
                if keys[i] in self._entries:
                    hit = i
                    break
            for key in keys:
                # Re-insert to mark it most recently used (dicts keep insertion order).
                self._entries.pop(key, None)
                self._entries[key] = None
            while len(self._entries) > self._max:
                del self._entries[next(iter(self._entries))]
            return hit


class _Prompt:
    """One walk over a request: token counts, hashes and cache breakpoints.

    The walk follows the API's cache order tools → system → messages; ``prefix`` hashes the
    pieces so far (the cache key of a breakpoint) and ``answer`` the ones that seed the answer.
    """

    __slots__ = ("answer", "breakpoints", "echo", "prefix", "total_tokens")

    def __init__(self, body: dict[str, Any]) -> None:
        model = str(body["model"]).encode()
        self.total_tokens = 0
        self.echo = ""  # text of the last user turn, for the answer to quote
        # Per breakpoint: tokens of the prefix it closes, the prefix's cache key, its TTL.
        self.breakpoints: list[tuple[int, bytes, str]] = []
        self.prefix = hashlib.blake2b(model, digest_size=16)
        self.answer = hashlib.blake2b(model, digest_size=32)
        for tool in body.get("tools") or ():
            self._add(b"\x00t", _json_without_cache_control(tool), tool, seeds_answer=False)
        system = body.get("system")
        if isinstance(system, str):
            self._add(b"\x00s", system, None)
        elif isinstance(system, list):
            for block in system:
                self._add(b"\x00s", block["text"], block)
        for message in body["messages"]:
            user = message["role"] == "user"
            tag = b"\x00u" if user else b"\x00a"
            content = message["content"]
            if isinstance(content, str):
                self._add(tag, content, None)
                if user:
                    self.echo = content
                continue
            for block in content:
                is_text = block.get("type") == "text"
                text = block["text"] if is_text else _json_without_cache_control(block)
                self._add(tag, text, block)
                if is_text and user:
                    self.echo = text
        # The top-level marker caches the whole prompt (unless a block already ends there).
        control = body.get("cache_control")
        if control and (not self.breakpoints or self.breakpoints[-1][0] != self.total_tokens):
            self.breakpoints.append((self.total_tokens, self.prefix.digest(), _ttl(control)))

    def _add(
        self, tag: bytes, text: str, block: dict[str, Any] | None, *, seeds_answer: bool = True
    ) -> None:
        # The tag keeps piece boundaries in the hash ("ab"+"c" differs from "a"+"bc").
        data = tag + text.encode()
        self.prefix.update(data)
        if seeds_answer:
            self.answer.update(data)
        self.total_tokens += approx_tokens(text)
        if block is not None:
            control = block.get("cache_control")
            if control:
                self.breakpoints.append((self.total_tokens, self.prefix.digest(), _ttl(control)))


def _ttl(control: dict[str, Any]) -> str:
    return "1h" if control.get("ttl") == "1h" else "5m"


def _json_without_cache_control(block: dict[str, Any]) -> str:
    """A block or tool as JSON, minus its cache marker (moving a marker must not change it)."""
    if "cache_control" in block:
        block = {k: v for k, v in block.items() if k != "cache_control"}
    return orjson.dumps(block, option=orjson.OPT_SORT_KEYS).decode()


def _answer_text(prompt: _Prompt) -> str:
    digest = prompt.answer.digest()
    # 12 hex digits (48 bits): distinct prompts in a 100k batch collide with p ~ 2e-5.
    parts = [f"Answer {digest[:6].hex()}:"]
    echo_count = 1 + digest[6] % 5
    for word in prompt.echo.split(maxsplit=12)[:12]:
        cleaned = word.strip(_ECHO_STRIP)[:24]
        if cleaned:
            parts.append(cleaned)
            if len(parts) > echo_count:
                break
    head = " ".join(parts)
    need = 4 * (6 + digest[7] % 35) - len(head) - 2  # natural length: 6 to 40 tokens
    if need > 0:
        # Whole words of the filler text, from a word start picked by the hash.
        start = _FILLER_TEXT.find(" ", int.from_bytes(digest[8:10]) % _FILLER_SPAN) + 1
        end = _FILLER_TEXT.find(" ", start + need)
        head = f"{head} {_FILLER_TEXT[start:end]}"
    return head + "."


def expected_text(params: dict[str, Any]) -> str:
    """The untruncated answer ``respond`` derives for a plain text request with these params."""
    return _answer_text(_Prompt(params))


def count_tokens(body: dict[str, Any]) -> int:
    """``POST /v1/messages/count_tokens``: validate, then the input tokens ``respond`` bills."""
    check_count_tokens_body(body)
    return _Prompt(body).total_tokens


def _base58_id(prefix: str, digest: bytes) -> str:
    """``prefix`` + 22 base58 characters, one per digest byte (via a translation table: fast)."""
    return prefix + digest[:22].translate(_BASE58_TABLE).decode()


def _params_digest(params: dict[str, Any]) -> bytes:
    try:
        raw = orjson.dumps(params, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # e.g. an integer beyond 64 bits; JSON repr is still deterministic
        raw = repr(sorted(params.items())).encode()
    return hashlib.blake2b(raw, digest_size=32).digest()


def _thinking_block(params: dict[str, Any], seed: bytes, ids: bytes) -> dict[str, Any] | None:
    """The ``thinking`` block a request with thinking on gets before its answer, else None.

    Deterministic like the answer; empty with ``display: omitted`` (the API then returns
    only the signature), and never more than a tenth of the budget, so an answer follows.
    """
    config = params.get("thinking") or {}
    if config.get("type") not in ("enabled", "adaptive"):
        return None
    text = ""
    if config.get("display") != "omitted":
        budget = config.get("budget_tokens") or params["max_tokens"] // 2
        text = f"Weighing request {seed[:4].hex()} before answering it briefly."
        text = text[: 4 * (budget // 10)]
    signature = base64.b64encode(hashlib.blake2b(ids, digest_size=48).digest()).decode()
    return {"type": "thinking", "thinking": text, "signature": signature}


def _forced_tool(params: dict[str, Any]) -> dict[str, Any] | None:
    """The tool ``tool_choice`` forces, if any (``any`` picks the first custom tool)."""
    choice = params.get("tool_choice")
    tools = params.get("tools")
    if not choice or not tools:
        return None
    kind = choice.get("type")
    chosen: dict[str, Any] | None = None
    if kind == "tool":
        chosen = next(t for t in tools if t["name"] == choice["name"])
    elif kind == "any":
        custom = [t for t in tools if t.get("type") in (None, "custom")]
        chosen = custom[0] if custom else tools[0]
    return chosen


def _cut_text(
    text: str, max_tokens: int, stop_sequences: Sequence[str]
) -> tuple[str, str, str | None]:
    """Apply stop sequences and the token budget: (text, stop_reason, stop_sequence)."""
    limit = 4 * max_tokens
    best: tuple[int, str] | None = None
    for seq in stop_sequences:
        at = text.find(seq)
        # The sequence must be generated within the budget to stop generation.
        if at >= 0 and at + len(seq) <= limit and (best is None or at < best[0]):
            best = (at, seq)
    if best is not None:
        return text[: best[0]], "stop_sequence", best[1]
    if len(text) > limit:
        return text[:limit], "max_tokens", None
    return text, "end_turn", None


def respond(params: dict[str, Any], *, cache: PromptCache) -> dict[str, Any]:
    """The full ``Message`` the API would return for ``params`` (validated first).

    Raises ``InvalidParams`` for a request the API would reject.
    """
    check_message_params(params)
    prompt = _Prompt(params)
    window = limits_for(params["model"]).context_window
    if prompt.total_tokens > window:
        # Checked on the counted prompt (tools, system, messages), as count_tokens counts it.
        raise InvalidParams(f"prompt is too long: {prompt.total_tokens} tokens > {window} maximum")
    seed = prompt.answer.digest()
    ids = _params_digest(params)
    max_tokens: int = params["max_tokens"]
    stop_sequence: str | None = None
    tool = _forced_tool(params)
    content: list[dict[str, Any]]
    if tool is not None:
        tool_input = value_for(tool.get("input_schema") or {"type": "object"}, seed)
        if not isinstance(tool_input, dict):
            tool_input = {}
        output_tokens = approx_tokens(tool["name"]) + approx_tokens(
            orjson.dumps(tool_input).decode()
        )
        stop_reason = "tool_use"
        if output_tokens > max_tokens:
            tool_input, output_tokens, stop_reason = {}, max_tokens, "max_tokens"
        content = [
            {
                "type": "tool_use",
                "id": _base58_id("toolu_01", ids[10:]),
                "name": tool["name"],
                "input": tool_input,
                "caller": {"type": "direct"},
            }
        ]
    else:
        fmt = (params.get("output_config") or {}).get("format")
        if fmt:
            text = orjson.dumps(value_for(fmt["schema"], seed)).decode()
        else:
            text = _answer_text(prompt)
        thought = _thinking_block(params, seed, ids)
        thought_tokens = approx_tokens(thought["thinking"]) if thought else 0
        # Thinking counts towards max_tokens: the answer gets what the thinking left.
        text, stop_reason, stop_sequence = _cut_text(
            text, max_tokens - thought_tokens, params.get("stop_sequences") or ()
        )
        output_tokens = thought_tokens + approx_tokens(text)
        content = [{"type": "text", "text": text, "citations": None}]
        if thought is not None:
            content.insert(0, thought)
    return {
        "id": _base58_id("msg_01", ids),
        "type": "message",
        "role": "assistant",
        "model": params["model"],
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "stop_details": None,
        "container": None,
        "usage": _usage(prompt, cache, output_tokens, params.get("inference_geo")),
    }


def _usage(prompt: _Prompt, cache: PromptCache, output_tokens: int, geo: object) -> dict[str, Any]:
    read = 0
    created = {"5m": 0, "1h": 0}
    if prompt.breakpoints:
        hit = cache.settle([key for _, key, _ in prompt.breakpoints])
        read = prompt.breakpoints[hit][0] if hit >= 0 else 0
        done = read
        for end, _, ttl in prompt.breakpoints[hit + 1 :]:
            if end > done:
                created[ttl] += end - done
                done = end
    creation = created["5m"] + created["1h"]
    return {
        "input_tokens": prompt.total_tokens - read - creation,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": creation,
        "cache_read_input_tokens": read,
        "cache_creation": {
            "ephemeral_5m_input_tokens": created["5m"],
            "ephemeral_1h_input_tokens": created["1h"],
        },
        "server_tool_use": None,
        "service_tier": "batch",
        "inference_geo": geo if isinstance(geo, str) else None,
    }

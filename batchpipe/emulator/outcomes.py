"""What happens to each request of a batch: its finish time and its result line.

Everything random here is a hash of (seed, purpose, custom_id), not a draw from a shared
RNG, so a request's fate does not depend on which other requests share its batch or on the
order anything is asked for: a failing run replays exactly with the same seed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import orjson

from batchpipe.emulator import responder
from batchpipe.emulator.settings import EmulatorConfig

# Messages of injected per-request errors (the API's own wording where it is known).
_ERROR_MESSAGES: dict[str, str] = {
    "overloaded_error": "Overloaded",
    "api_error": "Internal server error",
    "rate_limit_error": "Number of request tokens has exceeded your rate limit",
    "timeout_error": "Request processing timed out",
}
_INJECTED_INVALID = "params: request rejected by the emulator (invalid_rate fault injection)"


def unit(seed: int, purpose: str, custom_id: str) -> float:
    """A deterministic number in [0, 1) for this seed, purpose and custom_id."""
    digest = hashlib.blake2b(f"{seed}\x00{purpose}\x00{custom_id}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big") / 2.0**64


def params_hash(params: dict[str, Any]) -> bytes:
    """A digest of the canonical params JSON (sorted keys): equal requests, equal hash."""
    canonical = orjson.dumps(params, option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(canonical, digest_size=16).digest()


@dataclass(frozen=True, slots=True)
class Outcome:
    """A finished request: result type, JSONL line, params hash if billed, injected fault kind."""

    result_type: str
    line: str
    billed_hash: bytes | None = None
    fault: str | None = None


def _line(custom_id: str, result: dict[str, Any]) -> str:
    # Compact JSON with no newline inside (orjson escapes control characters in strings).
    # Kept as str: orjson's bytes keep their growth buffer (~8 KiB each), a str is exact.
    return orjson.dumps({"custom_id": custom_id, "result": result}).decode()


def _errored(custom_id: str, error_type: str, message: str, fault: str | None) -> Outcome:
    envelope = {
        "type": "error",
        "error": {"type": error_type, "message": message},
        "request_id": None,  # batch results carry no request id, as on the real API
    }
    return Outcome("errored", _line(custom_id, {"type": "errored", "error": envelope}), None, fault)


def canceled(custom_id: str) -> Outcome:
    """The result of a request that a cancel stopped before it ran."""
    return Outcome("canceled", _line(custom_id, {"type": "canceled"}))


def expired(custom_id: str) -> Outcome:
    """The result of a request that was not processed within 24 hours."""
    return Outcome("expired", _line(custom_id, {"type": "expired"}))


def process(
    custom_id: str, params_json: str, cfg: EmulatorConfig, cache: responder.PromptCache
) -> Outcome:
    """Run one request in its turn: an injected fault, an invalid-params error or a Message."""
    draw = unit(cfg.seed, "outcome", custom_id)
    if draw < cfg.invalid_rate:
        return _errored(custom_id, "invalid_request_error", _INJECTED_INVALID, "item_invalid")
    draw -= cfg.invalid_rate
    if draw < cfg.errored_rate:
        types = cfg.errored_types
        error_type = types[int(unit(cfg.seed, "error_type", custom_id) * len(types))]
        return _errored(custom_id, error_type, _ERROR_MESSAGES[error_type], "item_errored")
    draw -= cfg.errored_rate
    if draw < cfg.expired_rate:
        return Outcome("expired", expired(custom_id).line, None, "item_expired")
    params = orjson.loads(params_json)
    model = params.get("model") if isinstance(params, dict) else None
    if isinstance(model, str) and not cfg.knows_model(model):
        # What the API answers for a model id it does not serve (never worth resending).
        return _errored(custom_id, "not_found_error", f"model: {model}", None)
    try:
        # respond() runs responder.validate_params first, so bad params raise here.
        message = responder.respond(params, cache=cache)
    except responder.InvalidParams as exc:
        return _errored(custom_id, "invalid_request_error", str(exc), None)
    line = _line(custom_id, {"type": "succeeded", "message": message})
    return Outcome("succeeded", line, params_hash(params))

"""Synchronous validation of a create body, with the API's pydantic-style messages.

Only the envelope is checked here (``requests``, ``custom_id``, ``params`` being an object):
the API validates ``params`` asynchronously, so bad params become errored results later.
Hand-written rather than a pydantic model because it runs over 100,000 items per create.
"""

from __future__ import annotations

import re
from typing import Any

from batchpipe.models import API_MAX_BATCH_REQUESTS, CUSTOM_ID_PATTERN

_CUSTOM_ID = re.compile(CUSTOM_ID_PATTERN)
_ITEM_KEYS = frozenset({"custom_id", "params"})


class CreateRejected(ValueError):
    """The create body breaks the API's schema; str() is the 400 message."""


def validate_create_body(body: object) -> list[tuple[str, dict[str, Any]]]:
    """Check a parsed create body; return its (custom_id, params) pairs in order."""
    if not isinstance(body, dict):
        raise CreateRejected("body: Input should be a valid dictionary")
    extra = sorted(k for k in body if k != "requests")
    if extra:
        raise CreateRejected(f"{extra[0]}: Extra inputs are not permitted")
    if "requests" not in body:
        raise CreateRejected("requests: Field required")
    requests = body["requests"]
    if not isinstance(requests, list):
        raise CreateRejected("requests: Input should be a valid list")
    if not requests:
        raise CreateRejected("requests: List should have at least 1 item after validation, not 0")
    if len(requests) > API_MAX_BATCH_REQUESTS:
        raise CreateRejected(
            f"requests: List should have at most {API_MAX_BATCH_REQUESTS} items after "
            f"validation, not {len(requests)}"
        )
    seen: dict[str, int] = {}
    out: list[tuple[str, dict[str, Any]]] = []
    for index, item in enumerate(requests):
        where = f"requests.{index}"
        if not isinstance(item, dict):
            raise CreateRejected(f"{where}: Input should be a valid dictionary")
        extra = sorted(k for k in item if k not in _ITEM_KEYS)
        if extra:
            raise CreateRejected(f"{where}.{extra[0]}: Extra inputs are not permitted")
        for key in ("custom_id", "params"):
            if key not in item:
                raise CreateRejected(f"{where}.{key}: Field required")
        custom_id = item["custom_id"]
        _check_custom_id(where, custom_id)
        if custom_id in seen:
            raise CreateRejected(
                f"{where}.custom_id: Duplicate custom_id {custom_id!r}; it is also used by "
                f"requests.{seen[custom_id]} (custom_id must be unique within a batch)"
            )
        seen[custom_id] = index
        params = item["params"]
        if not isinstance(params, dict):
            raise CreateRejected(f"{where}.params: Input should be a valid dictionary")
        out.append((custom_id, params))
    return out


def _check_custom_id(where: str, custom_id: object) -> None:
    if not isinstance(custom_id, str):
        raise CreateRejected(f"{where}.custom_id: Input should be a valid string")
    if not custom_id:
        raise CreateRejected(f"{where}.custom_id: String should have at least 1 character")
    if len(custom_id) > 64:
        raise CreateRejected(f"{where}.custom_id: String should have at most 64 characters")
    if not _CUSTOM_ID.fullmatch(custom_id):
        raise CreateRejected(
            f"{where}.custom_id: String should match pattern '{CUSTOM_ID_PATTERN}'"
        )

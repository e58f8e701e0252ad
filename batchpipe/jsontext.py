"""JSON text of values that may hold integers beyond 64 bits.

orjson writes integers from -2**63 to 2**64 - 1 and raises ``TypeError`` for any other
(its ``default`` hook is not asked). Input rows can hold such integers: the JSONL reader
keeps them exact (see :mod:`batchpipe.jsonl`), because a 24-digit id turned into a float
loses digits without a word. So wherever row values are written back as JSON (the JSONL
export, JSON-text columns, objects printed into prompts) they go through :func:`dumps`,
which costs nothing extra unless such an integer is there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

_MIN_INT = -(2**63)
_MAX_INT = 2**64 - 1


def dumps(
    value: Any, *, default: Callable[[Any], Any] | None = None, option: int | None = None
) -> bytes:
    """``orjson.dumps`` that writes integers of any size exactly, as JSON numbers."""
    try:
        return orjson.dumps(value, default=default, option=option)
    except TypeError:
        exact = _with_big_ints_as_text(value)
        if exact is value:
            raise  # not a big integer: orjson's own complaint stands
        return orjson.dumps(exact, default=default, option=option)


def _with_big_ints_as_text(value: Any) -> Any:
    """``value`` with each integer orjson cannot write replaced by its digits, pre-encoded
    (``orjson.Fragment``); ``value`` itself when it holds none."""
    if type(value) is int:
        return orjson.Fragment(str(value).encode()) if not _MIN_INT <= value <= _MAX_INT else value
    if isinstance(value, dict):
        items = {k: _with_big_ints_as_text(v) for k, v in value.items()}
        same = all(items[k] is v for k, v in value.items())
        return value if same else items
    if isinstance(value, list | tuple):
        converted = [_with_big_ints_as_text(v) for v in value]
        same = all(a is b for a, b in zip(converted, value, strict=True))
        return value if same else converted
    return value

"""Each model's context window and output limit, as the API enforces them per request.

The API checks both when it processes a batch request (asynchronously, like every other
``params`` check), so a request over either comes back as an ``errored`` result with
``invalid_request_error``, never as a 400 on the create:

- ``max_tokens: 100000 > 64000, which is the maximum allowed number of output tokens for
  claude-haiku-4-5-20251001`` (a captured result line, reference §3.1);
- ``prompt is too long: 205000 tokens > 200000 maximum``.

Limits are those of the synchronous Messages API on each model's page at
platform.claude.com/docs/en/models/<model>/overview (1M context windows are the models'
own, not the ``context-1m`` beta; the batch-only ``output-300k`` beta is not emulated).
A model outside the table (``--models '*'``) gets :data:`DEFAULT_LIMITS`.

The one table: the emulator enforces it (``emulator.params_check``, ``emulator.responder``)
and the pipeline checks a job's ``max_tokens`` against it before anything is stored or
sent (:func:`known_limits`), so a request the API would refuse for every row is refused
up front instead of after the whole batch wait. No I/O here (core layer).
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ModelLimits:
    """A model's context window (prompt tokens) and its largest ``max_tokens``."""

    context_window: int
    max_output_tokens: int


_K = 1_000
_1M = ModelLimits(context_window=1_000 * _K, max_output_tokens=128 * _K)
_200K_64K = ModelLimits(context_window=200 * _K, max_output_tokens=64 * _K)
_200K_32K = ModelLimits(context_window=200 * _K, max_output_tokens=32 * _K)

# Every id in settings.KNOWN_MODELS (tests/test_emulator.py checks none is missing).
MODEL_LIMITS: dict[str, ModelLimits] = {
    "claude-opus-4-7": _1M,
    # Not published in the material here; taken to be Opus 4.7's.
    "claude-mythos-preview": _1M,
    "claude-opus-4-6": _1M,
    "claude-sonnet-4-6": _1M,
    "claude-haiku-4-5": _200K_64K,
    "claude-haiku-4-5-20251001": _200K_64K,
    "claude-opus-4-5": _200K_64K,
    "claude-opus-4-5-20251101": _200K_64K,
    "claude-sonnet-4-5": _200K_64K,
    "claude-sonnet-4-5-20250929": _200K_64K,
    "claude-opus-4-1": _200K_32K,
    "claude-opus-4-1-20250805": _200K_32K,
    "claude-opus-4-0": _200K_32K,
    "claude-opus-4-20250514": _200K_32K,
    "claude-sonnet-4-0": _200K_64K,
    "claude-sonnet-4-20250514": _200K_64K,
    "claude-3-haiku-20240307": ModelLimits(context_window=200 * _K, max_output_tokens=4_096),
}

# For model ids the table does not know (answered only with --models '*'): the largest
# output any model allows and the common 200K window.
DEFAULT_LIMITS = ModelLimits(context_window=200 * _K, max_output_tokens=128 * _K)


def limits_for(model: str) -> ModelLimits:
    """The limits the API applies to requests for ``model``."""
    return MODEL_LIMITS.get(model, DEFAULT_LIMITS)


# A dated snapshot of an alias: claude-sonnet-4-5-20250929 has claude-sonnet-4-5's limits.
_SNAPSHOT = re.compile(r"-\d{8}$")


def known_limits(model: str) -> ModelLimits | None:
    """``model``'s limits if the table knows it or its alias (a dated snapshot), else None:
    new models appear, and a guess must not refuse them."""
    found = MODEL_LIMITS.get(model)
    if found is None:
        found = MODEL_LIMITS.get(_SNAPSHOT.sub("", model))
    return found

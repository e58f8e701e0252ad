"""Per-call HTTP fault injection: queued statuses, rate-driven errors, slow calls, broken streams.

Draws come from the emulator's seeded ``random.Random``, one stream for all calls, so the
same sequence of calls meets the same faults on a replay with the same seed. The caller
holds the emulator lock while drawing.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import httpx2

from batchpipe.emulator.failures import ApiFailure
from batchpipe.emulator.settings import HTTP_FAULT_TYPES
from batchpipe.emulator.store import BatchStore

_MESSAGES = {
    429: "Number of requests has exceeded your rate limit (emulator fault injection)",
    500: "Internal server error (emulator fault injection)",
    529: "Overloaded (emulator fault injection)",
}


class ResultsStreamBroken(httpx2.RemoteProtocolError):
    """Raised mid-download to drop a results stream.

    Over real HTTP the server turns it into a connection closed before the final chunk, which
    the client sees as ``httpx2.RemoteProtocolError``; in-process it reaches the client as
    this subclass of the same class, so client code handles both the same way.
    """


@dataclass(frozen=True, slots=True)
class CallFault:
    """What to do to one API call: delay it, and/or answer it with an error."""

    failure: ApiFailure | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    slow_seconds: float = 0.0


def draw_call_fault(store: BatchStore, rng: random.Random) -> CallFault:
    """Decide this call's fault: ``fail_next`` first, then the rates, then slowness."""
    cfg = store.config
    status: int | None = None
    if cfg.fail_next:
        status = cfg.fail_next[0]
        # Assigning a new list (not mutating in place) keeps pydantic's view consistent.
        cfg.fail_next = cfg.fail_next[1:]
    else:
        draw = rng.random()
        for code, rate in cfg.http_fault_statuses():
            if draw < rate:
                status = code
                break
            draw -= rate
    slow = cfg.slow_seconds if cfg.slow_rate and rng.random() < cfg.slow_rate else 0.0
    if slow:
        store.faults["slow"] += 1
    if status is None:
        return CallFault(slow_seconds=slow)
    store.faults[f"http_{status}"] += 1
    error_type = HTTP_FAULT_TYPES[status]
    message = _MESSAGES.get(status, f"{error_type} (emulator fault injection)")
    headers: list[tuple[str, str]] = []
    if status == 429 and cfg.retry_after > 0:
        headers.append(("retry-after", f"{cfg.retry_after:g}"))
    if status == 429 and cfg.retry_after_ms > 0:
        headers.append(("retry-after-ms", f"{cfg.retry_after_ms:g}"))
    if cfg.should_retry:
        headers.append(("x-should-retry", cfg.should_retry))
    return CallFault(ApiFailure(status, error_type, message), headers, slow)


def draw_results_break(store: BatchStore, rng: random.Random, line_count: int) -> int | None:
    """How many lines to send before dropping this download, or None to send them all."""
    cfg = store.config
    if not cfg.results_break_rate or rng.random() >= cfg.results_break_rate:
        return None
    if cfg.results_break_after >= line_count:
        return None  # nothing left to cut: the download completes
    store.faults["results_break"] += 1
    return cfg.results_break_after

"""The one place that configures structlog.

Logs go to stderr (stdout is for data, so ``status --json | jq`` works): a readable console
renderer on a TTY, JSON lines otherwise (cron, Airflow). Event names look like
``batch.submitted``; ids are bound as context. Callers log ids, counts, token usage, latency,
error types and request ids -- never API keys, prompts or answers. As a last line of defence a
processor redacts anything that looks like an API key.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

_KEY_RE = re.compile(r"sk-ant-[A-Za-z0-9_\-]+|sk-[A-Za-z0-9_\-]{16,}")


def _redact_secrets(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in event.items():
        if isinstance(value, str) and _KEY_RE.search(value):
            event[key] = _KEY_RE.sub("[redacted]", value)
    return event


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def _readable(value: Any) -> Any:
    """A dict or list as people write it (``expired:3,errored:1``), not a Python repr
    (``{'expired': 3}``); nested ones as compact JSON. No spaces: a value stays one word on
    a ``key=value`` line."""
    if isinstance(value, dict):
        if not value:
            return "none"
        if all(isinstance(k, str) and _scalar(v) for k, v in value.items()):
            return ",".join(f"{k}:{v}" for k, v in value.items())
    elif isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=str) if isinstance(value, set | frozenset) else list(value)
        if not items:
            return "none"
        if all(_scalar(v) for v in items):
            return ",".join(str(v) for v in items)
    else:
        return value
    return json.dumps(value, separators=(",", ":"), default=str)


def _readable_values(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Console only: containers rendered for people (JSON lines keep them as JSON)."""
    for key, value in event.items():
        if key != "event":
            event[key] = _readable(value)
    return event


def _over_progress_line(renderer: Any) -> Any:
    """Start each console line by clearing the terminal line, so a log line that arrives while
    a progress bar is drawn (no newline yet) replaces the bar instead of running on after it;
    the bar redraws itself below on its next update."""

    def render(logger: Any, name: str, event: MutableMapping[str, Any]) -> str:
        return "\r\x1b[2K" + str(renderer(logger, name, event))

    return render


def configure(
    fmt: str = "auto", *, level: int = logging.INFO, stream: TextIO | None = None
) -> None:
    """Configure structlog for the process. ``fmt`` is auto, console or json."""
    out = stream if stream is not None else sys.stderr
    use_console = fmt == "console" or (fmt == "auto" and out.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=out.isatty())
        if use_console
        else structlog.processors.JSONRenderer()
    )
    if use_console and out.isatty():
        renderer = _over_progress_line(renderer)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact_secrets,
            structlog.processors.format_exc_info,
            *([_readable_values] if use_console else []),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> Any:
    """A structlog logger tagged with the module name."""
    # Not ``logger=name``: ``logger`` is a parameter of structlog's wrap_logger (TypeError).
    return structlog.get_logger(name, logger_name=name)

"""Checks before anything is stored or sent: a job's request settings against what the API
allows, and its output still writable.

A ``max_tokens`` over the model's output limit is accepted by the batch create and then
fails every row, after the whole batch wait (up to 24 hours). The limits come from the one
table in :mod:`batchpipe.model_limits`, which the emulator enforces too.
"""

from __future__ import annotations

from batchpipe.dataset import check_writable
from batchpipe.errors import UsageError
from batchpipe.log import get_logger
from batchpipe.model_limits import known_limits
from batchpipe.models import JobSpec

log = get_logger(__name__)


def check_output_limit(spec: JobSpec) -> None:
    """Refuse (UsageError, exit 2) a known model asked for more output tokens than it can
    give, by ``--max-tokens`` or ``--retry-truncated-max-tokens``; for a model the table
    does not know, log a warning and go on (new models appear before the table has them)."""
    limits = known_limits(spec.model)
    if limits is None:
        log.warning(
            "model.output_limit_unknown",
            model=spec.model,
            max_tokens=spec.max_tokens,
            hint="max_tokens not checked against the model's limit; check --model",
        )
        return
    limit = limits.max_output_tokens
    asked = (
        ("--max-tokens", spec.max_tokens),
        ("--retry-truncated-max-tokens", spec.retry_truncated_max_tokens),
    )
    for flag, value in asked:
        if value is not None and value > limit:
            raise UsageError(
                f"{flag} {value} is over {spec.model}'s output limit of {limit:,} tokens: "
                f"every request would come back errored after the batch wait; nothing was "
                f"stored or sent. Give {flag} {limit} or less"
            )


def check_output_writable(spec: JobSpec) -> None:
    """Refuse to send more for a job whose output can no longer be written (the folder was
    removed, made read-only …): the export would only fail after paying."""
    if spec.output:
        check_writable(spec.output, source=spec.input)

"""The one rule for a later command of a known job: what it gives applies, the rest is kept.

A command's settings come from its flags, ``BATCHPIPE_*`` variables and job file (see
``config.given_job_settings``); a :class:`~batchpipe.models.JobSpec` built from them has
exactly those in ``model_fields_set``. For a job that already exists:

- ``SETTINGS_FIELDS`` (settings that change no request: ``-o``, ``--poll-interval``, the
  batch limits, ``--skip-invalid``, ``--retry-truncated-max-tokens``, ``--max-cost``,
  ``--result-prefix``, ``--max-failed``) take the value the command gives, which is stored
  with the job for every later command (``tick`` included), and otherwise keep the job's.
  ``--max-failed default`` puts the limit back to unset (``JobSpec.max_failed_over``).
- ``max_attempts`` is not carried: it counts the tries of one round (the first run, a
  re-run that changes requests, a retry). Stored, it is the job's cap, the highest attempt
  so far plus one round, so taking it back as a round would add up rounds on every re-run.
  A round the command does not size gets the default, as the full command would.
- Request settings (template, model, …) and the input are the job's identity: a command
  that gives all of INPUT, --prompt, --model and --max-tokens defines them in full; one
  that names a known job with ``--job`` and leaves some out (``run --job NAME`` alone, or
  with only a new ``--prompt``) takes each one it does not give from the job
  (:func:`complete_spec`).

Both ways a known job is opened use :func:`carried_settings`: ``open_job`` (nothing to
re-send) and ``apply_rerun`` (requests changed).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from batchpipe.config import job_spec_from
from batchpipe.models import JobSpec

# Settings that change no request: given, they replace the job's; not given, the job's stay.
SETTINGS_FIELDS: tuple[str, ...] = (
    "output",
    "poll_interval",
    "skip_invalid",
    "max_batch_requests",
    "max_batch_bytes",
    "retry_truncated_max_tokens",
    "max_cost",
    "result_prefix",
    "max_failed",
)
# Per round of tries, never carried (see the module docstring).
ROUND_FIELDS: tuple[str, ...] = ("max_attempts",)


def given_settings(spec: JobSpec) -> set[str]:
    """The fields of ``spec`` its command gave (flag, environment or job file, not null):
    the others are defaults, which must not replace what a known job was given before."""
    return {k for k in spec.model_fields_set if getattr(spec, k) is not None}


def carried_settings(existing: JobSpec, spec: JobSpec) -> dict[str, Any]:
    """Every one of ``SETTINGS_FIELDS`` as the job has it after a command with ``spec``:
    the command's value where it gives one, else the job's (``existing``)."""
    given = given_settings(spec)
    out = {k: getattr(spec if k in given else existing, k) for k in SETTINGS_FIELDS}
    out["max_failed"] = spec.max_failed_over(existing.max_failed)
    return out


def complete_spec(existing: JobSpec, given: Mapping[str, Any]) -> JobSpec:
    """The spec of an incomplete command for the known job ``existing``: what was ``given``,
    plus the job's input and request settings for each one it leaves out.

    Settings that change no request and ``max_attempts`` are not filled in here: they stay
    out of ``model_fields_set``, so :func:`carried_settings` keeps the job's and a re-run
    counts a default round. (Filled in as if typed, they would override BATCHPIPE_*
    variables and add the job's attempt cap up on every re-run.)
    """
    identity = existing.model_dump(exclude={*SETTINGS_FIELDS, *ROUND_FIELDS})
    merged = {**identity, **{k: v for k, v in given.items() if v is not None}}
    return job_spec_from(merged)

"""Settings and job specs, merged: CLI flag > BATCHPIPE_* env > TOML job file > defaults.

Secrets come only from the environment (``ANTHROPIC_API_KEY``); they are never read from a
job file, never stored with a job and never printed (``SecretStr`` hides them in reprs).
"""

from __future__ import annotations

import difflib
import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import SecretStr, ValidationError

from batchpipe.errors import MissingSettings, UsageError
from batchpipe.models import JobSpec
from batchpipe.structured import labels_schema, read_schema_file

ENV_PREFIX = "BATCHPIPE_"
DEFAULT_DATABASE_URL = "sqlite:///batchpipe.db"


@dataclass(frozen=True)
class Settings:
    """Process-wide settings: where state lives and how to reach the API."""

    database_url: str = DEFAULT_DATABASE_URL
    api_key: SecretStr | None = None
    base_url: str | None = None
    log_format: str = "auto"  # auto | console | json
    max_retries: int = 4  # the SDK's own transport retries per call
    request_timeout: float = 600.0
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(
        cls,
        *,
        database_url: str | None = None,
        log_format: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Settings:
        """Build settings from explicit values, then the environment, then defaults."""
        env = os.environ if env is None else env
        # Surrounding whitespace is never part of a key: a trailing newline or CR comes with
        # `$(cat key.txt)` or a Windows-edited env file, and would make every call fail.
        key = (env.get("ANTHROPIC_API_KEY") or "").strip()
        return cls(
            database_url=database_url
            or env.get(f"{ENV_PREFIX}DATABASE_URL")
            or DEFAULT_DATABASE_URL,
            api_key=SecretStr(key) if key else None,
            base_url=env.get("ANTHROPIC_BASE_URL") or None,
            log_format=log_format or env.get(f"{ENV_PREFIX}LOG_FORMAT") or "auto",
        )


def _env_layer(env: Mapping[str, str]) -> dict[str, Any]:
    """BATCHPIPE_<FIELD> variables for JobSpec fields (values parsed by pydantic), and
    BATCHPIPE_LABELS, as --labels (see :func:`_structured`)."""
    out: dict[str, Any] = {}
    for name in (*JobSpec.model_fields, "labels"):
        value = env.get(f"{ENV_PREFIX}{name.upper()}")
        if value is not None and value != "":
            out[name] = value
    return out


def _structured(layer: dict[str, Any], base: Path, job_file: Path | None) -> dict[str, Any]:
    """A job file's or the environment's settings with ``labels``, ``output_schema`` and
    ``params`` given as the options give them, made what the spec holds.

    ``labels`` (a list, or text like --labels a,b,c) becomes its output schema;
    ``output_schema`` given as text is a JSON file (relative to ``base``: the job file's
    folder, or the working directory for BATCHPIPE_OUTPUT_SCHEMA); ``params`` as text is a
    JSON object (BATCHPIPE_PARAMS). BATCHPIPE_LABELS used to be dropped without a word, and
    the job paid for free-text answers.
    """
    where = f"job file {job_file}" if job_file is not None else "the environment"
    labels = layer.pop("labels", None)
    if labels is not None:
        if layer.get("output_schema") is not None:
            raise UsageError(f"{where}: give labels or output_schema, not both")
        items = labels.split(",") if isinstance(labels, str) else labels
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise UsageError(f"{where}: labels must be a list of strings, or text like a,b,c")
        layer["output_schema"] = labels_schema(items)
    schema = layer.get("output_schema")
    if isinstance(schema, str):
        path = Path(schema)
        what = f"{where}: output_schema" if job_file else "BATCHPIPE_OUTPUT_SCHEMA"
        layer["output_schema"] = read_schema_file(path if path.is_absolute() else base / path, what)
    params = layer.get("params")
    if isinstance(params, str):
        try:
            layer["params"] = json.loads(params)
        except json.JSONDecodeError as exc:
            raise UsageError(f"BATCHPIPE_PARAMS is not a JSON object: {exc}") from None
    return layer


def _load_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise UsageError(f"cannot read job file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"job file {path} is not valid TOML: {exc}") from None


def read_job_file(path: Path) -> dict[str, Any]:
    """Read a TOML job file: top-level keys are JobSpec fields, plus an optional [params] table."""
    data = _load_toml(path)
    if "api_key" in data or "anthropic_api_key" in data:
        raise UsageError(
            f"job file {path}: an API key does not belong in a job file; "
            "set ANTHROPIC_API_KEY in the environment"
        )
    data.pop("name", None)  # a job file may name its job; the CLI reads that separately
    data.pop("database_url", None)
    known = {*JobSpec.model_fields, "labels"}
    for key in sorted(set(data) - known):
        # Said first: a misspelt `modle` was only reported as a missing --model.
        close = difflib.get_close_matches(key, sorted(known), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UsageError(f"job file {path}: unknown setting {key!r}{hint}")
    return data


def job_file_settings(path: Path) -> dict[str, Any]:
    """The non-spec keys a job file may carry (`name`, `database_url`)."""
    data = _load_toml(path)
    return {k: data[k] for k in ("name", "database_url") if k in data}


def given_job_settings(
    flags: Mapping[str, Any],
    *,
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The job settings a command gives, merged: job file < BATCHPIPE_* env < flags.

    Flags that are None count as not given. Defaults are not filled in: what is absent here
    was not given, which is how a known job tells the settings to keep (pipeline.carry).
    """
    env = os.environ if env is None else env
    merged: dict[str, Any] = {}
    if config_file is not None:
        merged.update(_structured(read_job_file(config_file), config_file.parent, config_file))
        # Relative paths in a job file are relative to the file, as users expect.
        base = config_file.parent
        for key in ("input", "output"):
            value = merged.get(key)
            if isinstance(value, str) and "://" not in value and not Path(value).is_absolute():
                merged[key] = str(base / value)
    merged.update(_structured(_env_layer(env), Path.cwd(), None))
    merged.update({k: v for k, v in flags.items() if v is not None})
    # Stored with the job, paths must not depend on the directory a later `tick` runs in
    # (cron starts in $HOME): make local ones absolute now.
    for key in ("input", "output"):
        value = merged.get(key)
        if isinstance(value, str) and value and "://" not in value:
            merged[key] = os.path.abspath(value)
    return merged


def job_spec_from(settings: Mapping[str, Any]) -> JobSpec:
    """A validated JobSpec from complete ``settings``; MissingSettings names what is missing.

    The spec's ``model_fields_set`` is exactly the keys of ``settings``.
    """
    missing = [k for k in ("input", "prompt", "model", "max_tokens") if k not in settings]
    if missing:
        # The input is the commands' INPUT argument, not a flag (`input` in a job file).
        flags_needed = ", ".join(
            "INPUT" if k == "input" else "--" + k.replace("_", "-") for k in missing
        )
        where = "on the command line, in --config or as BATCHPIPE_* variables"
        raise MissingSettings(
            f"missing {flags_needed} (give {'them' if len(missing) > 1 else 'it'} {where})"
        )
    try:
        return JobSpec.model_validate(settings)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise UsageError(f"invalid job settings: {problems}") from None


def build_job_spec(
    flags: Mapping[str, Any],
    *,
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> JobSpec:
    """Merge the layers into a validated JobSpec. Flags that are None count as not given."""
    return job_spec_from(given_job_settings(flags, config_file=config_file, env=env))

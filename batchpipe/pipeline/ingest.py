"""Ingest: create or resume a job, validate every row, and record one item per row.

Validation happens before anything is sent: ids, duplicate keys, template rendering and
request size. By default one bad row fails the job with a list of the bad rows; with
`skip_invalid` the bad rows become `invalid` items that are exported but never sent.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Sequence
from pathlib import PurePosixPath
from typing import Any

import orjson

from batchpipe.dataset import Dataset, output_format
from batchpipe.db import AscendingKeys, JobNameTaken, JobRow
from batchpipe.errors import InputChangedError, InputError, PreflightFailed, UsageError
from batchpipe.log import get_logger
from batchpipe.memory import release_free_memory
from batchpipe.models import RESULT_COLUMNS, ItemStatus, JobSpec, JobStatus
from batchpipe.pipeline.carry import ROUND_FIELDS, SETTINGS_FIELDS, carried_settings
from batchpipe.pipeline.context import Context, bind, check_same_api, failpoint, job_spec
from batchpipe.pipeline.fingerprint import check_fingerprint
from batchpipe.pipeline.problems import ProblemTally, row_location
from batchpipe.requests import (
    IdKinds,
    MixedIds,
    NestedId,
    RequestRenderer,
    RowProblem,
    check_result_column_clash,
    check_row_key,
    chunk_keys,
    id_kind,
    new_job_token,
    standin_key,
)

# Spec fields that may change between runs of the same job without changing any request:
# the one list of pipeline.carry (settings, and the round of tries).
_NON_IDENTITY_FIELDS = {*SETTINGS_FIELDS, *ROUND_FIELDS}
# Spec fields that shape requests: changing them re-runs the rows whose request changed.
REQUEST_FIELDS = (
    frozenset(JobSpec.model_fields)
    - _NON_IDENTITY_FIELDS
    - {
        "input",
        "input_format",
        "id_column",
    }
)
# Newer request fields, left out of the default job name at their defaults, so the names
# of jobs started before they existed stay the same.
_ID_HINT = (
    "; nothing was submitted. Name a column of those with --id-column, or leave it out to "
    "key rows by their position"
)
_NAME_NEUTRAL_DEFAULTS = {"output_schema": None, "output_mode": "tool", "cache_system": False}

log = get_logger(__name__)


def default_job_name(spec: JobSpec, *, emulated: bool = False) -> str:
    """A stable name for a spec: the input's stem plus a hash of everything that shapes requests.

    Running the same command again therefore resumes the same job. With ``--emulate``
    (``emulated``) the hash differs: the same command for real is another job.
    """
    identity = spec.model_dump(exclude=_NON_IDENTITY_FIELDS)
    for key, default in _NAME_NEUTRAL_DEFAULTS.items():
        if identity.get(key) == default:
            del identity[key]
    if emulated:  # only then: real jobs keep the names they had before this existed
        identity["emulated"] = True
    digest = hashlib.blake2b(orjson.dumps(identity, option=orjson.OPT_SORT_KEYS), digest_size=4)
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", PurePosixPath(spec.input.split("?")[0]).stem)[:40]
    return f"{stem or 'job'}-{digest.hexdigest()}"


def open_job(ctx: Context, name: str, spec: JobSpec) -> JobRow:
    """Return the job called `name`, creating it if new; refuse a clashing spec for a known name."""
    job = ctx.store.get_job(name)
    if job is None:
        stored = spec.model_copy(update={"max_failed": spec.max_failed_over(None)})
        try:
            # Born leased to us: see Store.create_job (no tick may step it in between).
            return ctx.store.create_job(
                name=name,
                token=new_job_token(),
                spec=stored.model_dump(),
                input_fingerprint=None,
                lease_owner=ctx.owner,
                lease_ttl_seconds=ctx.lease_ttl_seconds,
                emulated=ctx.emulated,
            )
        except JobNameTaken:  # another worker created it a moment ago
            job = ctx.store.get_job(name)
            assert job is not None
    check_same_api(ctx, job)  # a job file's fixed name: `--emulate` first, then for real
    existing = job_spec(job)
    old = existing.model_dump(exclude=_NON_IDENTITY_FIELDS)
    new = spec.model_dump(exclude=_NON_IDENTITY_FIELDS)
    changed = sorted(k for k in new if new[k] != old.get(k))
    if changed and job.status == JobStatus.FAILED and not job.ingested:
        # Refused before any row was stored or sent (a template typo, a bad id column …):
        # the fixed settings simply replace the ones that failed; nothing is re-run.
        stored = spec.model_copy(update={"max_failed": spec.max_failed_over(None)})
        if ctx.store.update_job(job.id, expected_status=JobStatus.FAILED, spec=stored.model_dump()):
            fresh = ctx.store.get_job(job.id)
            assert fresh is not None
            return fresh
    if changed and REQUEST_FIELDS.issuperset(changed):
        raise RequestsChanged(job, changed)
    if changed:
        raise UsageError(
            f"job {job.id} ({job.name}) already exists with different {', '.join(changed)}; "
            "give this run a new --job name, or run the original settings to resume it"
        )
    # The one rule (pipeline.carry): settings given replace the job's, the others stay.
    carried = {
        k: v for k, v in carried_settings(existing, spec).items() if v != getattr(existing, k)
    }
    if carried:
        ctx.store.update_job(job.id, spec=existing.model_copy(update=carried).model_dump())
        job = ctx.store.get_job(job.id)
        assert job is not None
    return job


class RequestsChanged(UsageError):
    """A known job was given settings that change its requests (template, model …)."""

    def __init__(self, job: JobRow, fields: list[str]) -> None:
        super().__init__(
            f"job {job.id} ({job.name}) already exists with different {', '.join(fields)}"
        )
        self.job = job
        self.fields = fields


def describe_problem(problem: RowProblem) -> str:
    """One line for users, rows counted from 1: ``row 4 (id 'a7'): column 'body' is null``."""
    who = f"row {problem.row_index + 1}"
    if problem.row_key is not None:
        who += f" (id {problem.row_key!r})"
    return f"{who}: {problem.message}"


def _has(columns: list[str]) -> str:
    """The input's columns for a message; a file without any says so rather than nothing."""
    return f"it has: {', '.join(columns)}" if columns else "the file has no columns at all"


def check_columns(dataset: Dataset, spec: JobSpec, renderer: RequestRenderer) -> None:
    """Column-level checks that need no row: clashes, unknown template or id columns."""
    columns = dataset.columns()
    if not columns and dataset.format == "jsonl":
        return  # no row, so no column to check (a Parquet file has its schema even empty)
    outputs = spec.output_schema or {}
    added = (*RESULT_COLUMNS, *outputs.get("properties", {}))
    check_result_column_clash(columns, [spec.result_column(name) for name in added])
    missing = sorted(renderer.template_columns() - set(columns))
    if missing:
        # Named per template: a column only the --system template prints was reported as
        # "the template's", sending users to look in --prompt.
        by_template: dict[str, list[str]] = {}
        for column in missing:
            which = " and ".join(f"--{name}" for name in renderer.templates_using(column))
            by_template.setdefault(which, []).append(repr(column))
        uses = "; ".join(
            f"the {which} {'templates use' if ' and ' in which else 'template uses'} "
            f"column(s) {', '.join(cols)}"
            for which, cols in by_template.items()
        )
        raise InputError(f"{dataset.uri}: {uses}, which the input does not have ({_has(columns)})")
    if spec.id_column is not None and spec.id_column not in columns:
        raise InputError(
            f"{dataset.uri}: --id-column {spec.id_column!r} is not a column of the input "
            f"({_has(columns)})"
        )
    if spec.output is not None and output_format(spec.output) == "jsonl":
        dataset.check_python_readable()  # a JSONL output turns every column into JSON
    nested = dataset.nested_column(spec.id_column) if spec.id_column is not None else None
    if nested is not None:
        raise InputError(
            f"{dataset.uri}: --id-column {spec.id_column!r} is a {nested} column; ids must be "
            f"strings or whole numbers{_ID_HINT}"
        )


def ingest(ctx: Context, job: JobRow) -> JobRow:
    """Validate every row and insert the job's items; a no-op when already ingested.

    An input without rows makes a job with nothing to send: done at once (its export is an
    empty file), so a scheduled run over an empty partition succeeds rather than fails. If
    that file has rows by the next run of the command, the job is ingested again: with no
    rows it has nothing to mislabel.
    """
    if job.ingested and job.row_count:
        return job
    spec = job_spec(job)
    dataset = Dataset(spec.input, spec.input_format)
    if job.ingested and not _changed(dataset, job):
        return job
    renderer = RequestRenderer(spec)
    check_columns(dataset, spec, renderer)
    fingerprint = dataset.fingerprint()
    logger = bind(job, log)
    problems = ProblemTally()
    counts = {"rows": 0, "invalid": 0}
    read = renderer.columns_to_read()
    if read is not None and spec.id_column:
        read.add(spec.id_column)

    order = AscendingKeys()  # keys in ascending order need no duplicate query

    def items() -> Iterator[tuple[int, str, ItemStatus, str | None]]:
        ctx.progress.start("validating rows")
        row_index = -1
        see = order.see
        for first_row, checked_rows in check_chunks(dataset, spec, renderer, read, requests=False):
            for row_index, checked in enumerate(checked_rows, first_row):
                if isinstance(checked, RowProblem):
                    counts["invalid"] += 1
                    problems.add(checked)
                    key = checked.row_key
                    if key is None:  # no usable id: a key no real id can have
                        key = standin_key(row_index)
                    status, error = ItemStatus.INVALID, checked.message
                else:
                    key, status, error = checked[0], ItemStatus.PENDING, None
                see(key)
                yield row_index, key, status, error
            ctx.progress.advance(len(checked_rows))
            ctx.heartbeat(job.id)
        counts["rows"] = row_index + 1
        ctx.progress.finish()
        if counts["invalid"] and not spec.skip_invalid:
            # Raising inside the generator rolls back the whole insert: nothing is stored.
            raise _preflight_error(dataset, problems)

    # A process that died between inserting the items and recording the fingerprint (the
    # "ingested" mark) left them behind; nothing of them was sent, so start over.
    leftovers = ctx.store.delete_items(job.id)
    if leftovers:
        logger.warning("job.ingest_restarted", leftover_items=leftovers)
    inserted = ctx.store.insert_items(job.id, items())
    failpoint("after_insert_items")
    duplicates = ctx.store.find_duplicate_keys(job.id) if spec.id_column and not order.holds else []
    if duplicates:
        ctx.store.delete_items(job.id)
        raise duplicates_error(dataset, spec, duplicates)
    ctx.store.update_job(
        job.id,
        row_count=inserted,
        invalid_count=counts["invalid"],
        input_fingerprint=fingerprint,
        status=JobStatus.RUNNING if counts["rows"] else JobStatus.DONE,
        error=None,
        exported_at=None,  # an empty input filled since: its output is written again
    )
    logger.info("job.ingested", rows=inserted, invalid=counts["invalid"])
    if not counts["rows"]:
        logger.warning("job.empty_input", input=dataset.uri)  # done: nothing to send
    elif counts["rows"] > 1 and renderer.columns_to_read() == set():
        # Legal (n answers to one question), but far more often `{body}` for `{{ body }}`:
        # said before the first batch is paid for.
        logger.warning(
            "job.same_prompt_for_every_row",
            rows=counts["rows"],
            hint="the templates print no column; a column is written {{ column }}",
        )
    release_free_memory()
    refreshed = ctx.store.get_job(job.id)
    assert refreshed is not None
    return refreshed


def duplicates_error(
    dataset: Dataset, spec: JobSpec, duplicates: list[tuple[str, list[int]]]
) -> PreflightFailed:
    """The refusal of an input whose id column repeats keys (``find_duplicate_keys``' list).

    Rows are numbered from 1, with their file line where blank lines make it differ, as
    validation numbers them (``problems.row_location``).
    """
    lines = dataset.lines_of({i for _, rows in duplicates for i in rows})  # one pass, JSONL
    shown = "; ".join(
        f"{key!r} in rows {', '.join(row_location(i, lines.get(i)) for i in rows)}"
        for key, rows in duplicates
    )
    return PreflightFailed(
        f"{dataset.uri}: column {spec.id_column!r} must identify rows uniquely, but has "
        f"duplicates: {shown}; nothing was submitted. Make the column unique, or run "
        "without --id-column to key rows by their position",
        [shown],
    )


def mixed_ids_error(dataset: Dataset, spec: JobSpec, mixed: MixedIds | NestedId) -> InputError:
    """The refusal of an input whose id column holds ids of two kinds, or whose first id is
    an object or array (see ``IdKinds``)."""
    if isinstance(mixed, NestedId):
        return InputError(
            f"{dataset.where(mixed.row)}: --id-column {spec.id_column!r} holds "
            f"{id_kind(mixed.value)} ({_short(mixed.value)}); ids must be strings or whole "
            f"numbers{_ID_HINT}"
        )
    first = dataset.where(mixed.first_row).removeprefix(f"{dataset.uri}, ")
    return InputError(
        f"{dataset.where(mixed.row)}: column {spec.id_column!r} (the id column) holds "
        f"{id_kind(mixed.value)} ({mixed.value!r}), but {first} holds "
        f"{id_kind(mixed.first_value)} ({mixed.first_value!r}); nothing was submitted. Ids "
        'must all be of one kind, or 1 and "1" (or 1 and 1.0) would be taken for one id '
        "or exported alike: quote every id in the file (ids are usually strings), or write "
        "them all as whole numbers"
    )


def _short(value: object) -> str:
    """A value for a message, cut to a readable length."""
    text = orjson.dumps(value, default=str).decode()
    return text if len(text) <= 60 else text[:57] + "..."


def _changed(dataset: Dataset, job: JobRow) -> bool:
    """Whether the input's bytes differ from those the job was ingested from."""
    try:
        check_fingerprint(dataset, job)
    except InputChangedError:
        return True
    return False


Checked = tuple[str, dict[str, Any] | None] | RowProblem


def check_chunks(
    dataset: Dataset,
    spec: JobSpec,
    renderer: RequestRenderer,
    columns: set[str] | None = None,
    *,
    requests: bool = True,
) -> Iterator[tuple[int, list[Checked]]]:
    """Every row of the input checked, a chunk at a time: the chunk's first row index and,
    per row, its key and request params (None unless ``requests``: ingest stores no
    request, and checking without building them is cheaper) if it can be sent, else what
    is wrong with it.

    ``columns``: the ones to read (None: all). A row whose request is bad but whose id is
    good keeps its key in the problem (``row_key``): it still counts for duplicates.
    Rendering checks the request's size too, with the longest custom_id any attempt can
    get, so no attempt can overflow a batch. An id column holding ids of two kinds
    raises InputError (``mixed_ids_error``); raising inside a generator that feeds the
    store's insert rolls the insert back.
    """
    ids = IdKinds(spec.id_column)
    first_row = 0
    for chunk in dataset.iter_chunks(columns=columns):
        rendered: Sequence[dict[str, Any] | RowProblem | None] = (
            renderer.render_chunk(chunk, first_row)
            if requests
            else renderer.check_chunk(chunk, first_row)
        )
        # Keys from the id column as a whole: a Parquet column holds one kind of id, so
        # IdKinds has nothing to check there (it serves JSONL, where rows go one by one).
        keys = chunk_keys(chunk, spec.id_column, first_row)
        rows = chunk.rows() if keys is None else None
        checked: list[Checked] = []
        for offset, params in enumerate(rendered):
            row_index = first_row + offset
            if rows is None:
                assert keys is not None
                key: str | RowProblem = keys[offset]
            else:
                mixed = ids.check(rows[offset], row_index)
                if mixed is not None:
                    raise mixed_ids_error(dataset, spec, mixed)
                key = check_row_key(rows[offset], spec.id_column, row_index)
            if isinstance(key, RowProblem):
                checked.append(key)
            elif isinstance(params, RowProblem):
                checked.append(params._replace(row_key=key if spec.id_column else None))
            else:
                checked.append((key, params))
        yield first_row, checked
        first_row += len(chunk)


def _preflight_error(dataset: Dataset, problems: ProblemTally) -> PreflightFailed:
    lines = problems.lines(dataset)
    return PreflightFailed(
        problems.message(dataset, "failed validation; nothing was submitted")
        + "\nfix them, or pass --skip-invalid to send the rest and export these as "
        "result_status=invalid",
        lines,
    )

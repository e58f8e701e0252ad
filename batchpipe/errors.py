"""The exception tree. Every error batchpipe raises on purpose is one of these.

Each class carries the process exit code the CLI uses for it, because exit codes are an
interface for cron and Airflow (never 99: Airflow's BashOperator treats it as "skip")::

    BatchpipeError                 1  terminal failure
    ├── UsageError                 2  bad flags, config file or environment; fix and re-run
    │   ├── MissingSettings        2  a job's required settings (prompt, model …) not given
    │   └── OutputNotWritable      2  the output path cannot be written; choose another
    ├── InputError                 1  the dataset itself is bad (names file, line/row, column)
    │   ├── PreflightFailed        1  rows failed validation; nothing was submitted
    │   └── InputChangedError      1  the input changed since submission; refusing to mislabel
    ├── StoreError                 1  the state database is unusable or out of date
    │   ├── StoreUnreachable      75  database server unreachable or connection lost; try later
    │   └── StoreBusy             75  another worker kept the SQLite file locked; try later
    ├── JobLocked                 75  another process is working on this job; try later
    ├── APIError                   1  the Message Batches API said no
    │   ├── AuthenticationFailed   2  missing or rejected API key
    │   ├── BatchNotFound          1  the API does not know a batch we sent (deleted, other key)
    │   └── TransientAPIError     75  overloaded, rate limited, unreachable; try later
    │       ├── CreateRefused     75  a create refused (429/503/529) or never connected
    │       └── ResultsUnavailable 75 an ended batch's results file answers 404 (for now)
    ├── NeedsAttention             1  a state batchpipe will not guess its way out of
    ├── BudgetExceeded             1  sending more would pass the job's --max-cost
    └── RowsFailed                 1  the job ended with more failed rows than --max-failed

    Interrupted                  130  SIGTERM; the job resumes on the next run (a BaseException,
                                      like Ctrl-C's KeyboardInterrupt: see the class)

Messages name the ids involved and the next step, e.g.
``job 7: 3 rows failed permanently; see `batchpipe status 7```.
"""

from __future__ import annotations

from typing import ClassVar

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_TEMPFAIL = 75
EXIT_INTERRUPTED = 130


class BatchpipeError(Exception):
    """Root of every error batchpipe raises deliberately."""

    exit_code: ClassVar[int] = EXIT_FAILURE


class UsageError(BatchpipeError):
    """Bad command line, job file or environment."""

    exit_code = EXIT_USAGE


class MissingSettings(UsageError):
    """A job's required settings (input, prompt, model, max_tokens) were not given."""


class OutputNotWritable(UsageError):
    """The output path cannot be written (its folder cannot be made, it is a folder …)."""


class InputError(BatchpipeError):
    """The input dataset cannot be used as it is."""


class PreflightFailed(InputError):
    """Pre-flight validation found bad rows; nothing was submitted."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or []


class InputChangedError(InputError):
    """The input's fingerprint differs from the one recorded when the job was submitted."""


class StoreError(BatchpipeError):
    """The state database is unusable (unreachable, not migrated, inconsistent)."""


class StoreUnreachable(StoreError):
    """No connection to the database server (down, restarting, network): try later."""

    exit_code = EXIT_TEMPFAIL


class StoreBusy(StoreError):
    """Another process held the SQLite file's write lock past the busy timeout: try later."""

    exit_code = EXIT_TEMPFAIL


class JobLocked(BatchpipeError):
    """Another process holds this job's lease."""

    exit_code = EXIT_TEMPFAIL


class APIError(BatchpipeError):
    """The Message Batches API refused a call for a reason retrying will not fix."""

    def __init__(self, message: str, *, request_id: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


class AuthenticationFailed(APIError):
    """The API key is missing or was rejected."""

    exit_code = EXIT_USAGE


class BatchNotFound(APIError):
    """The API answers 404 for a batch batchpipe created: deleted (in the Console), or the API
    key now belongs to another workspace or organization than the one that created it."""


class TransientAPIError(APIError):
    """The API is overloaded, rate limiting or unreachable; the next run will retry."""

    exit_code = EXIT_TEMPFAIL


class CreateRefused(TransientAPIError):
    """The API turned a create away (rate limit, overload): certainly no batch was created."""


class ResultsUnavailable(TransientAPIError):
    """The API shows the batch as ended, but its results file answers 404.

    Just after the end that passes (the file is not served yet, or its URL went stale);
    collect stops the job for a human once it has lasted too long to be that
    (``pipeline.collect.RESULTS_PATIENCE``).
    """


class NeedsAttention(BatchpipeError):
    """batchpipe found a state it cannot resolve safely on its own (e.g. ambiguous orphans)."""


class BudgetExceeded(BatchpipeError):
    """The job's estimate or spend would pass its budget (``--max-cost``); nothing more is sent."""


class RowsFailed(BatchpipeError):
    """A job finished (its output written) with more rows lacking an answer than
    ``--max-failed`` allows."""


class Interrupted(BaseException):
    """SIGTERM arrived; state is consistent and the next run resumes.

    A BaseException like KeyboardInterrupt, not a BatchpipeError: the handler raises it
    wherever the main thread happens to be, and code that rightly catches ``Exception``
    there would otherwise swallow it. The anthropic SDK turns any Exception during a call
    into a connection error and retries (a signal during a create became "create
    uncertain" and the run went on); a template's render turns it into that row's
    problem (a valid row stored as `invalid`); `tick` reports it as one job's failure
    and goes on to the next job.
    """

    exit_code: ClassVar[int] = EXIT_INTERRUPTED

"""The pipeline: dataset → requests → batches → results → joined output.

Each step reads what it needs from the store, does one thing, and commits, so a process can
die anywhere and the next run continues. Nothing here prints; the CLI renders.
"""

from batchpipe.pipeline.carry import complete_spec
from batchpipe.pipeline.context import Context, NullProgress, Progress, default_owner
from batchpipe.pipeline.estimate import DEFAULT_SAMPLE, Estimate, estimate
from batchpipe.pipeline.export import RESULT_COLUMN_TYPES, export
from batchpipe.pipeline.ingest import default_job_name
from batchpipe.pipeline.recover import resume
from batchpipe.pipeline.report import MAX_LABELS, Report, build_report
from batchpipe.pipeline.rerun import RerunPlan
from batchpipe.pipeline.runner import (
    cancel,
    check_rerun,
    earlier_job,
    finished_totals,
    prepare,
    retry,
    run,
    step,
)
from batchpipe.pipeline.status import job_summary
from batchpipe.pipeline.tick import TickReport, tick
from batchpipe.pipeline.verdict import rows_failed

__all__ = [
    "DEFAULT_SAMPLE",
    "MAX_LABELS",
    "RESULT_COLUMN_TYPES",
    "Context",
    "Estimate",
    "NullProgress",
    "Progress",
    "Report",
    "RerunPlan",
    "TickReport",
    "build_report",
    "cancel",
    "check_rerun",
    "complete_spec",
    "default_job_name",
    "default_owner",
    "earlier_job",
    "estimate",
    "export",
    "finished_totals",
    "job_summary",
    "prepare",
    "resume",
    "retry",
    "rows_failed",
    "run",
    "step",
    "tick",
]

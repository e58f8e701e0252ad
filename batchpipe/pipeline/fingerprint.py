"""The input's fingerprint: refuse to go on when the file is not the one the job ingested.

Joining answers back by row after the input changed would silently mislabel rows; the
refusal says the cheapest way on (put the original back; split off added rows).
"""

from __future__ import annotations

from batchpipe.dataset import Dataset
from batchpipe.db import JobRow
from batchpipe.errors import InputChangedError, StoreError
from batchpipe.models import JobStatus
from batchpipe.pipeline.context import Context

# In every refusal of an input that changed; `status` looks for it in a job's error.
INPUT_CHANGED = "changed since the job was ingested"


def check_fingerprint(dataset: Dataset, job: JobRow, ctx: Context | None = None) -> None:
    """Refuse to go on if the input is not the file the job was ingested from.

    With ``ctx`` the refusal is kept as the job's error (``status`` shows it and what to
    do), and cleared once the file is as it was again.
    """
    if job.input_fingerprint is None:
        return
    try:
        # Hashed as it was recorded: a job from before sha256 recorded blake2b.
        now = dataset.fingerprint(like=job.input_fingerprint)
    except ValueError:
        raise StoreError(
            f"job {job.id} ({job.name}): its input fingerprint {job.input_fingerprint[:24]}… "
            "is of a kind this batchpipe does not know (recorded by a newer version?); "
            "upgrade batchpipe to go on with this job"
        ) from None
    if now == job.input_fingerprint:
        if ctx is not None and job.error is not None and INPUT_CHANGED in job.error:
            ctx.store.update_job(job.id, error=None)
        return
    refusal = InputChangedError(_input_changed(dataset, job, now))
    if ctx is not None:
        ctx.store.update_job(job.id, error=str(refusal))
    raise refusal


def _input_changed(dataset: Dataset, job: JobRow, now: str) -> str:
    """Why the job cannot go on, and the cheapest way on: nothing the job paid for is lost
    by putting the original back, while a new job over the edited file pays for every row."""
    recorded = job.input_fingerprint or ""
    algorithm, digest, size_text = recorded.rsplit(":", 2)
    size = int(size_text)
    finished = job.status in {JobStatus.DONE, JobStatus.CANCELED}
    then = f"`batchpipe export {job.name}`" if finished else f"`batchpipe tick --job {job.name}`"
    what = (
        f"job {job.id} ({job.name}): {dataset.uri} {INPUT_CHANGED} (fingerprint "
        f"{recorded[:24]}… is now {now[:24]}…); refusing to mislabel rows. "
    )
    if int(now.rsplit(":", 1)[1]) > size and dataset.fingerprint(recorded, limit=size) == recorded:
        return what + (
            f"Rows were only added: its first {size} bytes are the file the job was ingested "
            f"from. Move the added lines to a file of their own and cut {dataset.uri} back to "
            f"its first {size} bytes; then {then} goes on with the answers already paid for, "
            "and the new file, run as a job of its own, pays only for the added rows"
        )
    return what + (
        f"To go on with the answers already paid for, put the original back ({size} bytes, "
        f"{algorithm} {digest[:16]}…), then {then}; a new job over the edited file (another "
        "--job name) would pay for every row again"
    )

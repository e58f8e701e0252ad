"""A 404 that is not a deleted batch: a results file not served yet, a cancel refused.

Only a 404 from `retrieve` means the batch is gone (BatchNotFound): the pipeline then stops
the job and offers `resume --resend`, which pays again. A 404 for the results file of a
batch the API has just shown as ended is transient (the file is not served yet, or its URL
went stale): the job waits and downloads again.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx2
import orjson
import pytest
from conftest import write_rows
from pydantic import SecretStr

from batchpipe import db, errors, pipeline
from batchpipe.client import BatchClient
from batchpipe.config import Settings
from batchpipe.db import Store
from batchpipe.emulator import IN_PROCESS_BASE_URL, Emulator, EmulatorConfig
from batchpipe.models import BatchStatus, ItemStatus, JobSpec, JobStatus


class ResultsGone(httpx2.BaseTransport):
    """The emulator in-process, but every results download answers 404 while ``missing``
    (or only those of the batches in ``missing_ids``), results files answer the custom_ids
    in ``omitted`` with a repeat of the line before instead (not the first), and create
    number ``failed_create`` answers 500 without creating anything."""

    def __init__(self, emu: Emulator) -> None:
        self.inner = httpx2.WSGITransport(app=emu.wsgi_app)
        self.missing = False
        self.missing_ids: set[str] = set()
        self.omitted: set[str] = set()
        self.creates = 0
        self.failed_create = 0  # the create (counted from 1) answered 500, creating nothing

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        if request.method == "POST" and path.endswith("/messages/batches"):
            self.creates += 1
            if self.creates == self.failed_create:
                request.read()
                body = {"type": "error", "error": {"type": "api_error", "message": "boom"}}
                return httpx2.Response(500, content=orjson.dumps(body))
        gone = self.missing or any(f"/{i}/" in path for i in self.missing_ids)
        if gone and path.endswith("/results"):
            body = {"type": "error", "error": {"type": "not_found_error", "message": "Not found"}}
            return httpx2.Response(
                404, content=orjson.dumps(body), headers={"request-id": "req_results404"}
            )
        response = self.inner.handle_request(request)
        if not (self.omitted and path.endswith("/results")):
            return response
        # The line before stands in for each one left out, so the file still has as many
        # lines as the batch's request counts say (a shorter one is a broken download).
        lines: list[bytes] = []
        for line in response.read().splitlines(keepends=True):
            left_out = orjson.loads(line)["custom_id"] in self.omitted
            lines.append(lines[-1] if left_out else line)
        return httpx2.Response(200, content=b"".join(lines), headers=response.headers)


@pytest.fixture
def emu() -> Emulator:
    return Emulator(EmulatorConfig(seed=1, processing_seconds=1.0))


@pytest.fixture
def transport(emu: Emulator) -> ResultsGone:
    return ResultsGone(emu)


@pytest.fixture
def client(transport: ResultsGone) -> Iterator[BatchClient]:
    http = httpx2.Client(transport=transport, base_url=IN_PROCESS_BASE_URL)
    settings = Settings(api_key=SecretStr("sk-test-key"), max_retries=0)
    with BatchClient(settings, http_client=http, base_url=IN_PROCESS_BASE_URL) as bc:
        bc.not_found_delay = 0.0
        yield bc


def _job_of_four(tmp_path: Path) -> tuple[str, JobSpec]:
    """A migrated state database's URL, and a job's spec over an input of 4 rows."""
    url = f"sqlite:///{tmp_path / 'state.db'}"
    db.upgrade(url)
    write_rows(tmp_path / "in.jsonl", 4)
    spec = JobSpec(
        input=str(tmp_path / "in.jsonl"), prompt="Classify: {{ body }}",
        model="claude-haiku-4-5", max_tokens=16, id_column="doc_id",
    )  # fmt: skip
    return url, spec


def _submitted(
    spec: JobSpec, client: BatchClient, store: Store
) -> tuple[pipeline.Context, db.JobRow]:
    """The job of ``spec`` prepared and stepped once: its one batch is in flight."""
    ctx = pipeline.Context(store=store, client_factory=lambda: client)
    job = pipeline.prepare(ctx, "j", spec)
    with ctx.lease(job):
        job = pipeline.step(ctx, job)
    return ctx, job


def test_a_results_file_answering_404_keeps_the_job_running_and_is_fetched_later(
    tmp_path: Path, emu: Emulator, transport: ResultsGone, client: BatchClient
) -> None:
    url, spec = _job_of_four(tmp_path)
    with Store.open(url) as store:
        ctx, job = _submitted(spec, client, store)
        with ctx.lease(job):
            emu.advance(60)  # the batch has ended
            transport.missing = True
            with pytest.raises(errors.TransientAPIError) as info:
                pipeline.step(ctx, job)
            # Before: BatchNotFound, and the job stopped as needs_attention, blaming a
            # deleted batch or another workspace and offering a paid `resume --resend`.
            assert "results file is not available yet; try again later" in str(info.value)
            assert info.value.exit_code == 75
            stopped = store.get_job(job.id)
            assert stopped is not None
            assert stopped.status == JobStatus.RUNNING
            assert stopped.error is None

            transport.missing = False
            job = pipeline.step(ctx, job)
        assert job.status == JobStatus.DONE
        assert store.count_items(job.id).get(ItemStatus.SUCCEEDED) == 4
    assert emu.stats()["batches_created"] == 1  # nothing was sent twice


def test_results_of_a_batch_that_is_gone_are_still_batch_not_found(client: BatchClient) -> None:
    with pytest.raises(errors.BatchNotFound):
        list(client.results("msgbatch_01DoesNotExist"))  # retrieve says it: the batch is gone


def test_a_refused_cancel_is_not_a_lost_batch(client: BatchClient) -> None:
    with pytest.raises(errors.APIError) as info:
        client.cancel("msgbatch_01DoesNotExist")
    assert type(info.value) is errors.APIError
    assert "cancel batch msgbatch_01DoesNotExist failed: 404 not_found_error" in str(info.value)


def _held(store: Store, job_id: int) -> dict[ItemStatus, int]:
    """The job's item counts by status, the statuses no item has left out."""
    return {status: n for status, n in store.count_items(job_id).items() if n}


def test_a_row_a_results_file_leaves_out_is_sent_again_in_the_next_round(
    tmp_path: Path, emu: Emulator, transport: ResultsGone, client: BatchClient
) -> None:
    """Every request of an ended batch should have its line; one without (here a repeat of
    another line stands in its place) goes back to pending when the batch is collected, and
    the next round sends it under a new custom_id."""
    url, spec = _job_of_four(tmp_path)
    with Store.open(url) as store:
        ctx, job = _submitted(spec, client, store)
        third = next(i for i in store.iter_items(job.id) if i.row_index == 2)
        assert third.custom_id is not None
        transport.omitted = {third.custom_id}
        with ctx.lease(job):
            emu.advance(60)
            job = pipeline.step(ctx, job)  # collects 3 answers; row 2 goes back to pending
            assert _held(store, job.id) == {ItemStatus.SUCCEEDED: 3, ItemStatus.SUBMITTED: 1}
            assert emu.stats()["batches_created"] == 2  # the same step sent it again
            emu.advance(60)
            job = pipeline.step(ctx, job)
        assert job.status == JobStatus.DONE
        assert _held(store, job.id) == {ItemStatus.SUCCEEDED: 4}
        assert [i.attempts for i in store.iter_items(job.id)] == [1, 1, 2, 1]


def _stopped_over_missing_results(
    spec: JobSpec, emu: Emulator, transport: ResultsGone, client: BatchClient, store: Store
) -> tuple[pipeline.Context, db.JobRow]:
    """The job of ``spec`` (4 rows), whose one batch ended and whose results then answer 404
    for over an hour: the job is stopped as needs_attention (checked here)."""
    ctx, job = _submitted(spec, client, store)
    with ctx.lease(job):
        emu.advance(60)  # the batch has ended
        transport.missing = True
        with pytest.raises(errors.ResultsUnavailable):
            pipeline.step(ctx, job)  # the first 404: try again later (exit 75)
        emu.advance(30 * 60)
        with pytest.raises(errors.ResultsUnavailable):
            pipeline.step(ctx, job)  # half an hour on: still only a wait
        emu.advance(31 * 60)
        with pytest.raises(errors.NeedsAttention) as info:
            pipeline.step(ctx, job)
    message = str(info.value)
    assert "the results of batch msgbatch_" in message
    assert "requests) (ended 20" in message
    assert "have answered 404 for 1.0 h, though the API keeps results for 29 days" in message
    assert "`batchpipe resume j --resend` sends its unanswered rows again" in message
    assert info.value.exit_code == 1
    stopped = store.get_job(job.id)
    assert stopped is not None
    assert stopped.status == JobStatus.NEEDS_ATTENTION
    assert stopped.error == message
    return ctx, stopped


def test_results_still_missing_an_hour_after_the_end_stop_the_job_until_resend(
    tmp_path: Path, emu: Emulator, transport: ResultsGone, client: BatchClient
) -> None:
    url, spec = _job_of_four(tmp_path)
    with Store.open(url) as store:
        ctx, job = _stopped_over_missing_results(spec, emu, transport, client, store)
        # A plain resume tries again, and stops again while the file is still missing.
        job = pipeline.resume(ctx, job)
        assert job.status == JobStatus.RUNNING
        with ctx.lease(job), pytest.raises(errors.NeedsAttention):
            pipeline.step(ctx, job)
        assert emu.stats()["batches_created"] == 1

        job = pipeline.resume(ctx, job, resend=True)
        assert _held(store, job.id) == {ItemStatus.PENDING: 4}
        (old,) = store.list_batches(job.id)
        assert old.error == (
            "its results not served by the API; its 4 unanswered rows were sent again"
        )
        transport.missing = False
        with ctx.lease(job):
            job = pipeline.step(ctx, job)  # the rows go again, in a new batch
            emu.advance(60)
            job = pipeline.step(ctx, job)
        assert job.status == JobStatus.DONE
        assert _held(store, job.id) == {ItemStatus.SUCCEEDED: 4}
        assert emu.stats()["batches_created"] == 2
        assert [i.attempts for i in store.iter_items(job.id)] == [2, 2, 2, 2]


def test_results_served_again_are_downloaded_by_resume_and_never_resent(
    tmp_path: Path, emu: Emulator, transport: ResultsGone, client: BatchClient
) -> None:
    url, spec = _job_of_four(tmp_path)
    with Store.open(url) as store:
        ctx, job = _stopped_over_missing_results(spec, emu, transport, client, store)
        transport.missing = False
        with pytest.raises(errors.UsageError, match="none the API has lost"):
            pipeline.resume(ctx, job, resend=True)  # nothing is lost any more: not paid twice
        job = pipeline.resume(ctx, job)
        with ctx.lease(job):
            job = pipeline.step(ctx, job)
        assert job.status == JobStatus.DONE
        assert _held(store, job.id) == {ItemStatus.SUCCEEDED: 4}
        assert emu.stats()["batches_created"] == 1


def test_a_first_404_long_after_the_end_is_one_look_not_an_hour_of_them(
    tmp_path: Path, emu: Emulator, transport: ResultsGone, client: BatchClient
) -> None:
    """The hour counts from the first 404 collect saw, not from the batch's end: a nightly
    tick's first look at a batch that ended hours before must not stop its job."""
    url, spec = _job_of_four(tmp_path)
    with Store.open(url) as store:
        ctx, job = _submitted(spec, client, store)
        with ctx.lease(job):
            emu.advance(5 * 3600)  # ended long ago; nobody looked until now
            transport.missing = True
            with pytest.raises(errors.ResultsUnavailable):
                pipeline.step(ctx, job)  # the first 404, 5 h after the end: still a wait
            stopped = store.get_job(job.id)
            assert stopped is not None
            assert stopped.status == JobStatus.RUNNING
            (batch,) = store.list_batches(job.id)
            assert batch.results_missing_since is not None
            transport.missing = False
            job = pipeline.step(ctx, job)
        assert job.status == JobStatus.DONE
        assert _held(store, job.id) == {ItemStatus.SUCCEEDED: 4}
        assert emu.stats()["batches_created"] == 1


def test_results_missing_while_canceling_end_errored_not_canceled(
    tmp_path: Path, emu: Emulator, transport: ResultsGone, client: BatchClient
) -> None:
    """A job being canceled is not stopped for a human (a resume would make it run again),
    and rows the API may have answered (and billed) are not called canceled: they end
    errored, results_unavailable, for `retry --error-type` to send again if wanted."""
    url, spec = _job_of_four(tmp_path)
    with Store.open(url) as store:
        ctx, job = _submitted(spec, client, store)
        emu.advance(60)  # ended, all 4 answered
        transport.missing = True
        with pytest.raises(errors.ResultsUnavailable):
            pipeline.cancel(ctx, job)  # the cancel's step meets the first 404
        job = store.get_job(job.id)  # type: ignore[assignment]
        assert job.status == JobStatus.CANCELING
        emu.advance(3700)
        with ctx.lease(job):
            job = pipeline.step(ctx, job)
        assert job.status == JobStatus.CANCELED
        items = list(store.iter_items(job.id))
        assert {(i.status, i.error_type) for i in items} == {
            (ItemStatus.ERRORED, "results_unavailable")
        }
        assert items[0].error_message is not None
        assert "retry --error-type results_unavailable" in items[0].error_message
        (batch,) = store.list_batches(job.id)
        assert batch.status.value == "collected"
        assert emu.stats()["batches_created"] == 1


def test_a_results_file_not_served_yet_does_not_hold_up_the_other_batches(
    tmp_path: Path, emu: Emulator, transport: ResultsGone, client: BatchClient
) -> None:
    url, spec = _job_of_four(tmp_path)
    spec = spec.model_copy(update={"max_batch_requests": 2})  # two batches of two rows
    with Store.open(url) as store:
        ctx, job = _submitted(spec, client, store)
        first, _ = store.list_batches(job.id)
        assert first.api_batch_id is not None
        emu.advance(60)  # both have ended
        transport.missing_ids = {first.api_batch_id}
        with ctx.lease(job), pytest.raises(errors.ResultsUnavailable):
            pipeline.step(ctx, job)
        # The second batch was collected in the same step; the first waits for the next.
        assert [b.status.value for b in store.list_batches(job.id)] == ["ended", "collected"]
        assert _held(store, job.id) == {ItemStatus.SUBMITTED: 2, ItemStatus.SUCCEEDED: 2}
        transport.missing_ids = set()
        with ctx.lease(job):
            job = pipeline.step(ctx, job)
        assert job.status == JobStatus.DONE
        assert _held(store, job.id) == {ItemStatus.SUCCEEDED: 4}


def test_a_batch_adopted_by_mistake_answering_as_many_rows_still_gives_its_own_back(
    tmp_path: Path, emu: Emulator, transport: ResultsGone, client: BatchClient
) -> None:
    """A duplicate of batch A's requests (same job, same custom_ids) is adopted for batch B
    after B's create failed uncertainly. Its answers change A's rows, as many as B has
    requests; B's own rows must still go back to pending when B is collected, not stay
    submitted for good (a shortcut that skipped that walk left the job running forever)."""
    url, spec = _job_of_four(tmp_path)
    spec = spec.model_copy(update={"max_batch_requests": 2})
    transport.failed_create = 2  # B's create: 500, nothing created, B stays planned
    with Store.open(url) as store:
        ctx = pipeline.Context(store=store, client_factory=lambda: client)
        job = pipeline.prepare(ctx, "j", spec)
        with ctx.lease(job):
            with pytest.raises(errors.TransientAPIError):
                pipeline.step(ctx, job)
            a, b = store.list_batches(job.id)
            assert b.status == BatchStatus.PLANNED
            a_ids = [i.custom_id for i in store.iter_batch_items(a.id)]
            params = {"model": "claude-haiku-4-5", "max_tokens": 16,
                      "messages": [{"role": "user", "content": "Classify: x"}]}  # fmt: skip
            requests = [{"custom_id": cid, "params": params} for cid in a_ids]
            client.create(orjson.dumps({"requests": requests}), count=2)  # the stray copy
            job = pipeline.step(ctx, job)  # recovery adopts the running stray for B
            emu.advance(60)
            transport.missing_ids = {str(a.api_batch_id)}  # A's own file comes later
            with pytest.raises(errors.ResultsUnavailable):
                pipeline.step(ctx, job)  # B (the stray) is collected: it answers A's rows
            transport.missing_ids = set()
            for _ in range(4):
                emu.advance(60)
                job = pipeline.step(ctx, job)
        assert job.status == JobStatus.DONE
        assert _held(store, job.id) == {ItemStatus.SUCCEEDED: 4}

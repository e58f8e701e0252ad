"""Jobs and their leases.

A lease says which process works on a job. Every lease change is a single compare-and-set
``UPDATE … WHERE`` (lease free, expired or ours), which both SQLite (one writer at a time) and
PostgreSQL (the WHERE is re-checked after waiting for a concurrent row lock) make atomic, so
two workers racing for a job cannot both win.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import timedelta
from typing import Any

import sqlalchemy as sa

from batchpipe.db.base import JobNameTaken, StoreBase, status_values
from batchpipe.db.rows import JobRow
from batchpipe.db.schema import jobs
from batchpipe.errors import StoreError
from batchpipe.models import JobStatus


class JobsMixin(StoreBase):
    """Store methods for the ``jobs`` table."""

    def create_job(
        self,
        *,
        name: str,
        token: str,
        spec: dict[str, Any],
        input_fingerprint: str | None,
        lease_owner: str | None = None,
        lease_ttl_seconds: float = 0.0,
        emulated: bool = False,
    ) -> JobRow:
        """Insert a new job (status running). A name already in use raises JobNameTaken.

        With ``lease_owner`` the job is born leased to its creator, in the same INSERT: a
        job recorded before its rows are validated must not be stepped by another worker
        (a cron `tick` would validate it all while the creator's command fails with
        JobLocked). Once that lease lapses (the creator died) others may take it.
        """
        now = self.clock()
        leased_until = now + timedelta(seconds=lease_ttl_seconds) if lease_owner else None
        values = {
            "name": name,
            "token": token,
            "status": JobStatus.RUNNING.value,
            "spec": spec,
            "input_fingerprint": input_fingerprint,
            "row_count": 0,
            "invalid_count": 0,
            "created_at": now,
            "updated_at": now,
            "lease_owner": lease_owner,
            "lease_until": leased_until,
            "emulated": emulated,
        }
        try:
            with self._write() as conn:
                row = conn.execute(sa.insert(jobs).values(values).returning(jobs)).one()
        except sa.exc.IntegrityError:
            # Tell a name clash (the user's to fix) from a token clash (ours, astronomically rare).
            if self.get_job(name) is not None:
                raise JobNameTaken(
                    f"a job named {name!r} already exists; pick another --job name "
                    f"or see `batchpipe status {name}`"
                ) from None
            raise StoreError(f"could not create job {name!r}: token {token} is taken") from None
        return JobRow.from_row(row)

    def get_job(self, ref: str | int) -> JobRow | None:
        """A job by id (an int or an all-digit string) or else by name; None if absent."""
        with self._begin() as conn:
            row = None
            if isinstance(ref, int) or ref.isdigit():
                row = conn.execute(sa.select(jobs).where(jobs.c.id == int(ref))).first()
            if row is None and isinstance(ref, str):
                row = conn.execute(sa.select(jobs).where(jobs.c.name == ref)).first()
        return None if row is None else JobRow.from_row(row)

    def list_jobs(self, statuses: Collection[JobStatus] | None = None) -> list[JobRow]:
        """Jobs, newest first, optionally only those in ``statuses``."""
        stmt = sa.select(jobs).order_by(jobs.c.id.desc())
        if statuses is not None:
            stmt = stmt.where(jobs.c.status.in_(status_values(statuses)))
        with self._begin() as conn:
            return [JobRow.from_row(r) for r in conn.execute(stmt)]

    def update_job(
        self,
        job_id: int,
        *,
        expected_status: JobStatus | Collection[JobStatus] | None = None,
        **fields: Any,
    ) -> bool:
        """Set ``fields`` (and updated_at); compare-and-set on status when ``expected_status``.

        Returns whether the row changed: False means the job is gone or someone else moved
        its status first.
        """
        return self._cas_update(jobs, job_id, expected_status, fields, touch=True)

    # ------------------------------------------------------------------ leases

    def acquire_lease(self, job_id: int, owner: str, ttl_seconds: float) -> bool:
        """Take the job's lease if it is free, expired or already ``owner``'s."""
        now = self.clock()
        stmt = (
            sa.update(jobs)
            .where(jobs.c.id == job_id)
            .where(
                sa.or_(
                    jobs.c.lease_owner.is_(None),
                    jobs.c.lease_owner == owner,
                    jobs.c.lease_until.is_(None),
                    jobs.c.lease_until < now,
                )
            )
            .values(lease_owner=owner, lease_until=now + timedelta(seconds=ttl_seconds))
        )
        with self._write() as conn:
            return conn.execute(stmt).rowcount == 1

    def renew_lease(self, job_id: int, owner: str, ttl_seconds: float) -> bool:
        """Extend ``owner``'s lease; False if another process holds it now (stop working)."""
        # An expired lease nobody else took is still ours: its owner column is unchanged.
        stmt = (
            sa.update(jobs)
            .where(jobs.c.id == job_id, jobs.c.lease_owner == owner)
            .values(lease_until=self.clock() + timedelta(seconds=ttl_seconds))
        )
        with self._write() as conn:
            return conn.execute(stmt).rowcount == 1

    def release_lease(self, job_id: int, owner: str) -> None:
        """Give the lease up; a no-op when ``owner`` no longer holds it."""
        stmt = (
            sa.update(jobs)
            .where(jobs.c.id == job_id, jobs.c.lease_owner == owner)
            .values(lease_owner=None, lease_until=None)
        )
        with self._write() as conn:
            conn.execute(stmt)

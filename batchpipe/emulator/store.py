"""The emulator's state: batches on a controllable clock, their lifecycle, results and stats.

Not thread-safe by itself; ``Emulator`` holds a lock around every call. Status changes are
applied lazily: whenever a batch is looked at, ``_refresh`` moves it along to where the
clock says it should be. A batch's results are produced (and its successes "billed") once,
at the moment it ends, so downloading them twice returns the same bytes and counts nothing.
"""

from __future__ import annotations

import base64
import os
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from batchpipe.emulator import outcomes, responder
from batchpipe.emulator.failures import ApiFailure, bad_request, not_found
from batchpipe.emulator.settings import EmulatorConfig

DAY = 86_400.0
EXPIRY_SECONDS = 1 * DAY  # requests still unprocessed then are expired
ARCHIVE_SECONDS = 29 * DAY  # results stop being served this long after created_at
_ID_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def rfc3339(ts: float | None) -> str | None:
    """Epoch seconds as the API's RFC 3339 form (microseconds, 'Z'); None stays None."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def new_id(prefix: str) -> str:
    """An id shaped like the API's: prefix + '01' + 22 base58 characters."""
    raw = os.urandom(22)
    return prefix + "01" + "".join(_ID_ALPHABET[b % len(_ID_ALPHABET)] for b in raw)


@dataclass(slots=True)
class Item:
    """One request: params (compact JSON) until the batch ends, then its result line.

    Both are str, not bytes: orjson's bytes results keep their growth buffer (about 8 KiB
    each, 10x the data for 100,000 short requests); decoding to str stores them exactly.
    """

    custom_id: str
    params: str | None
    finish: float  # seconds after created_at at which this request is processed
    line: str | None = None


@dataclass(slots=True)
class Batch:
    """One message batch as the emulator holds it."""

    id: str
    seq: int
    created_at: float
    processing_seconds: float
    items: list[Item]
    cancel_initiated_at: float | None = None
    cancel_ends_at: float | None = None
    ended_at: float | None = None
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def expires_at(self) -> float:
        """When unprocessed requests expire (created_at + 24 h)."""
        return self.created_at + EXPIRY_SECONDS

    @property
    def archived_at(self) -> float | None:
        """When results stopped being served, once that moment has been reached."""
        return None if self.ended_at is None else self.created_at + ARCHIVE_SECONDS

    def status(self) -> str:
        """The API's processing_status."""
        if self.ended_at is not None:
            return "ended"
        return "in_progress" if self.cancel_initiated_at is None else "canceling"

    def natural_end(self) -> float:
        """When processing ends without a cancel: after the last request, at most at expiry."""
        return self.created_at + min(self.processing_seconds, EXPIRY_SECONDS)


class BatchStore:
    """All batches, the emulator clock offset, and the counters behind ``stats()``."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.clock_offset = 0.0
        self.reset()

    def reset(self) -> None:
        """Forget every batch and counter (the clock offset and the config stay)."""
        self.batches: dict[str, Batch] = {}
        self.seq = 0
        self.cache = responder.PromptCache()
        self.counters: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.success_counts: Counter[bytes] = Counter()
        self.duplicate_successes = 0

    # ------------------------------------------------------------ lifecycle

    def create(self, requests: list[tuple[str, dict[str, Any]]], now: float) -> Batch:
        """Accept validated (custom_id, params) pairs as a new in_progress batch."""
        cfg = self.config
        items = [
            Item(
                cid,
                orjson.dumps(params).decode(),
                outcomes.unit(cfg.seed, "finish", cid) * cfg.processing_seconds,
            )
            for cid, params in requests
        ]
        self.seq += 1
        batch = Batch(new_id("msgbatch_"), self.seq, now, cfg.processing_seconds, items)
        self.batches[batch.id] = batch
        self.counters["batches_created"] += 1
        self.counters["requests_received"] += len(items)
        return batch

    def get(self, batch_id: str, now: float) -> Batch:
        """The batch with this id, brought up to date; 404 if unknown or deleted."""
        batch = self.batches.get(batch_id)
        if batch is None:
            raise not_found(batch_id)
        self._refresh(batch, now)
        return batch

    def cancel(self, batch_id: str, now: float) -> Batch:
        """Start canceling; requests not yet processed will come back canceled."""
        batch = self.get(batch_id, now)
        if batch.ended_at is not None:
            raise bad_request(
                f"message batch {batch_id!r} has already ended and cannot be canceled"
            )
        if batch.cancel_initiated_at is None:
            batch.cancel_initiated_at = now
            batch.cancel_ends_at = now + self.config.cancel_seconds
        return batch

    def delete(self, batch_id: str, now: float) -> None:
        """Delete an ended batch (and its results)."""
        batch = self.get(batch_id, now)
        if batch.ended_at is None:
            raise bad_request(
                f"message batch {batch_id!r} is still {batch.status()}; "
                "cancel it and wait for it to end before deleting it"
            )
        del self.batches[batch_id]

    def result_lines(self, batch_id: str, now: float) -> list[str]:
        """The JSONL lines (without newlines) of an ended, unarchived batch."""
        batch = self.get(batch_id, now)
        if batch.ended_at is None:
            raise bad_request(
                f"message batch {batch_id!r} is still {batch.status()}; "
                "results are available once it has ended"
            )
        archived = batch.archived_at
        if archived is not None and now >= archived:
            # The real API's answer here is undocumented; a 404 tells clients "gone for good"
            # without them retrying, and the message says why.
            raise ApiFailure(
                404,
                "not_found_error",
                f"results of message batch {batch_id!r} were archived at {rfc3339(archived)} "
                "(29 days after creation) and are no longer available",
            )
        return [item.line for item in batch.items if item.line is not None]

    def refresh_all(self, now: float) -> None:
        """Bring every batch up to date (so stats count batches nobody has looked at)."""
        for batch in list(self.batches.values()):
            self._refresh(batch, now)

    def _refresh(self, batch: Batch, now: float) -> None:
        if batch.ended_at is not None:
            return
        end = batch.natural_end()
        if batch.cancel_ends_at is not None:
            end = min(end, batch.cancel_ends_at)
        if now >= end:
            self._finish(batch, end)

    def _finish(self, batch: Batch, ended_at: float) -> None:
        """Produce every result line, in processing order, and bill the successes."""
        counts = dict.fromkeys(("processing", "succeeded", "errored", "canceled", "expired"), 0)
        cut = batch.cancel_initiated_at
        for item in sorted(batch.items, key=lambda it: it.finish):
            at = batch.created_at + item.finish
            if cut is not None and at > cut:
                outcome = outcomes.canceled(item.custom_id)
            elif item.finish > EXPIRY_SECONDS:
                outcome = outcomes.expired(item.custom_id)
            else:
                assert item.params is not None
                outcome = outcomes.process(item.custom_id, item.params, self.config, self.cache)
            item.line = outcome.line
            item.params = None  # the prompt is no longer needed; keep memory flat
            counts[outcome.result_type] += 1
            if outcome.fault:
                self.faults[outcome.fault] += 1
            if outcome.billed_hash is not None:
                self.success_counts[outcome.billed_hash] += 1
                if self.success_counts[outcome.billed_hash] == 2:
                    self.duplicate_successes += 1
        for kind in ("succeeded", "errored", "canceled", "expired"):
            self.counters[f"results_{kind}"] += counts[kind]
        batch.counts = counts
        batch.ended_at = ended_at

    # ------------------------------------------------------------ views

    def list_page(
        self, now: float, *, limit: int, after_id: str | None, before_id: str | None
    ) -> tuple[list[Batch], bool]:
        """A page of batches, newest first, and whether more exist in that direction."""
        newest_first = sorted(self.batches.values(), key=lambda b: b.seq, reverse=True)
        ids = [b.id for b in newest_first]
        if after_id is not None and before_id is not None:
            raise bad_request("after_id, before_id: give at most one of them")
        if after_id is not None:
            start = self._cursor(ids, after_id, "after_id") + 1
            page = newest_first[start : start + limit]
            has_more = start + limit < len(newest_first)
        elif before_id is not None:
            stop = self._cursor(ids, before_id, "before_id")
            page = newest_first[max(0, stop - limit) : stop]
            has_more = stop - limit > 0
        else:
            page = newest_first[:limit]
            has_more = limit < len(newest_first)
        for batch in page:
            self._refresh(batch, now)
        return page, has_more

    @staticmethod
    def _cursor(ids: list[str], cursor: str, name: str) -> int:
        try:
            return ids.index(cursor)
        except ValueError:
            raise bad_request(f"{name}: no message batch with id {cursor!r}") from None

    def to_json(self, batch: Batch, results_base: str, now: float) -> dict[str, Any]:
        """The MessageBatch object; results_url is built from the caller's own base URL."""
        ended = batch.ended_at is not None
        archived = (
            batch.archived_at
            if batch.archived_at is not None and now >= batch.archived_at
            else None
        )
        counts = (
            batch.counts
            if ended
            else {
                "processing": len(batch.items),
                "succeeded": 0,
                "errored": 0,
                "canceled": 0,
                "expired": 0,
            }
        )
        return {
            "id": batch.id,
            "type": "message_batch",
            "processing_status": batch.status(),
            "request_counts": counts,
            "created_at": rfc3339(batch.created_at),
            "expires_at": rfc3339(batch.expires_at),
            "ended_at": rfc3339(batch.ended_at),
            "cancel_initiated_at": rfc3339(batch.cancel_initiated_at),
            "archived_at": rfc3339(archived),
            "results_url": f"{results_base}/v1/messages/batches/{batch.id}/results"
            if ended
            else None,
        }

    def stats(self, now: float) -> dict[str, Any]:
        """The counters tests and operators read (see ``Emulator.stats``)."""
        self.refresh_all(now)
        out: dict[str, Any] = {
            key: self.counters[key]
            for key in (
                "batches_created",
                "requests_received",
                "results_succeeded",
                "results_errored",
                "results_canceled",
                "results_expired",
            )
        }
        out["duplicate_successes"] = self.duplicate_successes
        out["batches"] = len(self.batches)
        out["calls"] = dict(self.calls)
        out["faults"] = dict(self.faults)
        out["http_requests"] = sum(self.calls.values())
        return out

    # ------------------------------------------------------------ snapshots

    def snapshot(self) -> dict[str, Any]:
        """Everything needed to carry on in another process (the prompt cache restarts cold)."""
        return {
            "version": 1,
            "config": self.config.model_dump(mode="json"),
            "clock_offset": self.clock_offset,
            "seq": self.seq,
            "counters": dict(self.counters),
            "calls": dict(self.calls),
            "faults": dict(self.faults),
            "success_counts": {_b64(k): v for k, v in self.success_counts.items()},
            "duplicate_successes": self.duplicate_successes,
            "batches": [_batch_to_dict(b) for b in self.batches.values()],
        }

    @classmethod
    def from_snapshot(cls, data: dict[str, Any]) -> BatchStore:
        """Rebuild a store saved by ``snapshot``."""
        if data.get("version") != 1:
            raise ValueError(f"unsupported emulator snapshot version {data.get('version')!r}")
        store = cls(EmulatorConfig.model_validate(data["config"]))
        store.clock_offset = float(data["clock_offset"])
        store.seq = int(data["seq"])
        store.counters.update(data["counters"])
        store.calls.update(data["calls"])
        store.faults.update(data["faults"])
        store.success_counts.update(
            {base64.b64decode(k): int(v) for k, v in data["success_counts"].items()}
        )
        store.duplicate_successes = int(data["duplicate_successes"])
        for raw in data["batches"]:
            batch = _batch_from_dict(raw)
            store.batches[batch.id] = batch
        return store


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _batch_to_dict(batch: Batch) -> dict[str, Any]:
    return {
        "id": batch.id,
        "seq": batch.seq,
        "created_at": batch.created_at,
        "processing_seconds": batch.processing_seconds,
        "cancel_initiated_at": batch.cancel_initiated_at,
        "cancel_ends_at": batch.cancel_ends_at,
        "ended_at": batch.ended_at,
        "counts": batch.counts,
        "items": [[it.custom_id, it.params, it.finish, it.line] for it in batch.items],
    }


def _batch_from_dict(raw: dict[str, Any]) -> Batch:
    items = [Item(cid, params, float(finish), line) for cid, params, finish, line in raw["items"]]
    return Batch(
        id=raw["id"],
        seq=int(raw["seq"]),
        created_at=float(raw["created_at"]),
        processing_seconds=float(raw["processing_seconds"]),
        items=items,
        cancel_initiated_at=raw["cancel_initiated_at"],
        cancel_ends_at=raw["cancel_ends_at"],
        ended_at=raw["ended_at"],
        counts=dict(raw["counts"]),
    )

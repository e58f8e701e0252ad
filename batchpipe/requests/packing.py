"""Packing serialized requests into create bodies under the API's count and byte limits.

Each batch's body is written to an unnamed temporary file as it fills, and streamed from
there to the API: a full batch is up to 256 MB.
"""

from __future__ import annotations

import io
import tempfile
from dataclasses import dataclass, field
from typing import IO

from batchpipe.requests.framing import BODY_HEAD, BODY_TAIL, FRAME_BYTES


def _body_file() -> IO[bytes]:
    # A 1 MiB write buffer: requests of ~1 KB are appended one at a time.
    body = tempfile.TemporaryFile(prefix="batchpipe-body-", buffering=1 << 20)  # noqa: SIM115
    body.write(BODY_HEAD)
    return body


@dataclass
class PlannedBatch:
    """Requests that fit in one create call, with their (row_index, custom_id, attempt).

    The serialized requests are written, comma-separated, into an unnamed temporary file
    that already starts with the body's head; :meth:`body_file` writes the tail and hands
    the file to the upload, which streams it in 64 KiB reads. A batch of 100,000 requests
    is ~90 MB: held in memory (as it was, in one buffer) it was the largest part of the
    process's peak RSS while submitting. A list of orjson bytes per request once held
    780 MB of RSS for 75 MB of requests. :meth:`close` deletes the file.
    """

    items: list[tuple[int, str, int]] = field(default_factory=list)
    # The size of the full body (head and tail included), kept as requests arrive: the
    # packer asks before every request.
    nbytes: int = field(default=FRAME_BYTES, init=False)
    _file: IO[bytes] = field(default_factory=_body_file)
    _ends: list[int] = field(default_factory=list)  # end offset of each request in _file
    _sealed: bool = False

    def __enter__(self) -> PlannedBatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Delete the body's file (the batch cannot be sent after this)."""
        self._file.close()

    def append(self, payload: bytes) -> None:
        """Add one serialized request (its item goes into ``items`` separately)."""
        if self._sealed:
            raise ValueError("the batch's body was already built; it takes no more requests")
        # Offsets are counted here: tell() on the buffered file costs a seek each time. One
        # write with the comma: cheaper than two (copying ~1 KB costs less than a call).
        if self._ends:
            self._file.write(b"," + payload)
            self.nbytes += 1 + len(payload)
        else:
            self._file.write(payload)
            self.nbytes += len(payload)
        self._ends.append(self.nbytes - len(BODY_TAIL))

    @property
    def payloads(self) -> list[bytes]:
        """The serialized requests, one bytes each (read back; for inspection and tests)."""
        if not self._ends:
            return []
        at = self._file.tell()
        self._file.seek(0)
        body = self._file.read(self._ends[-1])
        self._file.seek(at)
        starts = [len(BODY_HEAD), *(end + 1 for end in self._ends[:-1])]
        return [body[a:b] for a, b in zip(starts, self._ends, strict=True)]

    @property
    def count(self) -> int:
        """Number of requests."""
        return len(self._ends)

    def body_file(self) -> IO[bytes]:
        """The full create body ``{"requests":[…]}`` as a file positioned at its start.

        Seal the batch (no more requests can be added). Each call rewinds the file, so a
        refused create can be sent again from the same file.
        """
        if not self._sealed:
            self._file.seek(0, io.SEEK_END)
            self._file.write(BODY_TAIL)
            self._file.flush()
            self._sealed = True
        self._file.seek(0)
        return self._file

    def body(self) -> bytes:
        """The full create body as bytes (a copy in memory: for tests and small batches)."""
        return self.body_file().read()


class BatchPacker:
    """Packs serialized requests into batches under a request-count and a byte limit.

    The byte limit counts the whole create body:
    ``b'{"requests":[' + b','.join(items) + b']}'``.
    """

    def __init__(self, max_requests: int, max_bytes: int) -> None:
        if max_requests < 1:
            raise ValueError(f"max_requests must be at least 1, not {max_requests}")
        if max_bytes <= FRAME_BYTES:
            raise ValueError(f"max_bytes must exceed {FRAME_BYTES}, not {max_bytes}")
        self._max_requests = max_requests
        self._max_bytes = max_bytes
        self._current = PlannedBatch()

    def __enter__(self) -> BatchPacker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Delete the file of the batch being filled (batches handed out close themselves)."""
        self._current.close()

    def add(
        self, row_index: int, custom_id: str, attempt: int, payload: bytes
    ) -> PlannedBatch | None:
        """Add one request; returns the previous batch when this one would overflow it.

        Batches handed out are the caller's to close (``with batch: …``).
        """
        size = len(payload)
        if size + FRAME_BYTES > self._max_bytes:
            # The renderer flags such rows first; reaching here is a bug upstream.
            raise ValueError(
                f"request {custom_id} is {size} bytes; no batch of {self._max_bytes} bytes holds it"
            )
        full = None
        current = self._current
        count = current.count
        if count and (count >= self._max_requests or current.nbytes + 1 + size > self._max_bytes):
            full = current
            current = self._current = PlannedBatch()
        current.items.append((row_index, custom_id, attempt))
        current.append(payload)
        return full

    def flush(self) -> PlannedBatch | None:
        """The batch being filled, if it has anything in it."""
        if not self._current.count:
            return None
        full, self._current = self._current, PlannedBatch()
        return full

"""The only user of the anthropic SDK: create, retrieve, list, results, cancel, count_tokens.

Everything above this module sees batchpipe's own types (``BatchInfo``, ``ResultRecord``) and
exceptions (``batchpipe.errors``), never SDK classes, so an SDK upgrade touches one file.

Two calls bypass the SDK's typed resource methods on purpose, while still going through the
SDK client (auth headers, retries, timeouts, error classes):

* ``create`` posts the packer's pre-serialised body as raw ``content=`` (bytes, or the
  packer's temporary file, which httpx streams in 64 KiB reads). Measured with a
  100 000-request body (~600-character prompts, 77 MB): raw bytes take ~2 ms and ~1 MB of
  extra peak RSS; ``orjson.loads`` + ``batches.create(requests=...)`` takes ~2.7 s and
  ~370 MB, because the SDK walks and re-serialises every dict.
* ``results`` streams ``results_url`` as raw bytes and parses each line with orjson, instead
  of the SDK's ``JSONLDecoder``, which builds a model object per line.

Errors map onto the tree in ``batchpipe.errors``: rejected credentials become
``AuthenticationFailed``; what a later run may get past (429, 5xx incl. 529, 408, 409,
connection failures and timeouts, a results stream that breaks off) becomes
``TransientAPIError``; everything else ``APIError``. ``create`` alone does not let the SDK
retry (a resent create may bill twice); see its docstring. Messages carry the operation, status,
error type, the API's message and the request id -- never the API key or any body.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Generator, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import IO, Any, TypeVar

import anthropic
import httpx2
from anthropic import APIResponse
from anthropic.types.messages import MessageBatch

from batchpipe import errors
from batchpipe.client.lines import broke_off, load_line, record_from, split_blocks
from batchpipe.config import Settings
from batchpipe.log import get_logger
from batchpipe.models import (
    COUNT_TOKENS_KEYS,
    BatchInfo,
    RequestCounts,
    ResultRecord,
)

log = get_logger(__name__)

T = TypeVar("T")
R = TypeVar("R")

NO_KEY_MESSAGE = (
    "ANTHROPIC_API_KEY is not set; export it, or use --emulate to run against the built-in emulator"
)
# Statuses the SDK already retried (its policy) and that a later run may get past.
_TRANSIENT_SDK_ERRORS: tuple[type[Exception], ...] = (
    anthropic.RateLimitError,
    anthropic.InternalServerError,  # incl. OverloadedError (529), 503, 504
    anthropic.APIConnectionError,  # incl. APITimeoutError
    anthropic.ConflictError,
    anthropic.RequestTimeoutError,
)
# Answers to a create that mean the API did not create the batch, so sending again is safe.
_CREATE_REFUSED = frozenset({429, 503, 529})
_MAX_RETRY_DELAY = 60.0


class BatchClient:
    """A Message Batches API client speaking batchpipe's types. Use as a context manager."""

    def __init__(
        self,
        settings: Settings,
        *,
        http_client: httpx2.Client | None = None,
        base_url: str | None = None,
        max_retries: int | None = None,
        timeout: float | None = None,
    ) -> None:
        """Build the SDK client. ``base_url``: argument > ANTHROPIC_BASE_URL > SDK default."""
        if settings.api_key is None or not settings.api_key.get_secret_value():
            raise errors.AuthenticationFailed(NO_KEY_MESSAGE)
        self._key = settings.api_key.get_secret_value()
        if not self._key.isascii() or not self._key.isprintable() or " " in self._key:
            # httpx would refuse the header on every call, which reads as "could not connect"
            # (exit 75, forever). Never echo the key, not even in part.
            raise errors.AuthenticationFailed(
                "ANTHROPIC_API_KEY holds a space, a control or a non-ASCII character, which "
                "no API key has: check how it was set (copied with extra text, or from a file "
                "with Windows line ends)"
            )
        self._max_retries = settings.max_retries if max_retries is None else max_retries
        self._sdk = anthropic.Anthropic(
            api_key=self._key,
            base_url=base_url or settings.base_url,
            max_retries=self._max_retries,
            timeout=settings.request_timeout if timeout is None else timeout,
            http_client=http_client,
        )
        # Right after a create the real service has been seen answering 404 for a moment
        # (reference §2.2), so retrieve and results retry a 404 this many times first.
        self.not_found_retries = 3
        self.not_found_delay = 1.0  # seconds; grows linearly per retry
        # create's own retries: exponential from this base when no retry-after is given.
        self.create_retry_base = 0.5
        self.sleep: Callable[[float], None] = time.sleep
        # The API's Date on its last dated answer, and our monotonic time then (api_now).
        self._api_date: tuple[datetime, float] | None = None

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Close the connection pool (also the injected http_client)."""
        self._sdk.close()

    def __enter__(self) -> BatchClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # ------------------------------------------------------------------ operations

    def create(
        self, body: bytes | IO[bytes], *, count: int, nbytes: int | None = None
    ) -> BatchInfo:
        """Create a batch from a serialised body ``{"requests": [...]}`` holding ``count`` items.

        ``body`` is bytes or a seekable binary file (streamed from its start; ``nbytes`` is
        its size, for the log line).

        The SDK's own retries are off for this one call: it resends after a 500, a timeout or
        a dropped connection, when the first request may already have created a batch, so one
        call could create (and bill) two. Only answers that say nothing was created (429, 503,
        529) are retried here, honouring retry-after, and connections that were never made
        (refused, unknown host, connect timeout: not a byte of the request went out); when
        they run out, ``CreateRefused``. Any other transient failure raises
        ``TransientAPIError`` at once; the caller keeps its intent and recovery looks for the
        batch at the API before sending again.
        """
        size = len(body) if isinstance(body, bytes) else nbytes
        started = time.perf_counter()
        for attempt in range(self._max_retries + 1):
            if not isinstance(body, bytes):
                body.seek(0)  # a refused attempt may have read some of it
            try:
                batch = self._call(
                    "create",
                    "create batch",
                    lambda: self._sdk.post(
                        "/v1/messages/batches",
                        cast_to=MessageBatch,
                        content=body,  # sent as is: no re-serialising (see the module docstring)
                        options={
                            "headers": {"Content-Type": "application/json"},
                            "max_retries": 0,
                        },
                    ),
                    count=count,
                    bytes=size,
                    attempt=attempt,
                )
            except errors.TransientAPIError as exc:
                cause = exc.__cause__
                response = cause.response if isinstance(cause, anthropic.APIStatusError) else None
                refused = response is not None and response.status_code in _CREATE_REFUSED
                if not (refused or _never_sent(cause)):
                    raise
                if attempt == self._max_retries:
                    # Say "nothing was created", so the caller can release its intent.
                    raise errors.CreateRefused(str(exc), request_id=exc.request_id) from cause
                self.sleep(_retry_delay(response, attempt, self.create_retry_base))
                continue
            return _batch_info(batch, latency_ms=_ms(started))
        raise AssertionError("unreachable: the last attempt returns or raises")

    def retrieve(self, batch_id: str) -> BatchInfo:
        """The batch's current state; a 404 is retried a few times before it counts."""
        return _timed_info(
            lambda: self._call_tolerating_404(
                "retrieve",
                f"retrieve batch {batch_id}",
                lambda: self._dated(
                    self._sdk.messages.batches.with_raw_response.retrieve(batch_id)
                ),
                batch_id=batch_id,
                batch_missing_on_404=True,
            )
        )

    def list_batches(
        self, *, created_after: datetime | None = None, page_size: int = 100
    ) -> Iterator[BatchInfo]:
        """Batches newest first; stops once they are older than ``created_after``."""
        if created_after is not None and created_after.tzinfo is None:
            created_after = created_after.replace(tzinfo=UTC)  # naive means UTC here
        page = self._call(
            "list",
            "list batches",
            lambda: self._dated(self._sdk.messages.batches.with_raw_response.list(limit=page_size)),
        )
        while True:
            for batch in page.data:
                if created_after is not None and batch.created_at < created_after:
                    return  # newest first: everything after this is older still
                yield _batch_info(batch)
            if not page.has_next_page():
                return
            page = self._call("list", "list batches", page.get_next_page)

    def api_now(self) -> datetime | None:
        """The API's clock now, or None before any retrieve or list has answered.

        Read from the ``Date`` header of the API's last such answer, plus the time since on
        our monotonic clock: what ``created_at`` and ``expires_at`` are measured against,
        whatever this host's clock says. ``Date`` has whole seconds, so this can be up to a
        second behind.
        """
        if self._api_date is None:
            return None
        stamp, seen = self._api_date
        return stamp + timedelta(seconds=time.monotonic() - seen)

    def _dated(self, raw: APIResponse[R]) -> R:
        """The parsed body of a raw answer, noting the API's clock from its Date header."""
        value = raw.headers.get("date")
        if value:
            try:
                stamp = parsedate_to_datetime(value)
            except (TypeError, ValueError):
                stamp = None  # an unreadable Date: keep the last good one
            if stamp is not None:
                stamp = stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)
                self._api_date = (stamp, time.monotonic())
        return raw.parse()

    def results(self, batch_id: str, *, keep_content: bool = False) -> Iterator[ResultRecord]:
        """Stream a finished batch's results, one record per request, in bounded memory.

        A generator: the calls happen on the first ``next()``. Raises ``TransientAPIError``
        when the stream breaks off (or ends short of the batch's request count), so a caller
        never mistakes a partial download for the whole file.
        """
        # closing(): a caller that stops early closes the download at once, not at GC.
        with contextlib.closing(self.result_objects(batch_id)) as objects:
            for obj in objects:
                yield record_from(obj, keep_content=keep_content)

    # A result_objects() line as a ResultRecord (what results() yields): for a caller that
    # reads some lines itself and hands the rest over.
    record_from = staticmethod(record_from)

    def result_objects(self, batch_id: str) -> Generator[dict[str, Any], None, None]:
        """:meth:`results` as each line's JSON object (``custom_id`` and a ``result`` of a
        known type, checked), for a caller that reads the commonest lines without a
        ResultRecord each (collect: ``pipeline/outcome.plain_reader``)."""
        info = self.retrieve(batch_id)
        if info.results_url is None:
            raise errors.APIError(
                f"results of batch {batch_id} failed: it has not ended yet "
                f"(processing_status {info.processing_status})"
            )
        _refuse_archived(info)
        url = info.results_url
        op = f"results of batch {batch_id}"
        started = time.perf_counter()
        # A 404 just after the batch ended is ridden out as in retrieve. The SDK's get() with
        # cast_to=httpx2.Response and stream=True hands back the unread response.
        try:
            response = self._call_tolerating_404(
                "results",
                op,
                lambda: self._sdk.get(
                    url,
                    cast_to=httpx2.Response,
                    stream=True,
                    options={"headers": {"Accept": "application/binary"}},
                ),
                batch_id=batch_id,
                batch_missing_on_404=False,
                log_success=False,  # one line is logged below, once the stream has been read
            )
        except errors.APIError as exc:
            if not _is_not_found(exc):
                raise
            # The batch was there a moment ago: a 404 for its file is not a deleted batch.
            # Ask again: gone now (BatchNotFound from retrieve), archived meanwhile (terminal,
            # collect records it), or else the file is not served yet / the URL went stale,
            # which the next try (a fresh retrieve, a fresh URL) gets past.
            _refuse_archived(self.retrieve(batch_id))
            raise errors.ResultsUnavailable(
                f"{exc}; batch {batch_id} exists and has ended but its results file is not "
                "available yet; try again later (`batchpipe tick`, or `run` retries itself)",
                request_id=exc.request_id,
            ) from exc
        request_id = response.headers.get("request-id")
        lines = 0

        def logged(level: Callable[..., Any], **extra: Any) -> None:
            level(
                "api.results",
                batch_id=batch_id,
                lines=lines,
                latency_ms=_ms(started),
                request_id=request_id,
                **extra,
            )

        try:
            for block, complete in split_blocks(response.iter_bytes(), op, request_id):
                for line in block:
                    obj = load_line(line)
                    if obj is None:
                        if complete:
                            raise errors.APIError(
                                f"{op} failed: line {lines + 1} is not a valid result line "
                                f"(request id {request_id})",
                                request_id=request_id,
                            )
                        raise broke_off(op, lines, request_id, "its last line is cut short")
                    lines += 1
                    yield obj
            total = info.request_counts.total
            if lines < total:
                raise broke_off(op, lines, request_id, f"{lines} of {total} lines arrived")
        except errors.APIError as exc:
            transient = isinstance(exc, errors.TransientAPIError)
            logged(log.warning, error_type="incomplete_stream" if transient else "invalid_line")
            raise
        finally:
            response.close()
        logged(log.info)

    def cancel(self, batch_id: str) -> BatchInfo:
        """Ask the API to cancel a batch; it answers with the batch, normally ``canceling``."""
        return _timed_info(
            lambda: self._call(
                "cancel",
                f"cancel batch {batch_id}",
                lambda: self._sdk.messages.batches.cancel(batch_id),
                batch_id=batch_id,
            )
        )

    def count_tokens(self, params: dict[str, Any]) -> int:
        """Input tokens of one rendered request's params (keys the endpoint rejects are dropped)."""
        kept = {k: v for k, v in params.items() if k in COUNT_TOKENS_KEYS}
        # One line per call at debug only: an estimate counts ~50 rows, and logs one summary
        # line of its own (``estimate.tokens_counted``). Failures still warn.
        counted = self._call(
            "count_tokens",
            "count tokens",
            lambda: self._sdk.messages.count_tokens(**kept),
            success_debug=True,
        )
        return counted.input_tokens

    # ------------------------------------------------------------------ plumbing

    def _call(
        self,
        event: str,
        op: str,
        fn: Callable[[], T],
        *,
        batch_id: str | None = None,
        remap_not_found: bool = True,
        batch_missing_on_404: bool = False,
        log_success: bool = True,
        success_debug: bool = False,
        **fields: Any,
    ) -> T:
        """Run one SDK call: time it, log one ``api.<event>`` line, map its errors.

        ``success_debug`` logs a successful call at debug (calls made by the dozen); an
        error is a warning either way.

        ``batch_missing_on_404``: a 404 means the batch itself is gone (BatchNotFound). Only
        ``retrieve`` says that; a 404 from a results download or a cancel means something
        else (see :meth:`result_objects`), and the pipeline offers a paid resend for a
        BatchNotFound.
        """
        started = time.perf_counter()
        try:
            result = fn()
        except anthropic.AnthropicError as exc:
            request_id = getattr(exc, "request_id", None)
            log.warning(
                f"api.{event}",
                batch_id=batch_id,
                latency_ms=_ms(started),
                request_id=request_id,
                status=getattr(exc, "status_code", None),
                error_type=getattr(exc, "type", None) or type(exc).__name__,
                **fields,
            )
            if isinstance(exc, anthropic.NotFoundError) and not remap_not_found:
                raise
            mapped = self._map_error(op, exc)
            if isinstance(exc, anthropic.NotFoundError) and batch_missing_on_404:
                # A batch of ours the API does not know: the pipeline says what to do.
                raise errors.BatchNotFound(str(mapped), request_id=mapped.request_id) from exc
            raise mapped from exc
        if not log_success:
            return result
        batch_id = batch_id or getattr(result, "id", None)
        (log.debug if success_debug else log.info)(
            f"api.{event}",
            batch_id=batch_id,
            latency_ms=_ms(started),
            request_id=getattr(result, "_request_id", None),
            **fields,
        )
        return result

    def _call_tolerating_404(
        self,
        event: str,
        op: str,
        fn: Callable[[], T],
        *,
        batch_id: str,
        batch_missing_on_404: bool,
        log_success: bool = True,
    ) -> T:
        """``_call``, but a 404 only counts once it persists over a few short waits."""
        for attempt in range(self.not_found_retries):
            try:
                return self._call(
                    event, op, fn, batch_id=batch_id, remap_not_found=False, log_success=log_success
                )
            except anthropic.NotFoundError:
                self.sleep(self.not_found_delay * (attempt + 1))
        return self._call(
            event,
            op,
            fn,
            batch_id=batch_id,
            batch_missing_on_404=batch_missing_on_404,
            log_success=log_success,
        )

    def _map_error(self, op: str, exc: anthropic.AnthropicError) -> errors.APIError:
        """Translate an SDK exception; the message never holds the key or a request body."""
        if isinstance(exc, anthropic.APIStatusError):
            api_message = self._scrub(exc.api_message or "")
            rid = exc.request_id
            message = (
                f"{op} failed: {exc.status_code} {exc.type or 'unknown_error'}: {api_message} "
                f"(request id {rid or 'unknown'})"
            )
            cls: type[errors.APIError]
            if isinstance(exc, (anthropic.AuthenticationError, anthropic.PermissionDeniedError)):
                cls = errors.AuthenticationFailed
            elif isinstance(exc, _TRANSIENT_SDK_ERRORS):
                cls = errors.TransientAPIError
            else:
                cls = errors.APIError
            return cls(message, request_id=rid)
        if isinstance(exc, anthropic.APIConnectionError):
            kind = (
                "timed out" if isinstance(exc, anthropic.APITimeoutError) else "could not connect"
            )
            cause = (
                type(exc.__cause__).__name__ if exc.__cause__ is not None else type(exc).__name__
            )
            return errors.TransientAPIError(f"{op} failed: {kind} ({cause}); try again later")
        return errors.APIError(f"{op} failed: {type(exc).__name__}: {self._scrub(str(exc))}")

    def _scrub(self, text: str) -> str:
        # Belt and braces: no API message should echo the key, but make sure none can.
        return text.replace(self._key, "[redacted]") if self._key else text


# ---------------------------------------------------------------------- conversions


def _refuse_archived(info: BatchInfo) -> None:
    """Raise the terminal APIError collect records as archived, if the batch's results are."""
    if info.archived_at is not None:
        raise errors.APIError(
            f"results of batch {info.id} failed: they were archived at "
            f"{info.archived_at.isoformat()} and can no longer be downloaded"
        )


def _is_not_found(exc: errors.APIError) -> bool:
    """Whether a mapped API error came from a 404 answer."""
    return isinstance(exc.__cause__, anthropic.NotFoundError)


def _never_sent(error: BaseException | None) -> bool:
    """Whether an SDK error is a connection that was never made, so no request went out."""
    return isinstance(error, anthropic.APIConnectionError) and isinstance(
        error.__cause__, (httpx2.ConnectError, httpx2.ConnectTimeout)
    )


def _retry_delay(response: httpx2.Response | None, attempt: int, base: float) -> float:
    """Seconds to wait before retrying a refused create: the server's word, else backoff."""
    headers = response.headers if response is not None else {}
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        try:
            value = float(headers.get(name, "")) * scale
        except ValueError:
            continue
        if value >= 0:
            return min(value, _MAX_RETRY_DELAY)
    # Jitter spreads out many workers that were refused at the same moment.
    return min(base * 2.0**attempt, 8.0) * random.uniform(0.75, 1.0)


def _ms(started: float) -> int:
    return round((time.perf_counter() - started) * 1000)


def _timed_info(call: Callable[[], MessageBatch]) -> BatchInfo:
    """``call``'s batch as a BatchInfo carrying how long the call took (retries included)."""
    started = time.perf_counter()
    batch = call()
    return _batch_info(batch, latency_ms=_ms(started))


def _batch_info(batch: MessageBatch, latency_ms: int | None = None) -> BatchInfo:
    counts = batch.request_counts
    return BatchInfo(
        id=batch.id,
        processing_status=batch.processing_status,
        request_counts=RequestCounts(
            processing=counts.processing,
            succeeded=counts.succeeded,
            errored=counts.errored,
            canceled=counts.canceled,
            expired=counts.expired,
        ),
        created_at=batch.created_at,
        expires_at=batch.expires_at,
        ended_at=batch.ended_at,
        cancel_initiated_at=batch.cancel_initiated_at,
        archived_at=batch.archived_at,
        results_url=batch.results_url,
        request_id=getattr(batch, "_request_id", None),
        latency_ms=latency_ms,
    )

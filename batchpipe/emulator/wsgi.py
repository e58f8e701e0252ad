"""The WSGI application: the Message Batches API endpoints plus ``/_emulator/`` controls.

Order of checks for an API call, as the real service layers them: body size (413, before
the body is read), authentication (401), ``anthropic-version`` (400), injected HTTP faults,
then the endpoint. Any path prefix before ``/v1/`` is accepted and kept in ``results_url``,
so ``base_url="http://host:port/some/prefix"`` works. Control endpoints are never faulted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from email.utils import formatdate
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import orjson
from pydantic import ValidationError

from batchpipe.emulator import responder
from batchpipe.emulator.failures import ApiFailure, bad_request
from batchpipe.emulator.faults import ResultsStreamBroken, draw_call_fault, draw_results_break
from batchpipe.emulator.store import new_id, rfc3339
from batchpipe.emulator.validation import CreateRejected, validate_create_body
from batchpipe.models import API_MAX_BATCH_BYTES

if TYPE_CHECKING:
    from batchpipe.emulator.core import Emulator

StartResponse = Callable[..., Any]
Environ = dict[str, Any]
Response = tuple[int, list[tuple[str, str]], Iterable[bytes]]

log = logging.getLogger(__name__)
COUNT_TOKENS_MAX_BYTES = 32 * 1024 * 1024
_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    411: "Length Required",
    408: "Request Timeout",
    409: "Conflict",
    413: "Payload Too Large",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    529: "Overloaded",
}
_CHUNK_BYTES = 64 * 1024  # results are sent in chunks of about this size
# The API names the caller's organization on every answer; the emulator has one.
ORGANIZATION_ID = "0e1c5a7e-0000-4000-8000-00000000e1a7"


def _json(
    status: int, body: object, request_id: str, extra: Iterable[tuple[str, str]] = ()
) -> Response:
    data = orjson.dumps(body)
    headers = [
        ("content-type", "application/json"),
        ("content-length", str(len(data))),
        ("request-id", request_id),
        ("anthropic-organization-id", ORGANIZATION_ID),
        *extra,
    ]
    return status, headers, [data]


def _error(failure: ApiFailure, request_id: str, extra: Iterable[tuple[str, str]] = ()) -> Response:
    body = {
        "type": "error",
        "error": {"type": failure.error_type, "message": failure.message},
        "request_id": request_id,
    }
    return _json(failure.status, body, request_id, extra)


def _declared_length(environ: Environ) -> int:
    raw = (environ.get("CONTENT_LENGTH") or "").strip()
    return int(raw) if raw.isdigit() else -1


def _too_large(limit: int) -> ApiFailure:
    return ApiFailure(
        413, "request_too_large", f"Request exceeds the maximum size of {limit} bytes"
    )


def _read_body(environ: Environ, limit: int) -> bytes:
    """The request body; 413 if it is (or turns out to be) larger than ``limit``."""
    stream = environ["wsgi.input"]
    size = _declared_length(environ)
    if size > limit:
        raise _too_large(limit)
    data: bytes = stream.read(size) if size >= 0 else stream.read(limit + 1)
    if len(data) > limit:
        raise _too_large(limit)
    return data


def _parse_json(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"The request body is not valid JSON: {exc}") from None


class EmulatorApp:
    """A WSGI callable bound to one ``Emulator``."""

    def __init__(self, emulator: Emulator) -> None:
        self.emu = emulator

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        """Serve one request (start_response is always called before returning)."""
        path = environ.get("PATH_INFO") or "/"
        request_id = new_id("req_")
        try:
            if "chunked" in (environ.get("HTTP_TRANSFER_ENCODING") or "").lower():
                # The SDK always sends Content-Length; a body of unknown length is refused.
                raise ApiFailure(
                    411, "invalid_request_error", "A request body needs a Content-Length header"
                )
            if "/_emulator/" in path:
                status, headers, body = self._control(
                    environ, path[path.index("/_emulator/") + 11 :], request_id
                )
            else:
                status, headers, body = self._api(environ, path, request_id)
        except ApiFailure as failure:
            status, headers, body = _error(failure, request_id)
        except Exception:  # a bug in the emulator: answer like the API would, and say so
            log.exception("emulator: unhandled error serving %s", path)
            bug = ApiFailure(500, "api_error", "Internal server error (emulator bug)")
            status, headers, body = _error(bug, request_id)
        # Every answer is dated by the emulator's clock, as the API's are by its own: a client
        # that measures the API's clock (expiry warnings, orphan windows) sees the one that
        # stamps created_at and expires_at, moved on by advance() like them.
        headers = [*headers, ("date", formatdate(self.emu.now(), usegmt=True))]
        start_response(f"{status} {_REASONS.get(status, 'Error')}", headers)
        return body

    # ------------------------------------------------------------ the API

    def _api(self, environ: Environ, path: str, request_id: str) -> Response:
        cut = path.find("/v1/")
        prefix, route = (path[:cut], path[cut:]) if cut >= 0 else ("", path)
        method = environ.get("REQUEST_METHOD", "GET")
        endpoint, batch_id = _route(method, route.rstrip("/"))
        if endpoint == "create" and _declared_length(environ) > API_MAX_BATCH_BYTES:
            raise _too_large(API_MAX_BATCH_BYTES)  # like the API's proxy: before reading a byte
        _check_headers(environ)
        with self.emu.locked() as store:
            store.calls[endpoint] += 1
            fault = draw_call_fault(store, self.emu.rng)
        if fault.slow_seconds:
            time.sleep(fault.slow_seconds)  # outside the lock: other calls carry on meanwhile
        if fault.failure is not None:
            return _error(fault.failure, request_id, fault.headers)
        base = _base_url(environ, prefix)
        handler = getattr(self, f"_do_{endpoint}")
        result: Response = handler(environ, batch_id, base, request_id)
        return result

    def _do_create(self, environ: Environ, _id: str, base: str, rid: str) -> Response:
        body = _parse_json(_read_body(environ, API_MAX_BATCH_BYTES))
        try:
            requests = validate_create_body(body)
        except CreateRejected as exc:
            raise bad_request(str(exc)) from None
        del body  # the parsed body can be large; only the compact per-item params are kept
        with self.emu.locked() as store:
            now = self.emu.now()
            batch = store.create(requests, now)
            return _json(200, store.to_json(batch, base, now), rid)

    def _do_retrieve(self, _environ: Environ, batch_id: str, base: str, rid: str) -> Response:
        with self.emu.locked() as store:
            now = self.emu.now()
            return _json(200, store.to_json(store.get(batch_id, now), base, now), rid)

    def _do_cancel(self, environ: Environ, batch_id: str, base: str, rid: str) -> Response:
        _read_body(environ, 1024 * 1024)  # the SDK sends none; drain whatever came
        with self.emu.locked() as store:
            now = self.emu.now()
            return _json(200, store.to_json(store.cancel(batch_id, now), base, now), rid)

    def _do_delete(self, _environ: Environ, batch_id: str, _base: str, rid: str) -> Response:
        with self.emu.locked() as store:
            store.delete(batch_id, self.emu.now())
        return _json(200, {"id": batch_id, "type": "message_batch_deleted"}, rid)

    def _do_list(self, environ: Environ, _id: str, base: str, rid: str) -> Response:
        query = parse_qs(environ.get("QUERY_STRING", ""))
        limit = _limit(query.get("limit", ["20"])[-1])
        after_id = query.get("after_id", [None])[-1]
        before_id = query.get("before_id", [None])[-1]
        with self.emu.locked() as store:
            now = self.emu.now()
            page, has_more = store.list_page(
                now, limit=limit, after_id=after_id, before_id=before_id
            )
            data = [store.to_json(b, base, now) for b in page]
        body = {
            "data": data,
            "has_more": has_more,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
        }
        return _json(200, body, rid)

    def _do_results(self, _environ: Environ, batch_id: str, _base: str, rid: str) -> Response:
        with self.emu.locked() as store:
            lines = store.result_lines(batch_id, self.emu.now())
            break_after = draw_results_break(store, self.emu.rng, len(lines))
        headers = [
            ("content-type", "application/x-jsonl"),
            ("content-disposition", f"attachment; filename*=utf-8''{batch_id}_results.jsonl"),
            ("request-id", rid),
            ("anthropic-organization-id", ORGANIZATION_ID),
        ]
        return 200, headers, _stream_lines(lines, break_after)

    def _do_count_tokens(self, environ: Environ, _id: str, _base: str, rid: str) -> Response:
        body = _parse_json(_read_body(environ, COUNT_TOKENS_MAX_BYTES))
        if not isinstance(body, dict):
            raise bad_request("body: Input should be a valid dictionary")
        try:
            tokens = responder.count_tokens(body)
        except responder.InvalidParams as exc:
            raise bad_request(str(exc)) from None
        model = body["model"]  # a string: count_tokens checked it
        if not self.emu.config.knows_model(model):
            raise ApiFailure(404, "not_found_error", f"model: {model}")
        return _json(200, {"input_tokens": tokens}, rid)

    # ------------------------------------------------------------ controls

    def _control(self, environ: Environ, action: str, rid: str) -> Response:
        method = environ.get("REQUEST_METHOD", "GET")
        action = action.strip("/")
        if action == "stats" and method == "GET":
            return _json(200, self.emu.stats(), rid)
        if action == "faults" and method == "GET":
            return _json(200, self.emu.config.model_dump(mode="json"), rid)
        if action in {"faults", "clock", "reset"} and method == "POST":
            raw = _read_body(environ, 1024 * 1024)
            body = _parse_json(raw) if raw.strip() else {}
            if not isinstance(body, dict):
                raise bad_request("body: Input should be a JSON object")
            if action == "faults":
                try:
                    config = self.emu.configure(**body)
                except ValidationError as exc:
                    raise bad_request(_pydantic_message(exc)) from None
                return _json(200, config.model_dump(mode="json"), rid)
            if action == "clock":
                seconds = body.get("advance", 0)
                if not isinstance(seconds, int | float) or isinstance(seconds, bool) or seconds < 0:
                    raise bad_request("advance: Input should be a number of seconds >= 0")
                now = self.emu.advance(float(seconds))
                return _json(200, {"now": rfc3339(now)}, rid)
            self.emu.reset()
            return _json(200, {"reset": True}, rid)
        raise ApiFailure(
            404, "not_found_error", f"no emulator control endpoint {method} {action!r}"
        )


def _route(method: str, route: str) -> tuple[str, str]:
    """(endpoint name, batch id or '') for an API path; 404/405 when there is none."""
    parts = route.strip("/").split("/")
    allowed: str | None = None
    endpoint = ""
    batch_id = ""
    if parts == ["v1", "messages", "count_tokens"]:
        allowed, endpoint = "POST", "count_tokens"
    elif parts[:3] == ["v1", "messages", "batches"]:
        rest = parts[3:]
        if not rest:
            endpoint = {"POST": "create", "GET": "list"}.get(method, "")
            allowed = method if endpoint else "GET, POST"
        elif len(rest) == 1:
            endpoint = {"GET": "retrieve", "DELETE": "delete"}.get(method, "")
            allowed = method if endpoint else "GET, DELETE"
            batch_id = rest[0]
        elif len(rest) == 2 and rest[1] in {"cancel", "results"}:
            allowed = "POST" if rest[1] == "cancel" else "GET"
            endpoint, batch_id = rest[1], rest[0]
    if allowed is None:
        raise ApiFailure(404, "not_found_error", f"Not found: {method} {route}")
    if method not in allowed.split(", "):
        raise ApiFailure(
            405, "invalid_request_error", f"Method {method} not allowed; use {allowed}"
        )
    return endpoint, batch_id


def _check_headers(environ: Environ) -> None:
    key = (environ.get("HTTP_X_API_KEY") or "").strip()
    auth = (environ.get("HTTP_AUTHORIZATION") or "").strip()
    bearer = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
    if not key and not bearer:
        raise ApiFailure(
            401, "authentication_error", "x-api-key header is required (or Authorization: Bearer)"
        )
    if not (environ.get("HTTP_ANTHROPIC_VERSION") or "").strip():
        raise bad_request("anthropic-version: header is required")


def _base_url(environ: Environ, prefix: str) -> str:
    """scheme://host[:port]/prefix as the client addressed us (for absolute results_url)."""
    host = environ.get("HTTP_HOST")
    if not host:
        host = f"{environ.get('SERVER_NAME', 'localhost')}:{environ.get('SERVER_PORT', '80')}"
    return f"{environ.get('wsgi.url_scheme', 'http')}://{host}{prefix}"


def _limit(raw: str) -> int:
    try:
        limit = int(raw)
    except ValueError:
        raise bad_request("limit: Input should be a valid integer") from None
    if not 1 <= limit <= 1000:
        raise bad_request(
            "limit: Input should be greater than or equal to 1"
            if limit < 1
            else "limit: Input should be less than or equal to 1000"
        )
    return limit


def _stream_lines(lines: list[str], break_after: int | None) -> Iterator[bytes]:
    """Yield the lines, newline-terminated, in chunks; maybe drop the stream after K lines."""
    chunk: list[bytes] = []
    size = 0
    for index, line in enumerate(lines):
        if break_after is not None and index >= break_after:
            if chunk:
                yield b"".join(chunk)
            raise ResultsStreamBroken(f"emulator fault: results stream dropped after {index} lines")
        data = line.encode()
        chunk.append(data)
        chunk.append(b"\n")
        size += len(data) + 1
        if size >= _CHUNK_BYTES:
            yield b"".join(chunk)
            chunk, size = [], 0
    if chunk:
        yield b"".join(chunk)


def _pydantic_message(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
    )

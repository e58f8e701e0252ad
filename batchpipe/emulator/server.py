"""``EmulatorServer``: the emulator on a real, threaded HTTP/1.1 server (loopback by default).

Why not ``wsgiref``: it speaks HTTP/1.0 and ends a streamed body by closing the socket, so
a results download cut short would look like a complete (short) file. This server sends
streamed bodies with chunked transfer encoding, so a dropped stream reaches the client as an
incomplete chunked read (``httpx2.RemoteProtocolError``), and it keeps connections alive.
"""

from __future__ import annotations

import io
import logging
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from batchpipe.emulator.core import Emulator
from batchpipe.emulator.faults import ResultsStreamBroken

log = logging.getLogger(__name__)
_DRAIN_CHUNK = 1024 * 1024
_MAX_DRAIN = 1024 * 1024 * 1024  # unread request bodies up to this size are drained, not cut


class _Body(io.RawIOBase):
    """The request body, limited to Content-Length, remembering how much is left."""

    def __init__(self, raw: Any, length: int) -> None:
        self._raw = raw
        self.left = length

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0 or size > self.left:
            size = self.left
        if size == 0:
            return b""
        data: bytes = self._raw.read(size)
        self.left -= len(data)
        if not data:
            self.left = 0
        return data

    def drain(self) -> bool:
        """Read and drop what the app left unread; False if too much to bother."""
        if self.left > _MAX_DRAIN:
            return False
        while self.left:
            if not self.read(min(self.left, _DRAIN_CHUNK)):
                return False
        return True


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "batchpipe-emulator"
    server: _Server

    def do_GET(self) -> None:
        self._serve()

    do_POST = do_DELETE = do_PUT = do_PATCH = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("emulator %s", format % args)

    def _environ(self, body: _Body) -> dict[str, Any]:
        path, _, query = self.path.partition("?")
        host, port = self.server.server_address[:2]
        environ: dict[str, Any] = {
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.input": body,
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
            "REQUEST_METHOD": self.command,
            "SCRIPT_NAME": "",
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "SERVER_NAME": str(host),
            "SERVER_PORT": str(port),
            "SERVER_PROTOCOL": self.request_version,
            "REMOTE_ADDR": self.client_address[0],
        }
        for key, value in self.headers.items():
            name = key.upper().replace("-", "_")
            if name not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                name = "HTTP_" + name
            environ[name] = value
        return environ

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            # The app refuses it (411, see wsgi.py); its body is left unread, so the
            # connection cannot carry another request.
            length, self.close_connection = 0, True
        body = _Body(self.rfile, length)
        captured: list[Any] = []

        def start_response(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Any:
            captured[:] = [status, headers]
            return lambda _data: None

        result = self.server.app(self._environ(body), start_response)
        try:
            # Drain before answering so a client still sending (say a 413'd 300 MB body)
            # reads our answer instead of a broken pipe.
            if not body.drain():
                self.close_connection = True
            status, headers = captured
            code, _, reason = status.partition(" ")
            # Not send_response(): it adds a Date of the wall clock, and the app dates every
            # answer by the emulator's clock.
            self.log_request(int(code))
            self.send_response_only(int(code), reason)
            self.send_header("Server", self.version_string())
            names = {k.lower() for k, _ in headers}
            for key, value in headers:
                self.send_header(key, value)
            chunked = "content-length" not in names
            if chunked:
                self.send_header("Transfer-Encoding", "chunked")
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            for data in result:
                if data:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except ResultsStreamBroken:
            # The injected fault: stop without the final chunk and hang up.
            self.wfile.flush()
            self.close_connection = True
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away; nothing to tell it
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], app: Any) -> None:
        self.app = app
        super().__init__(address, _Handler)


class EmulatorServer:
    """Serve an ``Emulator`` over HTTP in a background thread (a context manager).

    ``port=0`` picks a free port; ``url`` tells which (``http://127.0.0.1:PORT``).
    """

    def __init__(self, emulator: Emulator, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.emulator = emulator
        self._httpd = _Server((host, port), emulator.wsgi_app)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The base URL to give the SDK."""
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> EmulatorServer:
        """Start serving in a daemon thread."""
        if self._thread is None:
            self._thread = threading.Thread(
                # A short poll interval makes stop() quick (tests start many servers).
                target=self._httpd.serve_forever,
                kwargs={"poll_interval": 0.05},
                name="batchpipe-emulator",
                daemon=True,
            )
            self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread until ``stop`` (from another thread) or Ctrl-C."""
        self._httpd.serve_forever()

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> EmulatorServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

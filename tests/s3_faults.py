"""Test helpers: moto's S3 server on 127.0.0.1 and a fault-injecting HTTP proxy in front of it.

The proxy forwards every request to the S3 server unchanged, except the requests its `fault` callback
picks, which get a server error, a connection closed without a reply, or a reply cut off halfway. Every
request it receives is logged, so a test can count the retries a client made.
"""
from __future__ import annotations

import http.client
import http.server
import sys
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Optional
from urllib.parse import urlparse

import pytest

from mlflow_server import S3_ENV, free_port

# fault kinds: an S3 error reply (status, code), or one of the connection faults
SERVER_ERRORS = {"500": (500, "InternalError"), "503": (503, "SlowDown")}
DROP = "drop"            # read the request, then close the connection without replying
TRUNCATE = "truncate"    # forward, then send the upstream headers and half the body, and close
FAULT_KINDS = (*SERVER_ERRORS, DROP, TRUNCATE)
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}


@dataclass(frozen=True)
class Request:
    number: int          # 1-based, in arrival order
    method: str
    path: str            # with the query string
    fault: Optional[str]

    @property
    def is_object_read(self) -> bool:
        """A HEAD or GET of one object (a path with a key), not a bucket listing."""
        path = urlparse(self.path).path.strip("/")
        return self.method in ("GET", "HEAD") and "/" in path


FaultPicker = Callable[[Request], Optional[str]]   # given the request (fault None), the fault kind or None


class QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        """Clients hang up on dropped and cut-off replies by design: no traceback for that."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class FaultInjectingProxy:
    """A threading HTTP server forwarding to `upstream`; `fault` decides per request (settable later)."""

    def __init__(self, upstream: str, fault: FaultPicker = lambda request: None):
        self.upstream = urlparse(upstream)
        self.fault = fault
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._server = QuietServer(("127.0.0.1", 0), self._handler_class())     # 0: any free port
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def faults(self) -> list[Request]:
        return [request for request in self.requests if request.fault]

    def start(self) -> "FaultInjectingProxy":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _register(self, method: str, path: str) -> Request:
        with self._lock:
            number = len(self.requests) + 1
            kind = self.fault(Request(number, method, path, None))
            if kind is not None and kind not in FAULT_KINDS:
                raise ValueError(f"fault kind {kind!r}; expected one of {FAULT_KINDS}")
            if kind == TRUNCATE and method == "HEAD":    # no body to cut: the reply passes whole
                kind = None
            request = Request(number, method, path, kind)
            self.requests.append(request)
        return request

    def _handler_class(self):
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"       # keep-alive, as S3 clients expect

            def log_message(self, *args):       # keep test output quiet
                pass

            def _body(self) -> bytes:
                """The request body exactly as sent (chunked bodies stay chunked: they are signed so)."""
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    raw = bytearray()
                    while True:
                        size_line = self.rfile.readline()
                        raw += size_line
                        size = int(size_line.split(b";")[0].strip(), 16)
                        if size == 0:
                            while True:     # trailers, up to the empty line
                                line = self.rfile.readline()
                                raw += line
                                if line in (b"\r\n", b"\n", b""):
                                    return bytes(raw)
                        raw += self.rfile.read(size + 2)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self):
                body = self._body()
                request = proxy._register(self.command, self.path)
                if request.fault in SERVER_ERRORS:
                    status, code = SERVER_ERRORS[request.fault]
                    reply = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                             f"<Message>injected fault</Message></Error>").encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(reply)))
                    self.end_headers()
                    self.wfile.write(reply)
                    return
                if request.fault == DROP:
                    self.close_connection = True
                    return
                upstream = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                try:
                    upstream.request(self.command, self.path, body=body, headers=dict(self.headers.items()))
                    response = upstream.getresponse()
                    payload = response.read()
                    headers = [(k, v) for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP]
                finally:
                    upstream.close()
                self.send_response(response.status, response.reason)
                for key, value in headers:
                    if self.command == "HEAD" or key.lower() != "content-length":
                        self.send_header(key, value)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command == "HEAD":
                    return
                if request.fault == TRUNCATE:
                    self.wfile.write(payload[: len(payload) // 2])
                    self.close_connection = True
                    return
                self.wfile.write(payload)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        return Handler


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    """moto's S3 server on a free 127.0.0.1 port, shared by a module's tests (each makes its own bucket
    or writes content-addressed keys of fresh random data, so they do not meet)."""
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{server._port}"
    finally:
        server.stop()


@pytest.fixture
def proxy(moto_endpoint, monkeypatch) -> Iterator[FaultInjectingProxy]:
    """A FaultInjectingProxy in front of moto_endpoint, passing everything until a test sets `fault`;
    test credentials in the environment, and botocore's retry settings left at their defaults."""
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE", "AWS_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    faulty = FaultInjectingProxy(moto_endpoint).start()
    try:
        yield faulty
    finally:
        faulty.stop()


def first_tries(kinds: tuple[str, ...], where: Callable[[Request], bool] = lambda request: True) -> FaultPicker:
    """Fault the first try of each of the first len(kinds) distinct requests (method and path) that
    `where` accepts, with kinds[0], kinds[1], ... in turn; every retry passes."""
    faulted: set[tuple[str, str]] = set()

    def pick(request: Request) -> Optional[str]:
        key = (request.method, request.path)
        if len(faulted) == len(kinds) or key in faulted or not where(request):
            return None
        faulted.add(key)
        return kinds[len(faulted) - 1]

    return pick

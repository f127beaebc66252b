"""A fault-injecting HTTP proxy on loopback, in front of a real S3 server (moto_server).

It forwards every request to the server unchanged and passes the answer back, except for the
requests it is told to spoil. Faults are deterministic: the first N matching requests, or every
request drawn by a seeded random number generator at a given rate, or all of them.

Modes:
    cut      answer with the real status and headers (the full Content-Length) but send only half
             of the body, then close the connection: a response cut mid-body.
    refuse   drop the connection without answering (a reset, as a dead load balancer does).
    slowdown answer ``503 SlowDown``, the S3 throttling error.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

MODES = ("cut", "refuse", "slowdown")
# Hop-by-hop headers are the proxy's own business (RFC 9110 section 7.6.1).
_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade", "expect"}
_SLOWDOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


@dataclass
class Faults:
    """Which requests to spoil, and how.

    ``first``: spoil the first N matching requests; ``rate``: then spoil each further matching
    request with this probability (seeded, so a run is repeatable); ``always``: spoil every one.
    ``methods`` limits the faults to some HTTP methods (``None``: all). ``mode`` is one mode or a
    tuple of them, taken in turn by the spoiled requests.
    """

    mode: str | tuple[str, ...] = "cut"
    first: int = 0
    rate: float = 0.0
    always: bool = False
    methods: frozenset[str] | None = None
    seed: int = 0
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        modes = (self.mode,) if isinstance(self.mode, str) else tuple(self.mode)
        if not modes or any(m not in MODES for m in modes):
            raise ValueError(f"mode must be one or more of {MODES}, not {self.mode!r}")
        self.modes = modes
        self._rng = random.Random(self.seed)


class FaultProxy:
    """``with FaultProxy(upstream) as proxy: ...``; ``proxy.endpoint`` is the URL to use instead."""

    def __init__(self, upstream: str, faults: Faults | None = None) -> None:
        parsed = urlparse(upstream)
        self.upstream_host = parsed.hostname or "127.0.0.1"
        self.upstream_port = parsed.port or 80
        self.faults = faults or Faults(first=0)
        self.lock = threading.Lock()
        self.requests = 0  # every request seen
        self.spoiled = 0  # requests answered with a fault
        self.log: list[tuple[str, str, str]] = []  # (method, path, "ok" or the fault)
        self._matching = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def set_faults(self, faults: Faults) -> None:
        """New faults, counted afresh (``requests`` and ``spoiled`` start again from zero)."""
        with self.lock:
            self.faults = faults
            self._matching = self.requests = self.spoiled = 0

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- deciding -----------------------------------------------------------------------------
    def _decide(self, method: str, path: str) -> str | None:
        with self.lock:
            self.requests += 1
            f = self.faults
            fault = None
            if f.methods is None or method in f.methods:
                n = self._matching
                self._matching += 1
                if f.always or n < f.first or (f.rate > 0 and f._rng.random() < f.rate):
                    fault = f.modes[self.spoiled % len(f.modes)]
            if fault:
                self.spoiled += 1
            self.log.append((method, path, fault or "ok"))
            return fault

    # -- serving ------------------------------------------------------------------------------
    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet: the test prints what it needs
                pass

            def setup(self) -> None:
                super().setup()
                # headers and body go out in separate writes: without this, Nagle's algorithm and
                # the client's delayed ACK add tens of milliseconds to every answer
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    out = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return bytes(out)
                        out += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _reset(self) -> None:
                # SO_LINGER with a zero timeout turns close() into a TCP reset.
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()

            def _serve(self) -> None:
                body = self._body()
                fault = proxy._decide(self.command, self.path)
                if fault == "refuse":
                    self._reset()
                    return
                if fault == "slowdown":
                    self.send_response(503, "Slow Down")
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(_SLOWDOWN)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(_SLOWDOWN)
                    return
                conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
                try:
                    conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                    for name, value in self.headers.items():
                        if name.lower() not in _HOP and name.lower() != "content-length":
                            conn.putheader(name, value)
                    if body or self.command in ("PUT", "POST"):
                        conn.putheader("Content-Length", str(len(body)))
                    conn.endheaders(body)
                    resp = conn.getresponse()
                    data = resp.read()
                    headers = resp.getheaders()
                    status, reason = resp.status, resp.reason
                finally:
                    conn.close()
                self.send_response_only(status, reason)
                length = None
                for name, value in headers:
                    if name.lower() in _HOP:
                        continue
                    if name.lower() == "content-length":
                        length = value
                        continue
                    self.send_header(name, value)
                if self.command == "HEAD":
                    self.send_header("Content-Length", length if length is not None else "0")
                else:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command == "HEAD" and fault != "cut":
                    return
                if fault == "cut" and len(data) > 1:
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self._reset()
                    return
                if fault == "cut":  # no body to cut (HEAD, an empty answer): drop the connection after the headers
                    self._reset()
                    return
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _serve

        return Handler

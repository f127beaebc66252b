"""Small OpenAI-compatible servers on loopback that fail in scripted ways, for the API judge's tests.

``ScriptedServer(script)`` answers ``POST /v1/chat/completions`` (or the path given as ``route``,
e.g. Perspective's ``/comments:analyze``): each request takes the next step of the script (the
last step repeats). A step is a callable ``(handler, body) -> None``
that writes the whole response. Every request's JSON body and headers are recorded.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

Step = Callable[[BaseHTTPRequestHandler, dict], None]


def completion(text: str, *, prompt_tokens: int = 11, completion_tokens: int = 3) -> dict:
    return {
        "id": "cmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": "judge",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def _send(
    h: BaseHTTPRequestHandler, status: int, body: bytes, ctype: str = "application/json", headers: dict | None = None
) -> None:
    h.send_response(status)
    h.send_header("Content-Type", ctype)
    h.send_header("Content-Length", str(len(body)))
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    h.end_headers()
    h.wfile.write(body)


def reply(text_of: Callable[[dict], str] | str) -> Step:
    """200 with a chat completion; ``text_of`` may compute the text from the request body."""

    def step(h, body):
        text = text_of(body) if callable(text_of) else text_of
        _send(h, 200, json.dumps(completion(text)).encode())

    return step


def status(code: int, headers: dict | None = None, message: str = "overloaded") -> Step:
    def step(h, body):
        _send(h, code, json.dumps({"error": {"message": message, "type": "server_error"}}).encode(), headers=headers)

    return step


def garbage(payload: bytes = b"<html>502 proxy hiccup</html>", ctype: str = "text/html") -> Step:
    def step(h, body):
        _send(h, 200, payload, ctype=ctype)

    return step


def stall(seconds: float, then: Step) -> Step:
    def step(h, body):
        time.sleep(seconds)
        try:
            then(h, body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up waiting, as it should

    return step


class ScriptedServer:
    def __init__(self, script: list[Step], route: str = "/chat/completions") -> None:
        self.script = list(script)
        self.route = route
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.arrivals: list[float] = []  # when each request came in (monotonic clock)
        self._lock = threading.Lock()
        self.in_flight = self.max_in_flight = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest's output clean
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                with server._lock:
                    i = len(server.requests)
                    server.requests.append(body)
                    server.headers.append({k.lower(): v for k, v in self.headers.items()})
                    server.arrivals.append(time.monotonic())
                    step = server.script[min(i, len(server.script) - 1)]
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    if not urlsplit(self.path).path.endswith(server.route):
                        _send(self, 404, b'{"error": {"message": "no such route"}}')
                        return
                    step(self, body)
                finally:
                    with server._lock:
                        server.in_flight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> ScriptedServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def user_messages(self) -> list[str]:
        return [b["messages"][-1]["content"] for b in self.requests]

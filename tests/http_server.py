"""A tiny HTTP server on 127.0.0.1 for download tests: Range support, and misbehaviour on request."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ServerState:
    def __init__(self, payload: bytes, mode: str = "ok", stall_seconds: float = 0.0) -> None:
        self.payload = payload
        # ok | drop_once | drop_always | stall | endless (no Content-Length, never ends) | ignore_range (always
        # 200 with the whole file) | error_once (one 503) | long_length (declares 1,000 more bytes than it sends)
        # | short_length (declares 1,000 fewer bytes than the file has)
        self.mode = mode
        self.stall_seconds = stall_seconds
        self.requests: list[str | None] = []  # the Range header of each request
        self.drops_left = 1 if mode == "drop_once" else 0


def _handler(state: ServerState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep test output clean
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path.endswith("/missing.tar.gz"):
                self.send_error(404, "Not Found")
                return
            header = self.headers.get("Range")
            state.requests.append(header)
            if state.mode == "endless":
                self._endless()
                return
            if state.mode == "error_once" and len(state.requests) == 1:
                self.send_error(503, "Service Unavailable")
                return
            if state.mode == "ignore_range":
                header = None
            start = int(header.split("=")[1].split("-")[0]) if header else 0
            if start >= len(state.payload):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(state.payload)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = state.payload[start:]
            self.send_response(206 if header else 200)
            if header:
                self.send_header("Content-Range", f"bytes {start}-{len(state.payload) - 1}/{len(state.payload)}")
            declared = len(body) + {"long_length": 1000, "short_length": -1000}.get(state.mode, 0)
            self.send_header("Content-Length", str(declared))
            self.end_headers()
            if state.mode == "stall":
                self.wfile.write(body[: len(body) // 4])
                self.wfile.flush()
                time.sleep(state.stall_seconds)
                return
            if state.drops_left > 0 or state.mode == "drop_always":
                state.drops_left -= 1
                self.wfile.write(body[: len(body) // 2])  # then hang up mid-file
                self.wfile.flush()
                return
            self.wfile.write(body)

        def _endless(self) -> None:
            self.send_response(200)
            self.end_headers()  # no Content-Length: the body ends when the connection does, here never
            chunk = b"\0" * 65536
            try:
                while True:
                    self.wfile.write(chunk)
            except OSError:  # the client hung up
                pass

    return Handler


@contextmanager
def serve(state: ServerState) -> Iterator[str]:
    """Yields the base URL; the server stops when the block ends."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()

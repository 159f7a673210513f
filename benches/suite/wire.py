"""HTTP/1.1 on raw sockets: the smallest client, so the client costs little.

The request bytes, an incremental response parser, one keep-alive connection
for sequential requests, and waiting for a server to answer 200.
"""

from __future__ import annotations

import re
import socket
import subprocess
import time

from .config import BODY, HOST


def http_request(path: str, credential: str, body: bytes = BODY) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\ncontent-type: application/json\r\n"
        f"x-api-key: {credential}\r\nanthropic-version: 2023-06-01\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body


class ResponseParser:
    """Incremental HTTP/1.1 response framing (Content-Length or chunked), body discarded."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.status: int | None = None
        self.chunked = False
        self.remaining = 0  # body bytes (or chunk bytes + CRLF) still to come
        self.body_bytes = 0

    def feed(self, data: bytes) -> list[int]:
        """The statuses of the responses `data` completes."""
        self.buf += data
        done: list[int] = []
        while True:
            if self.status is None:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return done
                head = bytes(self.buf[:end]).lower()
                del self.buf[: end + 4]
                self.status = int(head[9:12])
                length = re.search(rb"\r\ncontent-length: *(\d+)", head)
                self.chunked = length is None and b"transfer-encoding: chunked" in head
                self.remaining = int(length[1]) if length else 0
            if self.remaining:
                take = min(self.remaining, len(self.buf))
                del self.buf[:take]
                self.remaining -= take
                self.body_bytes += take
                if self.remaining:
                    return done
            if self.chunked:
                line_end = self.buf.find(b"\r\n")
                if line_end < 0:
                    return done
                size = int(bytes(self.buf[:line_end]).split(b";")[0], 16)
                if size == 0:
                    if len(self.buf) < line_end + 4:  # the empty trailer section
                        return done
                    del self.buf[: line_end + 4]
                else:
                    del self.buf[: line_end + 2]
                    self.remaining = size + 2
                    continue
            done.append(self.status)
            self.status = None


class Connection:
    """One keep-alive connection for sequential requests: status, first byte and total time."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.parser = ResponseParser()

    def request(self, raw: bytes) -> tuple[int, float, float]:
        start = time.perf_counter()
        self.sock.sendall(raw)
        first = None
        while True:
            data = self.sock.recv(262144)
            if not data:
                raise ConnectionError("the server closed the connection")
            first = first or time.perf_counter()
            statuses = self.parser.feed(data)
            if statuses:
                return statuses[0], first - start, time.perf_counter() - start

    def close(self) -> None:
        self.sock.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_ready(
    port: int, path: str, credential: str, proc: subprocess.Popen[str], timeout: float = 60.0
) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            conn = Connection(port)
            try:
                status, _, _ = conn.request(http_request(path, credential))
            finally:
                conn.close()
            if status == 200:
                return
            last = f"status {status}"
        except OSError as exc:
            last = exc
        time.sleep(0.1)
    raise RuntimeError(f"{proc.args} not ready on port {port}: {last}")

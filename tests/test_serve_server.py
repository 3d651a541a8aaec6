"""The server on a real socket (serve/server.py): slow request heads are timed out, a connection cap refuses
with an immediate 503, normal requests keep working meanwhile, the open-file limit is raised, and
resource-exhaustion logs are rate-limited. A trivial ASGI app stands in for nanoseek's: these are properties
of the connection handling, not of the routes. Timeouts are a fraction of a second so the tests take seconds.
"""

import errno
import json
import logging
import resource
import socket
import time

import httpx
import pytest

from nanoseek.serve.server import RateLimitedLog, ServerLimits, raise_open_file_limit
from test_serve import _Server

PARTIAL_HEAD = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
OK = b'{"status":"ok"}'


async def _ok_app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(OK))]})
    await send({"type": "http.response.body", "body": OK})


def _read_ok(s: socket.socket) -> None:
    """Read one whole 200 response from `_ok_app`."""
    s.settimeout(2)
    data = b""
    while not data.endswith(OK):
        part = s.recv(65536)
        assert part, data
        data += part
    assert data.startswith(b"HTTP/1.1 200 "), data


class _Running(_Server):
    """`_ok_app` behind nanoseek's own server with `limits`, and raw sockets to it."""

    def __init__(self, limits: ServerLimits):
        super().__init__(_ok_app, limits=limits)

    def connect(self, first_bytes: bytes = b"") -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        if first_bytes:
            s.sendall(first_bytes)
        return s


@pytest.fixture
def running(request):
    r = _Running(request.param)
    yield r
    r.stop()


def _read_until_closed(s: socket.socket, timeout: float) -> tuple[bytes, float | None]:
    """What the server sent before closing, and when it closed (None: still open after `timeout`)."""
    start = time.monotonic()
    s.settimeout(0.05)
    data = b""
    while time.monotonic() - start < timeout:
        try:
            part = s.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return data, time.monotonic() - start
        if not part:
            return data, time.monotonic() - start
        data += part
    return data, None


@pytest.mark.parametrize("running", [ServerLimits(header_timeout_s=0.5, idle_timeout_s=5)], indirect=True)
def test_slow_request_heads_are_timed_out_while_others_are_served(running):
    """Slowloris: 300 of 300 connections that never finished their headers were still open after 60 s."""
    slow = [running.connect(PARTIAL_HEAD) for _ in range(20)]
    silent = [running.connect() for _ in range(5)]            # connected, never sent a byte
    opened = time.monotonic()
    with httpx.Client(timeout=2) as c:                        # meanwhile a normal client is served
        for _ in range(3):
            assert c.get(running.url + "/health").status_code == 200
    for s in slow + silent:
        data, closed_after = _read_until_closed(s, timeout=max(0.1, opened + 1.5 - time.monotonic()))
        assert closed_after is not None, "the server kept a connection whose head never came"
        if s in slow:      # a partial head is told why
            assert data.startswith(b"HTTP/1.1 408 "), data[:100]
            assert json.loads(data.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
        else:
            assert data == b""
        s.close()
    assert time.monotonic() - opened < 2.0


@pytest.mark.parametrize("running", [ServerLimits(header_timeout_s=0.5, idle_timeout_s=5)], indirect=True)
def test_one_byte_after_a_response_does_not_hold_a_kept_alive_connection(running):
    """uvicorn's keep-alive timer stops at the first byte of the next request; the head timer then runs."""
    s = running.connect(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    _read_ok(s)
    s.sendall(b"G")
    data, closed_after = _read_until_closed(s, timeout=1.5)
    assert closed_after is not None and data.startswith(b"HTTP/1.1 408 ")
    s.close()


@pytest.mark.parametrize("running", [ServerLimits(header_timeout_s=0.5, idle_timeout_s=5)], indirect=True)
def test_a_body_finished_after_its_response_does_not_hold_the_connection(running):
    """The app answered before reading the body; the body's last bytes then arrive and the connection
    waits for a next request with no timer at all in uvicorn."""
    s = running.connect(b"POST /health HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n\r\n")
    _read_ok(s)
    s.sendall(b"abcde")
    data, closed_after = _read_until_closed(s, timeout=1.5)
    assert closed_after is not None and data == b""
    s.close()


@pytest.mark.parametrize("running", [ServerLimits(header_timeout_s=5, idle_timeout_s=0.3)], indirect=True)
def test_idle_kept_alive_connection_is_closed(running):
    s = running.connect(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    _read_ok(s)
    data, closed_after = _read_until_closed(s, timeout=1.5)
    assert data == b"" and closed_after is not None and closed_after < 1.0
    s.close()


@pytest.mark.parametrize("running", [ServerLimits(header_timeout_s=5, max_connections=5)], indirect=True)
def test_connection_cap_refuses_at_once_with_503(running):
    """Past the cap a new connection gets a 503 before it sends anything (uvicorn's own limit_concurrency is
    checked only after a full head, so slow heads were never refused)."""
    held = [running.connect(PARTIAL_HEAD) for _ in range(5)]
    time.sleep(0.1)
    t = time.monotonic()
    refused = running.connect()
    data, closed_after = _read_until_closed(refused, timeout=2)
    assert closed_after is not None and time.monotonic() - t < 1.0
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ") and b"connection: close" in head.lower()
    assert json.loads(body)["error"]["code"] == "server_is_overloaded"
    # A client that sends its request at once still reads the 503, not a reset.
    with httpx.Client(timeout=2) as c:
        r = c.get(running.url + "/health")
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable_error"
    for s in held:
        s.close()
    deadline = time.monotonic() + 2
    while True:        # the held slots free as the server sees them close
        r = httpx.get(running.url + "/health", timeout=2)
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert r.status_code == 200


def test_connection_cap_stays_below_the_open_file_limit():
    limits = ServerLimits(max_connections=1000, fd_reserve=128)
    assert limits.connection_cap(20000) == 1000
    assert limits.connection_cap(1024) == 896
    with pytest.raises(ValueError):
        ServerLimits(header_timeout_s=0)


def test_open_file_limit_is_raised_to_the_hard_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard < 64:
        pytest.skip(f"hard open-file limit {hard}")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 64), hard))
        assert raise_open_file_limit() == hard
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _record(name: str, exc: BaseException | None = None, msg: str = "socket.accept() out of system resource"):
    return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, None,
                             (type(exc), exc, None) if exc else None)


def test_resource_exhaustion_logs_are_rate_limited():
    """At the open-file limit the accept loop and every request log a traceback; 257 MB were written in a
    minute. One per kind per interval gets through, and the next says how many were held back."""
    now = [0.0]
    f = RateLimitedLog(every_s=10, clock=lambda: now[0])
    emfile = OSError(errno.EMFILE, "Too many open files")
    passed = [f.filter(_record("asyncio", emfile)) for _ in range(1000)]
    assert passed.count(True) == 1
    assert f.filter(_record("asyncio", OSError(errno.ENFILE, "File table overflow")))   # another kind
    assert f.filter(_record("asyncio", None, msg="something else"))                      # not throttled
    assert f.filter(_record("asyncio", ValueError("x"), msg="other error"))
    wrapped = RuntimeError("request failed")
    wrapped.__cause__ = emfile
    assert not f.filter(_record("asyncio", wrapped, msg="Exception in callback"))        # found via cause
    now[0] = 10.5
    rec = _record("asyncio", emfile)
    assert f.filter(rec)
    assert "1000 more like this" in rec.getMessage()

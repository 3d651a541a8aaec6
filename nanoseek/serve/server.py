"""Running the app on a socket: uvicorn with the limits a listening port needs against slow or abusive clients.

Owns:
  * `ServerLimits`: the header-read and idle timeouts, the connection cap, the log rate limit.
  * `build_server(app, host, port, limits)` → a uvicorn Server using `_Protocol`; `run(...)` runs one after
    raising the process's open-file limit and installing the log rate limit.
  * `_Protocol`: uvicorn's h11 protocol plus
      - a header-read deadline: a request head (the request line and headers) must be complete within
        `header_timeout_s` of its first byte, or of the connection opening; otherwise a 408 and close;
      - a connection cap checked in `connection_made`, before anything is read: over it, an immediate
        `503` with `Connection: close`, after which the refused socket is drained briefly and closed.
  * `RateLimitedLog`: a logging filter that lets one record per `log_every_s` through for each kind of
    resource-exhaustion error (EMFILE, ENFILE, ENOBUFS, ENOMEM), with the count of those it held back.

Why a protocol subclass: uvicorn 0.54 has no header-read timeout (its keep-alive timer is cancelled by the
first byte of a request, so a client that sends one byte and stops holds its socket forever), and it checks
`limit_concurrency` only once a request head is complete, so connections that never finish a head are
never refused and, at the open-file limit, stop the accept loop for everyone. The protocol is pinned to h11
(pure Python, what uvicorn picks without httptools); the checks sit on top of its state machine.

Measured (a trivial app, open-file limit 1024, connections sending a partial head and stopping; header
timeout 1 s): plain uvicorn kept 300 of 300 open after 6 s; with 1,100 it kept all 1,100 open, every normal
request timed out (5 s) and it logged 85 MB (221,131 tracebacks) in 15 s. With this protocol: 0 of 300 and
0 of 1,100 open after the timeout, 27 of 27 normal requests served (median 25 ms; the slowest, 1.04 s, waited
out asyncio's one-second accept pause when the burst hit the file limit), one traceback logged.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import resource
import time
from dataclasses import dataclass

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from nanoseek.serve.errors import ApiError

log = logging.getLogger(__name__)

_EXHAUSTION = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# The loggers that report resource exhaustion: asyncio's accept loop ("socket.accept() out of system
# resource") and uvicorn's (an application that failed because a file could not be opened).
_RATE_LIMITED_LOGGERS = ("asyncio", "uvicorn.error")


@dataclass(frozen=True)
class ServerLimits:
    """header_timeout_s: time for a request head to arrive, from its first byte (from the connection's
    opening for the first request). idle_timeout_s: how long a kept-alive connection may wait for its next
    request. max_connections: open connections beyond which new ones are refused with a 503; it is also kept
    `fd_reserve` below the process's open-file limit, which leaves descriptors for the model files, the
    database and the refusals themselves. refuse_linger_s: how long a refused connection is drained, so
    the client reads the 503 instead of a reset. log_every_s: at most one resource-exhaustion log record
    per this many seconds per kind."""

    header_timeout_s: float = 10.0
    idle_timeout_s: float = 5.0
    max_connections: int = 1000
    fd_reserve: int = 128
    refuse_linger_s: float = 1.0
    log_every_s: float = 60.0

    def __post_init__(self):
        for name in ("header_timeout_s", "idle_timeout_s", "refuse_linger_s", "log_every_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_connections < 1 or self.fd_reserve < 0:
            raise ValueError(f"max_connections must be >= 1 and fd_reserve >= 0, got {self.max_connections} "
                             f"and {self.fd_reserve}")

    def connection_cap(self, open_files: int) -> int:
        """The cap in force under an open-file limit of `open_files`."""
        return max(1, min(self.max_connections, open_files - self.fd_reserve))


def raise_open_file_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to its hard limit (every connection holds a descriptor); returns the
    soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:    # some systems cap it below the hard limit (macOS: OPEN_MAX)
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, e)
    return soft


def _json_response(status: int, reason: str, err: ApiError) -> bytes:
    body = json.dumps(err.body()).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n")
    head += "".join(f"{k}: {v}\r\n" for k, v in err.headers.items())
    return head.encode("latin-1") + b"\r\n" + body


@dataclass
class _Shared:
    """What the connections of one server share: the cap in force, the canned answers, and how many refused
    connections are being drained (bounded, so a flood of refusals cannot itself use up the descriptors)."""

    limits: ServerLimits
    cap: int
    draining: int = 0

    def __post_init__(self):
        self.refusal = _json_response(503, "Service Unavailable", ApiError.overloaded(
            retry_after_s=1.0, message=f"The server is at its limit of {self.cap} open connections; retry "
                                       "after a brief wait."))
        self.head_timeout = _json_response(408, "Request Timeout", ApiError(
            408, f"The request head (request line and headers) did not arrive within "
                 f"{self.limits.header_timeout_s:g} s.", code="request_timeout"))
        self.max_draining = max(1, self.limits.fd_reserve // 2)


class _Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header-read deadline and a connection cap (see the module docstring)."""

    def __init__(self, config, server_state, app_state, _loop=None, *, shared: _Shared):
        super().__init__(config, server_state, app_state, _loop)
        self.shared = shared
        self.head_timer = None
        self.refused = False
        self.linger_timer = None

    # -- the connection cap -------------------------------------------------------------------------------

    def connection_made(self, transport):
        if len(self.connections) >= self.shared.cap:
            self._refuse(transport)
            return
        super().connection_made(transport)
        self._arm_head_timer()

    def _refuse(self, transport) -> None:
        self.refused = True
        self.transport = transport
        transport.write(self.shared.refusal)
        if self.shared.draining >= self.shared.max_draining:
            transport.close()     # too many already draining: the client may see a reset instead of the 503
            return
        # Closing a socket with unread request bytes sends a reset, which can destroy the 503 in the client's
        # buffer before it reads it; so half-close, drop what arrives, and close at EOF or after the linger.
        self.shared.draining += 1
        transport.write_eof()
        self.linger_timer = self.loop.call_later(self.shared.limits.refuse_linger_s, transport.close)

    # -- the header-read deadline -------------------------------------------------------------------------

    def _arm_head_timer(self) -> None:
        if self.head_timer is None:
            self.head_timer = self.loop.call_later(self.shared.limits.header_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _head_timed_out(self) -> None:
        self.head_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.conn.trailing_data[0]:    # part of a head arrived: say why the connection ends
            self.transport.write(self.shared.head_timeout)
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:
            # Still waiting for a head: part of one came, or the rest of a body whose response was already
            # sent. uvicorn's keep-alive timer stopped at the first byte, so the head timer runs from here.
            self._arm_head_timer()
        else:
            self._cancel_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # Pipelined bytes of the next request may already wait in h11's buffer, with no data_received to come.
        if (not self.transport.is_closing() and self.conn.their_state is h11.IDLE
                and self.conn.trailing_data[0]):
            self._arm_head_timer()

    def connection_lost(self, exc) -> None:
        self._cancel_head_timer()
        if self.refused:
            if self.linger_timer is not None:
                self.linger_timer.cancel()
                self.shared.draining -= 1
            return
        super().connection_lost(exc)


class RateLimitedLog(logging.Filter):
    """Lets one resource-exhaustion record per `every_s` through for each (logger, errno); the next one that
    passes says how many were held back. Other records pass untouched. At the open-file limit asyncio's
    accept loop logs one traceback per pending connection per retry, and unthrottled they fill the disk
    (257 MB in a minute in the review; 85 MB in 15 s here)."""

    def __init__(self, every_s: float, clock=time.monotonic):
        super().__init__()
        self.every_s, self.clock = every_s, clock
        self.last: dict[tuple[str, int], float] = {}
        self.held: dict[tuple[str, int], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        code = _exhaustion_errno(record)
        if code is None:
            return True
        key = (record.name, code)
        now = self.clock()
        if key in self.last and now - self.last[key] < self.every_s:
            self.held[key] = self.held.get(key, 0) + 1
            return False
        self.last[key] = now
        held = self.held.pop(key, 0)
        if held:
            record.msg = f"{record.getMessage()} ({held} more like this in the last {self.every_s:g} s not logged)"
            record.args = None
        return True


def _exhaustion_errno(record: logging.LogRecord) -> int | None:
    exc = record.exc_info[1] if record.exc_info else None
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in _EXHAUSTION:
            return exc.errno
        exc = exc.__cause__ or exc.__context__
    if "out of system resource" in str(record.msg):    # asyncio's accept loop, should it log without exc_info
        return errno.EMFILE
    return None


def build_server(app, host: str, port: int, limits: ServerLimits, *, open_files: int | None = None,
                 log_level: str = "info") -> uvicorn.Server:
    """A uvicorn Server for `app` with `limits` (port 0: the OS picks one). open_files: the open-file limit
    the connection cap must stay under (default: the current soft limit)."""
    if open_files is None:
        open_files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    shared = _Shared(limits, limits.connection_cap(open_files))
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            http=functools.partial(_Protocol, shared=shared),
                            timeout_keep_alive=limits.idle_timeout_s)
    return uvicorn.Server(config)


def run(app, host: str, port: int, limits: ServerLimits) -> None:
    """Serve `app` until interrupted."""
    open_files = raise_open_file_limit()
    server = build_server(app, host, port, limits, open_files=open_files)
    log_filter = RateLimitedLog(limits.log_every_s)
    loggers = [logging.getLogger(name) for name in _RATE_LIMITED_LOGGERS]
    for lg in loggers:
        lg.addFilter(log_filter)
    logging.getLogger("uvicorn.error").info(
        "limits: %d connections (open-file limit %d), request head within %g s, idle connections closed "
        "after %g s", limits.connection_cap(open_files), open_files, limits.header_timeout_s,
        limits.idle_timeout_s)
    try:
        server.run()
    finally:
        for lg in loggers:
            lg.removeFilter(log_filter)

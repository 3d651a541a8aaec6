"""The app's outermost layer: the checks every HTTP request passes before any route sees it (pure ASGI, so
streaming responses and disconnects pass through untouched).

Owns:
  * the body limit (`GuardConfig.max_body_bytes`, 413). A declared Content-Length over it is refused at once;
    a body without one (`Transfer-Encoding: chunked`) is counted as it streams in, and the request is refused
    as soon as the count passes the limit, so the server never holds more than the limit plus one chunk.
  * the loopback Host check (400): an open loopback server answers only to loopback names, so a page on
    another origin cannot reach it through DNS rebinding.
  * the cross-site check for an open server (403): with no key to ask for, a state-changing request from a
    browser page on another origin is refused (`Origin` / `Sec-Fetch-Site`).
  * the web app's pre-authentication (`web_owner`): /app/api/ authenticates before its body is parsed, so a bad
    key is a 401 even when the body is also bad, as on the API routes.
  * `is_loopback_host`: the one rule for what "loopback" means (localhost, 127.0.0.0/8, ::1), which
    `nanoseek serve` also uses to decide whether it may run without keys.

Every refusal is an OpenAI error body (serve/errors.py) and closes the connection: the body is left unread,
and closing is the cheapest way to drop whatever of it is still on the way.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers

from nanoseek.serve.errors import ApiError, dialect_of, error_response

# A 128k-token prompt is well under 1 MB of JSON; the limit only stops a client from making the server
# buffer arbitrary amounts before any check runs.
MAX_BODY_BYTES = 16 * 2**20

_STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_PORT = re.compile(r"[0-9]{1,5}")
_DIGITS = re.compile(r"[0-9]+")
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class GuardConfig:
    """max_body_bytes: the largest request body accepted, declared or streamed. loopback_only: accept only
    loopback Host names (any port); `nanoseek serve` sets it when it runs open on loopback."""

    max_body_bytes: int = MAX_BODY_BYTES
    loopback_only: bool = False

    def __post_init__(self):
        if self.max_body_bytes < 0:
            raise ValueError(f"max_body_bytes must be >= 0, got {self.max_body_bytes}")


def is_loopback_host(name: str) -> bool:
    """Whether a host name or IP literal (no brackets, no port) can only mean this machine."""
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def split_host(value: str) -> tuple[str, int | None] | None:
    """A Host header value as (name, port or None): "[::1]:8000" → ("::1", 8000), "localhost" →
    ("localhost", None). None when it is malformed (a bare IPv6 literal, a bad port)."""
    if value.startswith("["):
        name, closed, rest = value[1:].partition("]")
        if not closed or rest[:1] not in ("", ":"):
            return None
        has_port, port = rest[:1], rest[1:]
    elif value.count(":") > 1:
        return None
    else:
        name, has_port, port = value.partition(":")
    if not name or (has_port and not _PORT.fullmatch(port)):
        return None
    return name, int(port) if has_port else None


class BodyTooLarge(ApiError):
    """Raised from `receive` once a streamed body passes the limit: whatever catches it on the way out (a
    route, FastAPI's body parser) still makes a 413 of it, and the guard answers 413 in any case."""

    def __init__(self, limit: int):
        super().__init__(413, f"Request body too large: the limit is {limit} bytes.", code="request_too_large")


class Guard:
    """The checks, in order: Host (400), cross-site (403), declared length (413), the web app's owner (401);
    then the app runs with a `receive` that counts the body (413 past the limit).

    web_owner: the web router's `owner(request)`; its answer is left in `scope["state"]["web_owner"]`.
    is_open: whether the server currently asks for no key (no key exists and none is required); awaited
    only for a request that looks cross-site, so ordinary requests cost no database read."""

    def __init__(self, app, *, config: GuardConfig, web_owner: Callable[[Request], Awaitable[object]],
                 is_open: Callable[[], Awaitable[bool]]):
        self.app, self.config, self.web_owner, self.is_open = app, config, web_owner, is_open

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        try:
            self._check_host(headers)
            if scope["method"] in _STATE_CHANGING and (why := _cross_site(headers)) and await self.is_open():
                raise ApiError(403, f"Cross-site request refused: {why}. This server runs without API keys, so "
                                    "it accepts state-changing requests only from its own pages.",
                               code="cross_site_request")
            length = headers.get("content-length")
            if length is not None and (not _DIGITS.fullmatch(length) or int(length) > self.config.max_body_bytes):
                raise BodyTooLarge(self.config.max_body_bytes)
            if scope["path"].startswith("/app/api/"):
                scope.setdefault("state", {})["web_owner"] = await self.web_owner(Request(scope))
        except Exception as e:
            return await _refuse(e, scope, receive, send)
        body = _CountedBody(receive, send, self.config.max_body_bytes)
        try:
            await self.app(scope, body.receive, body.send)
        except Exception:
            if not body.exceeded:
                raise
        if body.exceeded and not body.started:
            await _refuse(BodyTooLarge(self.config.max_body_bytes), scope, receive, send)

    def _check_host(self, headers: Headers) -> None:
        if not self.config.loopback_only:
            return
        parsed = split_host(headers.get("host", ""))
        if parsed is None or not is_loopback_host(parsed[0]):
            raise ApiError(400, "Invalid Host header: this server answers only to loopback names (localhost, "
                                "127.0.0.1, [::1]).", code="invalid_host")


def _cross_site(headers: Headers) -> str | None:
    """Why a request comes from a browser page on another origin, or None. Browsers send Sec-Fetch-Site on
    every request and Origin on every state-changing one; clients that are not browsers (curl, the SDKs)
    send neither and pass. "same-site" is refused too: for a loopback server that is a page served from
    another port of this machine, which is as foreign as any other site."""
    site = headers.get("sec-fetch-site")
    if site is not None and site.lower() not in ("same-origin", "none"):
        return f"Sec-Fetch-Site is {site!r}"
    origin = headers.get("origin")
    if origin is None:
        return None
    if not _same_origin(origin, headers.get("host", "")):
        return f"Origin {origin!r} is not this server"
    return None


def _same_origin(origin: str, host: str) -> bool:
    """Whether an Origin header names the server the request was sent to (its Host). "null" (a sandboxed
    frame, a file:// page, a redirect across origins) never does."""
    try:
        o = urlsplit(origin)
        o_port = o.port
    except ValueError:
        return False
    if o.scheme not in _DEFAULT_PORTS or not o.hostname or o.path or o.query or o.username:
        return False
    parsed = split_host(host)
    if parsed is None:
        return False
    name, port = parsed
    if o.hostname.lower() != name.lower():
        return False
    # A Host without a port means the default one; the Origin's scheme says which (a loopback server may sit
    # behind a local TLS proxy, so http and https are both its own).
    return (o_port or _DEFAULT_PORTS[o.scheme]) == (port or _DEFAULT_PORTS[o.scheme])


class _CountedBody:
    """`receive` and `send` for the app: counts the request body as it arrives. Past the limit, before the
    response has started, `receive` raises BodyTooLarge and whatever the app then sends is dropped (FastAPI's
    body parser, for one, turns any read error into its own 400), so the guard's 413 goes out instead. After
    the response has started the app is told the client is gone: a status line cannot be taken back."""

    def __init__(self, receive, send, limit: int):
        self._receive, self._send, self.limit = receive, send, limit
        self.count = 0
        self.exceeded = False
        self.started = False

    async def receive(self):
        if self.exceeded:     # nothing more is read from the client once the limit is passed
            return {"type": "http.disconnect"}
        message = await self._receive()
        if message["type"] == "http.request":
            self.count += len(message.get("body", b""))
            if self.count > self.limit:
                self.exceeded = True
                if self.started:
                    return {"type": "http.disconnect"}
                raise BodyTooLarge(self.limit)
        return message

    async def send(self, message):
        if self.exceeded and not self.started:
            return
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)


async def _refuse(err: BaseException, scope, receive, send) -> None:
    status, headers, body = error_response(err, dialect_of(scope["path"]))
    await JSONResponse(body, status_code=status, headers={**headers, "Connection": "close"})(scope, receive, send)

"""The checks every request passes before a route sees it (serve/guard.py): the body limit on streamed bodies,
the loopback Host check, the cross-site check of an open server, and /docs being off by default.

Most run in-process through httpx's ASGI transport, which feeds a request body to the app chunk by chunk as
the app asks for it, so a test can count how much of a body the server read. One real bind to ::1 checks
the Host check on an IPv6 loopback server.
"""

import asyncio
import json
import socket
import time

import httpx
import pytest

from nanoseek.cli import serve_access
from nanoseek.serve.app import create_app
from nanoseek.serve.guard import MAX_BODY_BYTES, Guard, GuardConfig, split_host
from nanoseek.serve.server import ServerLimits
from nanoseek.serve.store import Store
from test_serve import _Server, stopping
from test_web import tiny_served

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


@pytest.fixture(scope="module")
def models():
    served = {"tiny": tiny_served("tiny")}
    yield from stopping(served)


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "data") as st:
        yield st


def _send(app, method, path, *, base_url="http://127.0.0.1:8000", **kw) -> httpx.Response:
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base_url) as c:
            return await c.request(method, path, **kw)
    return asyncio.run(go())


class _Chunks:
    """A request body of `n` chunks of `size` bytes, sent without Content-Length (Transfer-Encoding: chunked);
    `sent` counts the chunks the server asked for."""

    def __init__(self, n: int, size: int):
        self.n, self.size, self.sent = n, size, 0

    async def __aiter__(self):
        for _ in range(self.n):
            self.sent += 1
            yield b"x" * self.size


def _error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and err["type"], err
    return err


# -- body limit ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method,path", [("POST", "/v1/chat/completions"), ("POST", "/v1/tokenize"),
                                         ("POST", "/app/api/conversations"), ("POST", "/app/api/render")])
def test_chunked_body_over_the_limit_is_413_before_it_is_read(models, store, method, path):
    """A body with no Content-Length used to be read whole (1 GiB was accepted). The default limit now holds
    for a streamed body too, on every route, and the server stops reading one chunk past it."""
    app = create_app(models, store, require_auth=False)
    body = _Chunks(n=2 * MAX_BODY_BYTES // 2**20, size=2**20)       # twice the limit, 1 MiB at a time
    r = _send(app, method, path, content=body)
    _error(r, 413, "request_too_large")
    assert r.headers["connection"] == "close"
    assert body.sent <= MAX_BODY_BYTES // 2**20 + 1, f"read {body.sent} MiB of a {body.n} MiB body"


def test_body_limit_is_configurable_and_a_body_within_it_passes(models, store):
    app = create_app(models, store, require_auth=False, guard=GuardConfig(max_body_bytes=4096))
    big = json.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}).encode()
    _error(_send(app, "POST", "/v1/chat/completions", content=_Chunks(8, 1024)), 413, "request_too_large")
    _error(_send(app, "POST", "/v1/chat/completions", content=big), 413, "request_too_large")   # declared
    small = json.dumps(CHAT).encode()

    async def in_pieces():
        for i in range(0, len(small), 7):
            yield small[i:i + 7]
    r = _send(app, "POST", "/v1/chat/completions", content=in_pieces())
    assert r.status_code == 200, r.text


def test_body_over_the_limit_after_the_response_started_reads_as_a_disconnect():
    """A status line cannot be taken back: an app that answers first and reads after is told the client is
    gone once the body passes the limit, and nothing more is read."""
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        while True:
            message = await receive()
            if message["type"] == "http.disconnect" or not message.get("more_body"):
                break
        await send({"type": "http.response.body", "body": message["type"].encode()})

    async def nobody(request):
        return None

    async def is_open():
        return True

    guarded = Guard(app, config=GuardConfig(max_body_bytes=4096), web_owner=nobody, is_open=is_open)
    body = _Chunks(n=100, size=1024)
    r = _send(guarded, "POST", "/upload", content=body)
    assert (r.status_code, r.text) == (200, "http.disconnect")
    assert body.sent <= 5


def test_chunked_body_over_the_limit_on_a_real_socket(models, store):
    """Through uvicorn: the client gets the 413 while it is still sending, and the connection closes."""
    TOTAL = 32 * 2**20
    app = create_app(models, store, require_auth=False, guard=GuardConfig(max_body_bytes=64 * 1024))
    server = _Server(app, limits=ServerLimits())
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
            chunk = b"%x\r\n%s\r\n" % (16384, b"x" * 16384)
            chunks = [chunk + b"0\r\n\r\n"] + [chunk] * (TOTAL // 16384 - 1)   # popped from the end
            sent, pending = 0, b""
            s.setblocking(False)
            while chunks or pending:     # far more than the server should read
                pending = pending or chunks.pop()
                try:
                    n = s.send(pending)
                    sent, pending = sent + n, pending[n:]
                except BlockingIOError:
                    time.sleep(0.001)
                except (BrokenPipeError, ConnectionResetError):
                    break
                try:
                    if s.recv(1, socket.MSG_PEEK):
                        break
                except BlockingIOError:
                    pass
            s.setblocking(True)
            reply = b""
            while b"\r\n\r\n" not in reply or not reply.endswith(b"}"):
                try:
                    part = s.recv(65536)
                except ConnectionResetError:
                    break
                if not part:
                    break
                reply += part
        assert reply.startswith(b"HTTP/1.1 413 "), reply[:200]
        assert b'"request_too_large"' in reply
        assert chunks, f"sent all {sent} bytes before the server answered"
    finally:
        server.stop()


# -- Host check ------------------------------------------------------------------------------------------------


def test_host_header_parsing():
    assert split_host("[::1]:8000") == ("::1", 8000)
    assert split_host("[::1]") == ("::1", None)
    assert split_host("127.0.0.2:8000") == ("127.0.0.2", 8000)
    assert split_host("LocalHost") == ("LocalHost", None)
    for bad in ("::1", "[::1", "[::1]x", "localhost:", "localhost:80a", "", "a:1:2"):
        assert split_host(bad) is None, bad


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "127.0.0.2"])
def test_loopback_binds_run_open_with_the_host_check_on(host):
    """`--host ::1` used to turn the DNS-rebinding check off: every loopback address gets it."""
    assert serve_access(host) == (False, GuardConfig(loopback_only=True))


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.5", "example.com"])
def test_other_binds_require_keys(host):
    assert serve_access(host) == (True, GuardConfig(loopback_only=False))


@pytest.mark.parametrize("base", ["http://[::1]:8000", "http://127.0.0.1:8000", "http://127.0.0.2:8123",
                                  "http://localhost:8000", "http://localhost", "http://[::1]"])
def test_open_loopback_server_answers_loopback_host_names(models, store, base):
    app = create_app(models, store, require_auth=False, guard=GuardConfig(loopback_only=True))
    assert _send(app, "GET", "/app/api/conversations", base_url=base).status_code == 200
    assert _send(app, "POST", "/v1/chat/completions", base_url=base, json=CHAT).status_code == 200


@pytest.mark.parametrize("host", ["attacker.example:8000", "attacker.example", "[::2]:8000", "10.0.0.1:8000",
                                  "localhost.attacker.example", "127.0.0.1.nip.io:8000", "::1"])
def test_open_loopback_server_refuses_other_host_names(models, store, host):
    app = create_app(models, store, require_auth=False, guard=GuardConfig(loopback_only=True))
    r = _send(app, "GET", "/app/api/conversations", headers={"Host": host})
    _error(r, 400, "invalid_host")


def test_ipv6_loopback_server_checks_the_host_header(models, store):
    """A real bind to ::1 (the case that used to run unchecked): its own [::1]:port is accepted, a
    rebinding name is not."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 support in this Python")
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError as e:
        pytest.skip(f"cannot bind ::1 here: {e}")
    require_auth, guard = serve_access("::1")
    app = create_app(models, store, require_auth=require_auth, guard=guard)
    server = _Server(app, host="::1", limits=ServerLimits())
    url = server.url
    try:
        assert httpx.get(url + "/app/api/conversations", timeout=10).status_code == 200
        r = httpx.get(url + "/app/api/conversations", headers={"Host": "attacker.example"}, timeout=10)
        _error(r, 400, "invalid_host")
    finally:
        server.stop()


# -- cross-site requests to an open server ---------------------------------------------------------------------


@pytest.mark.parametrize("headers", [
    {"Origin": "http://evil.example"},
    {"Origin": "null"},
    {"Origin": "http://127.0.0.1:9999"},                  # another port of this machine is another origin
    {"Origin": "http://localhost:8000"},                  # not the name this page was loaded under
    {"Origin": "chrome-extension://abcdef"},
    {"Sec-Fetch-Site": "cross-site"},
    {"Sec-Fetch-Site": "same-site"},
    {"Origin": "http://127.0.0.1:8000", "Sec-Fetch-Site": "cross-site"},
])
def test_open_server_refuses_state_changing_requests_from_other_origins(models, store, headers):
    """A page on another origin used to run completions and create conversations on an open server."""
    app = create_app(models, store, require_auth=False, guard=GuardConfig(loopback_only=True))
    _error(_send(app, "POST", "/v1/chat/completions", json=CHAT, headers=headers), 403, "cross_site_request")
    _error(_send(app, "POST", "/app/api/conversations", json={}, headers=headers), 403, "cross_site_request")
    _error(_send(app, "DELETE", "/app/api/conversations/x", headers=headers), 403, "cross_site_request")
    assert store.any_keys() is False
    r = _send(app, "GET", "/app/api/conversations", headers=headers)   # reading needs CORS, which is off
    assert r.status_code == 200


@pytest.mark.parametrize("headers", [
    {},                                                     # curl, the SDKs
    {"Origin": "http://127.0.0.1:8000", "Sec-Fetch-Site": "same-origin"},
    {"Origin": "https://127.0.0.1:8000"},                  # behind a local TLS proxy
    {"Sec-Fetch-Site": "none"},                             # typed into the address bar
])
def test_open_server_accepts_its_own_pages_and_non_browser_clients(models, store, headers):
    app = create_app(models, store, require_auth=False, guard=GuardConfig(loopback_only=True))
    assert _send(app, "POST", "/v1/chat/completions", json=CHAT, headers=headers).status_code == 200
    assert _send(app, "POST", "/app/api/conversations", json={}, headers=headers).status_code == 201


def test_ipv6_page_origin_matches_its_host(models, store):
    app = create_app(models, store, require_auth=False, guard=GuardConfig(loopback_only=True))
    r = _send(app, "POST", "/app/api/conversations", json={}, base_url="http://[::1]:8000",
              headers={"Origin": "http://[::1]:8000"})
    assert r.status_code == 201, r.text


@pytest.mark.parametrize("require_auth", [False, True])
def test_cross_site_check_is_off_when_keys_are_required(models, store, require_auth):
    """With keys, a foreign page cannot know one (and CORS is off), so the Origin is not second-guessed:
    a browser extension holding a key keeps working."""
    _, secret = store.create_key("ext")
    app = create_app(models, store, require_auth=require_auth)
    headers = {"Origin": "chrome-extension://abcdef", "Authorization": f"Bearer {secret}"}
    assert _send(app, "POST", "/v1/chat/completions", json=CHAT, headers=headers).status_code == 200
    r = _send(app, "POST", "/v1/chat/completions", json=CHAT, headers={"Origin": "http://evil.example"})
    _error(r, 401, "invalid_api_key")


# -- /docs -----------------------------------------------------------------------------------------------------


def test_docs_are_off_by_default(models, store):
    """/docs and /redoc load their scripts from a CDN into the origin that keeps the web app's key."""
    app = create_app(models, store, require_auth=False)
    for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        assert _send(app, "GET", path).status_code == 404, path
    assert _send(app, "GET", "/openapi.json").json()["info"]["title"] == "nanoseek"
    on = create_app(models, store, require_auth=False, docs=True)
    assert "swagger-ui" in _send(on, "GET", "/docs").text

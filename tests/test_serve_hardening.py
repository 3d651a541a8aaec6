"""What a hostile client found in `nanoseek serve` (issue 13), each pinned by a test that failed before the fix.

Budgets and tokens-per-minute hold under parallel requests (reserved at admission), one key's cached prompts
are invisible to another's, a huge prompt is refused before any tokenizer runs and does not stall running
streams, the usage row is in the ledger before a response's last byte, and Markdown rendering is bounded and
kept off the engine's thread. Transport-level findings (body limit, slowloris, Host/Origin checks) are in
tests/test_serve_guard.py and tests/test_serve_server.py.
"""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from nanoseek.engine.prefix import block_hashes
from nanoseek.serve.app import create_app
from nanoseek.serve.limits import Hold, RateLimiter
from nanoseek.serve.render import RenderError, RenderWorker
from nanoseek.serve.store import PriceTable, Store
from test_chat import CHATML
from test_serve import _served, _Server, stopping

PROMPT = [{"role": "user", "content": "A private system prompt that nobody else should learn " * 4}]


@pytest.fixture(scope="module")
def models():
    served = {"tiny": _served("tiny", CHATML, max_batch=8),
              "slow": _served("slow", CHATML, slow_s=0.02, max_batch=4)}
    served["tiny"].prices = PriceTable(1000.0, 1000.0, 1000.0)   # $0.001 a token, cache hits too
    yield from stopping(served)


@pytest.fixture(scope="module")
def keyed(models, tmp_path_factory):
    with Store(tmp_path_factory.mktemp("hardening")) as st:
        s = _Server(create_app(models, st, require_auth=True, poll_s=0.05))
        yield s, st
        s.stop()


def _chat(url, key, body, timeout=60):
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=timeout,
                      headers={"Authorization": f"Bearer {key}"})


# ---------------------------------------------------------------------------------------------- finding 1


def test_parallel_requests_cannot_overspend_a_budget(keyed):
    """A budget for 5 worst cases, 50 parallel requests with an explicit max_tokens: at most 5 are served and
    the spend never passes the budget (before: 50 of 50 were served, 10.9x the budget)."""
    s, st = keyed
    prompt_tokens = httpx.post(s.url + "/v1/tokenize", json={"model": "tiny", "messages": HELLO},
                               headers={"Authorization": f"Bearer {_key(st, 'probe')}"}).json()["count"]
    worst = PriceTable(1000.0, 1000.0, 1000.0).cost(0, prompt_tokens, 8)
    key_id, secret = st.create_key("race", budget_usd=round(5 * worst, 9))
    body = {"model": "tiny", "messages": HELLO, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    with ThreadPoolExecutor(50) as pool:
        codes = [r.status_code for r in pool.map(lambda _: _chat(s.url, secret, body), range(50))]
    assert codes.count(200) == 5 and set(codes) == {200, 402}, codes
    spent = st.spent_usd(key_id)
    assert 0 < spent <= 5 * worst + 1e-9
    balance = httpx.get(s.url + "/user/balance", headers={"Authorization": f"Bearer {secret}"}).json()
    assert not balance["balance_infos"][0]["total_balance"].startswith("-")


def test_max_tokens_shrinks_to_the_budget(keyed):
    """A budget below the worst case shrinks max_tokens to what it covers: the reply ends with "length"."""
    s, st = keyed
    _, secret = st.create_key("thrifty", budget_usd=0.05)    # 50 tokens at $0.001
    r = _chat(s.url, secret, {"model": "tiny", "messages": HELLO, "temperature": 0, "ignore_eos": True,
                              "max_tokens": 200})
    assert r.status_code == 200, r.text
    u = r.json()["usage"]
    assert u["prompt_tokens"] + u["completion_tokens"] <= 50 and r.json()["choices"][0]["finish_reason"] == "length"


HELLO = [{"role": "user", "content": "Hello there"}]


def _key(st, name, **kw):
    return st.create_key(name, **kw)[1]


# ---------------------------------------------------------------------------------------------- finding 10


def test_limiter_room_follows_holds():
    t = [0.0]
    lim = RateLimiter(clock=lambda: t[0])
    h = lim.reserve("k", 10, 240, tpm=300)
    assert isinstance(h, Hold) and lim.room("k", 300) == 50
    assert lim.reserve("k", 10, 90, tpm=300) > 0      # the worst case is held: no room for 100 more
    lim.settle(h, 40)                                  # it used 40
    assert lim.room("k", 300) == 260
    t[0] = 61.0
    assert lim.room("k", 300) == 300 and lim.room("k", None) is None


def test_parallel_requests_stay_within_tpm(keyed):
    """tpm=300 and 20 parallel requests of max_tokens 40: what was admitted in the minute stays within 300
    tokens (before: completions were charged afterwards and 828 tokens went through)."""
    s, st = keyed
    _, secret = st.create_key("tpm", tpm=300)
    body = {"model": "tiny", "messages": HELLO, "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    with ThreadPoolExecutor(20) as pool:
        rs = list(pool.map(lambda _: _chat(s.url, secret, body), range(20)))
    ok = [r.json()["usage"] for r in rs if r.status_code == 200]
    assert ok and all(r.status_code in (200, 429) for r in rs)
    assert sum(u["total_tokens"] for u in ok) <= 300


# ---------------------------------------------------------------------------------------------- finding 2


def test_prefix_cache_salt_separates_namespaces():
    assert block_hashes(list(range(32)), 16) != block_hashes(list(range(32)), 16, b"a")
    assert block_hashes(list(range(32)), 16, b"a") == block_hashes(list(range(32)), 16, b"a")


def test_one_key_cannot_probe_another_keys_prompt(keyed):
    """Key B sending key A's exact prompt gets no cache hit (so neither usage nor latency tells B it guessed
    right); A's own repeat still hits."""
    s, st = keyed
    a, b = _key(st, "alice"), _key(st, "bob")
    body = {"model": "tiny", "messages": PROMPT, "max_tokens": 1}
    hit = lambda key: _chat(s.url, key, body).json()["usage"]["prompt_cache_hit_tokens"]  # noqa: E731
    assert hit(a) == 0
    assert hit(b) == 0
    assert hit(a) > 0


def test_prefix_isolation_can_be_turned_off(models, tmp_path):
    with Store(tmp_path) as st:
        s = _Server(create_app(models, st, require_auth=True, poll_s=0.05, isolate_prefix_cache=False))
        try:
            a, b = _key(st, "a"), _key(st, "b")
            body = {"model": "tiny", "messages": [{"role": "user", "content": "shared " * 10}], "max_tokens": 1}
            _chat(s.url, a, body)
            assert _chat(s.url, b, body).json()["usage"]["prompt_cache_hit_tokens"] > 0
        finally:
            s.stop()


# ---------------------------------------------------------------------------------------------- finding 3


def test_a_huge_prompt_is_refused_by_size_and_does_not_stall_streams(keyed):
    """15 MB of prompt is refused from its size alone, and a running stream keeps flowing meanwhile (before:
    tokenizing it on the event loop froze every stream and /health for 24–27 s)."""
    s, st = keyed
    secret = _key(st, "huge")
    gaps, stop = [], threading.Event()

    def stream():
        last = None
        with httpx.stream("POST", s.url + "/v1/chat/completions", timeout=60,
                          headers={"Authorization": f"Bearer {secret}"},
                          json={"model": "slow", "messages": HELLO, "max_tokens": 150, "ignore_eos": True,
                                "stream": True}) as r:
            for line in r.iter_lines():
                now = time.monotonic()
                if last is not None and line:
                    gaps.append(now - last)
                last = now
                if stop.is_set():
                    break
    t = threading.Thread(target=stream)
    t.start()
    time.sleep(0.5)
    huge = {"model": "slow", "messages": [{"role": "user", "content": "x" * 15_000_000}], "max_tokens": 1}
    started = time.monotonic()
    r = _chat(s.url, secret, huge)
    took = time.monotonic() - started
    tok = httpx.post(s.url + "/v1/tokenize", timeout=60, headers={"Authorization": f"Bearer {secret}"},
                     json={"model": "slow", "prompt": "y" * 15_000_000})
    stop.set()
    t.join(60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert tok.status_code == 400
    assert took < 5
    assert gaps and max(gaps) < 1.0, max(gaps)


def test_tokenize_obeys_the_budget(keyed):
    s, st = keyed
    secret = _key(st, "broke-tok", budget_usd=0)
    r = httpx.post(s.url + "/v1/tokenize", json={"model": "tiny", "prompt": "hi"},
                   headers={"Authorization": f"Bearer {secret}"})
    assert r.status_code == 402


# ---------------------------------------------------------------------------------------------- finding 9


def test_usage_is_in_the_ledger_before_the_last_chunk(keyed):
    """The ledger row is committed before [DONE] (stream) or the body (non-stream) goes out: read right at
    that moment, it is there (before: written by a fire-and-forget task after the response)."""
    s, st = keyed
    key_id, secret = st.create_key("ledger")
    body = {"model": "tiny", "messages": HELLO, "max_tokens": 5, "temperature": 0}
    _chat(s.url, secret, body)
    assert len(st.usage_rows(key_id)) == 1
    with httpx.stream("POST", s.url + "/v1/chat/completions", json={**body, "stream": True},
                      headers={"Authorization": f"Bearer {secret}"}, timeout=60) as r:
        for line in r.iter_lines():
            if line == "data: [DONE]":
                assert len(st.usage_rows(key_id)) == 2
                break
        else:
            pytest.fail("no [DONE]")


# ---------------------------------------------------------------------------------------------- finding 5


def test_render_runs_in_a_bounded_worker():
    w = RenderWorker(timeout_s=10)
    try:
        assert "<strong>b</strong>" in w.render(["**b**"])[0]
        with pytest.raises(RenderError, match="larger than"):
            RenderWorker(max_output=1000).render(["$x^2$ " * 2000])
        slow = RenderWorker(timeout_s=0.001)
        with pytest.raises(RenderError, match="longer than"):
            slow.render(["\\(a\\) " * 50000])
        assert slow._proc is None                     # killed; the next call starts a fresh one
        assert "<em>i</em>" in w.render(["*i*"])[0]
    finally:
        w.close()


def test_render_endpoint_is_rate_limited(models, tmp_path):
    with Store(tmp_path) as st:
        app = create_app(models, st, require_auth=False)
        from fastapi.testclient import TestClient
        c = TestClient(app)
        texts = ["word " * 20_000]                     # 100k characters a call; 2M a minute allowed
        codes = [c.post("/app/api/render", json={"texts": texts}).status_code for _ in range(22)]
        assert codes[:20] == [200] * 20 and codes[-1] == 429, codes
        assert json.loads(c.post("/app/api/render", json={"texts": texts}).text)["error"]["type"]

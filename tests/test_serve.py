"""The HTTP server end to end: a tiny random model behind uvicorn, driven by the official `openai` SDK.

The model is random, so the tests check the contract (shapes, usage arithmetic, stops, seeds, logprobs,
prefix-cache accounting, errors, auth, cancellation), never what the text says. A byte-level tokenizer keeps
every generated token one byte. `_Server`, `_served` and `scrape` are shared with the other server tests.
"""

import json
import threading
import time

import httpx
import openai
import pytest
import torch
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from nanoseek.engine.scheduler import Scheduler
from nanoseek.models import build_model
from nanoseek.models.config import DenseConfig
from nanoseek.serve.app import ServedModel, create_app
from nanoseek.serve.server import ServerLimits, build_server
from nanoseek.serve.store import Store
from test_chat import CHATML, R1_LIKE, make_tokenizer

CONTEXT = 256


def _model(vocab: int, slow_s: float = 0.0):
    torch.manual_seed(0)
    cfg = DenseConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT,
                      eos_token_id=None)
    m = build_model(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(std=0.3)
    if slow_s:   # a model slow enough that a client can hang up mid-stream
        fast = m.forward

        def forward(*args, **kw):
            time.sleep(slow_s)
            return fast(*args, **kw)
        m.forward = forward
    return m.eval()


def _broken(m):
    """The model fails on its first decode step (after the prompt, so a stream has begun)."""
    prefill = m.forward

    def forward(ids, *args, **kw):
        if ids.shape[1] == 1 and not kw.get("last_only"):
            raise RuntimeError("simulated device failure")
        return prefill(ids, *args, **kw)
    m.forward = forward
    return m


def _served(name, template, reasoning=False, slow_s=0.0, max_batch=4, broken=False, context=CONTEXT, max_queue=256):
    tok = make_tokenizer(template)
    model = _model(len(tok), slow_s)
    sched = Scheduler(_broken(model) if broken else model, tok, max_batch=max_batch, max_len=context,
                      max_queue=max_queue).start()
    return ServedModel(name, tok, sched, sched.max_len, reasoning=reasoning)


def stopping(served: dict):
    """A module fixture's served models: `yield from stopping(served)` hands them to the tests, then stops
    their schedulers."""
    yield served
    for m in served.values():
        m.scheduler.stop(timeout=5)


def scrape(url: str) -> dict[str, dict[tuple, float]]:
    """GET /metrics through prometheus_client's own parser: sample name → {sorted label items: value}."""
    r = httpx.get(url + "/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def metric(scraped, name: str, model: str, absent: float | None = None, **labels) -> float:
    """One sample's value; a missing sample is an error unless `absent` says what it means (a counter
    with a label value that has not occurred yet, e.g. no request was cancelled)."""
    key = tuple(sorted({"model_name": model, **labels}.items()))
    if absent is not None and key not in scraped.get(name, {}):
        return absent
    return scraped[name][key]


class _Server:
    """An app served on a free port from a thread. With `limits`, through nanoseek's own server (serve/server.py:
    timeouts, connection cap); without, through plain uvicorn."""

    def __init__(self, app, host: str = "127.0.0.1", limits: ServerLimits | None = None):
        if limits is None:
            self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=0, log_level="warning"))
        else:
            self.server = build_server(app, host, 0, limits, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        self.host = host
        self.port = self.server.servers[0].sockets[0].getsockname()[1]   # port 0: the OS picked a free one
        self.url = f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    def client(self, key="none", **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, **kw)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def models():
    served = {"tiny": _served("tiny", CHATML), "tiny-r1": _served("tiny-r1", R1_LIKE, reasoning=True),
              "slow": _served("slow", CHATML, slow_s=0.02, max_batch=1),
              "broken": _served("broken", CHATML, broken=True)}
    yield from stopping(served)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    with Store(tmp_path_factory.mktemp("open")) as st:
        yield st


@pytest.fixture(scope="module")
def server(models, store):
    """An open server: the store has no keys and auth is not required."""
    s = _Server(create_app(models, store, require_auth=False, keepalive_s=0.2, poll_s=0.05))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


HELLO = [{"role": "user", "content": "Hello there"}]


def _usage_ok(u):
    assert u.prompt_tokens > 0
    hit, miss = u.model_extra["prompt_cache_hit_tokens"], u.model_extra["prompt_cache_miss_tokens"]
    assert hit >= 0 and miss > 0 and hit + miss == u.prompt_tokens   # the last prompt token is always computed
    assert u.prompt_tokens_details.cached_tokens == hit
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens


def test_chat_non_stream(client, store):
    before = len(store.usage_rows())
    r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "tiny"
    (c,) = r.choices
    assert c.message.role == "assistant" and isinstance(c.message.content, str)
    assert c.finish_reason == "length" and r.usage.completion_tokens == 8
    _usage_ok(r.usage)
    time.sleep(0.2)   # the ledger write is fire-and-forget on a worker thread
    rows = store.usage_rows()
    assert len(rows) == before + 1
    assert rows[-1].model == "tiny" and rows[-1].completion_tokens == 8
    assert rows[-1].prompt_cache_hit_tokens == r.usage.model_extra["prompt_cache_hit_tokens"]
    assert rows[-1].prompt_cache_miss_tokens == r.usage.model_extra["prompt_cache_miss_tokens"]
    assert rows[-1].cost_usd > 0


def test_chat_stream_matches_non_stream(client):
    kw = dict(model="tiny", messages=HELLO, max_tokens=12, temperature=0)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    _usage_ok(chunks[-1].usage)


def test_raw_sse_ends_with_done(server):
    body = {"model": "tiny", "messages": HELLO, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", server.url + "/chat/completions", json=body, timeout=30) as r:   # no /v1 prefix
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    assert "usage" not in json.loads(events[-2][6:])   # usage only when asked for


def test_n_and_seed(client):
    kw = dict(model="tiny", messages=HELLO, max_tokens=10, temperature=1.0, n=2, seed=123)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.choices[0].message.content != a.choices[1].message.content   # seed + i per choice
    assert a.usage.completion_tokens == 20
    streamed = list(client.chat.completions.create(**kw, stream=True))
    texts = ["", ""]
    for ch in streamed:
        for c in ch.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == [c.message.content for c in a.choices]


def test_stop_string(client):
    kw = dict(model="tiny", messages=HELLO, max_tokens=24, temperature=0)
    full = client.chat.completions.create(**kw).choices[0].message.content
    assert len(full) >= 6
    stop = full[4:6]
    r = client.chat.completions.create(**kw, stop=[stop])
    assert r.choices[0].message.content == full[:full.find(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_reasoning_model_splits_think(client):
    r = client.chat.completions.create(model="tiny-r1", messages=HELLO, max_tokens=8, temperature=0)
    msg = r.choices[0].message
    # The R1-like template opens <think>, and a random model never closes it: everything is reasoning.
    assert msg.model_extra["reasoning_content"] is not None and msg.content == ""
    assert r.usage.completion_tokens_details.reasoning_tokens <= r.usage.completion_tokens
    chunks = list(client.chat.completions.create(model="tiny-r1", messages=HELLO, max_tokens=8, temperature=0,
                                                 stream=True))
    streamed = "".join(c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in chunks if c.choices)
    assert streamed == msg.model_extra["reasoning_content"]


def test_prefix_completion_continues_the_reply(client):
    kw = dict(model="tiny", max_tokens=6, temperature=0)
    r = client.chat.completions.create(messages=HELLO + [{"role": "assistant", "content": "ab", "prefix": True}], **kw)
    assert r.choices[0].finish_reason == "length" and isinstance(r.choices[0].message.content, str)
    # the prefix is appended to the generation prompt (one byte token per character), not a closed turn
    assert r.usage.prompt_tokens == client.chat.completions.create(messages=HELLO, **kw).usage.prompt_tokens + 2


def test_legacy_completions(client):
    r = client.completions.create(model="tiny", prompt=["abc", "xyz"], max_tokens=5, temperature=0, n=2, echo=True)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text.startswith("abc") and r.choices[2].text.startswith("xyz")
    assert r.choices[0].text == r.choices[1].text   # greedy: both choices agree
    assert r.usage.completion_tokens == 20
    chunks = list(client.completions.create(model="tiny", prompt="abc", max_tokens=5, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text[3:]
    assert chunks[-1].usage.completion_tokens == 5


def _chat_lps(content):
    return [(t.token, t.logprob, [(x.token, x.logprob) for x in t.top_logprobs]) for t in content]


def _close(a, b):
    """Same tokens and alternatives, logprobs equal to float noise: the second run's prompt comes partly
    from the prefix cache, so its prefill runs in a different chunking."""
    assert [x[0] for x in a] == [x[0] for x in b]
    for (_, lp_a, top_a), (_, lp_b, top_b) in zip(a, b):
        assert lp_a == pytest.approx(lp_b, abs=1e-4)
        assert [t for t, _ in top_a] == [t for t, _ in top_b]
        assert [v for _, v in top_a] == pytest.approx([v for _, v in top_b], abs=1e-4)


def test_streamed_logprobs_equal_non_streamed(client):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "log probs"}], max_tokens=10, temperature=0,
              logprobs=True, top_logprobs=3)
    whole = client.chat.completions.create(**kw)
    content = whole.choices[0].logprobs.content
    want = _chat_lps(content)
    assert len(want) == whole.usage.completion_tokens - (whole.choices[0].finish_reason == "stop") > 0
    # random bytes split characters across tokens: each token's `bytes` still rebuild the text exactly
    text = b"".join(bytes(t.bytes) for t in content).decode(errors="replace")
    assert text == whole.choices[0].message.content
    for token, lp, top in want:
        assert len(top) == 3 and top[0] == (token, lp) and lp <= 0   # greedy: the chosen token is the best
    chunks = list(client.chat.completions.create(**kw, stream=True))
    got = _chat_lps([t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content])
    _close(got, want)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content

    kw = dict(model="tiny", prompt="log probs", max_tokens=6, temperature=0, logprobs=2)
    whole = client.completions.create(**kw).choices[0].logprobs
    assert len(whole.tokens) == 6 and all(len(top) == 2 for top in whole.top_logprobs)
    parts = [c.choices[0].logprobs for c in client.completions.create(**kw, stream=True)
             if c.choices and c.choices[0].logprobs]
    assert [t for p in parts for t in p.tokens] == whole.tokens
    assert [o for p in parts for o in p.text_offset] == whole.text_offset   # offsets run on across chunks
    assert [v for p in parts for v in p.token_logprobs] == pytest.approx(whole.token_logprobs, abs=1e-4)
    assert [list(t) for p in parts for t in p.top_logprobs] == [list(t) for t in whole.top_logprobs]


def test_shared_system_prompt_hits_the_prefix_cache(server, client, store):
    system = "You are nanoseek's test assistant. Answer briefly, politely and only about the weather. " * 2
    turn = lambda q: [{"role": "system", "content": system}, {"role": "user", "content": q}]   # noqa: E731
    kw = dict(model="tiny", max_tokens=3, temperature=0)
    before = scrape(server.url)
    first = client.chat.completions.create(messages=turn("Sunny?"), **kw).usage
    assert first.model_extra["prompt_cache_hit_tokens"] == 0     # nobody sent this system prompt before
    second = client.chat.completions.create(messages=turn("Rain?"), **kw).usage
    hit, miss = second.model_extra["prompt_cache_hit_tokens"], second.model_extra["prompt_cache_miss_tokens"]
    assert hit > 0 and hit + miss == second.prompt_tokens and second.prompt_tokens_details.cached_tokens == hit
    ids = [httpx.post(server.url + "/tokenize", json={"model": "tiny", "messages": turn(q)}).json()["tokens"]
           for q in ("Sunny?", "Rain?")]
    shared = next(k for k, (a, b) in enumerate(zip(*ids)) if a != b)
    assert hit <= shared < hit + 16       # everything shared, to the last whole 16-token block
    time.sleep(0.2)
    row = store.usage_rows()[-1]
    assert (row.prompt_cache_hit_tokens, row.prompt_cache_miss_tokens) == (hit, miss)
    after = scrape(server.url)
    gained = (metric(after, "nanoseek_prefix_cache_hits_total", "tiny")
              - metric(before, "nanoseek_prefix_cache_hits_total", "tiny"))
    assert gained == hit
    # streamed with n = 2: both copies hit, and the prompt (counted once) reports its hits once
    chunks = list(client.chat.completions.create(messages=turn("Snow?"), n=2, stream=True,
                                                 stream_options={"include_usage": True}, **kw))
    u = chunks[-1].usage
    assert u.model_extra["prompt_cache_hit_tokens"] == hit and u.prompt_tokens == second.prompt_tokens
    _usage_ok(u)


def test_models_tokenize_detokenize_balance(server, client):
    ids = {m.id: m for m in client.models.list().data}
    assert set(ids) == {"tiny", "tiny-r1", "slow", "broken"}
    assert ids["tiny"].owned_by == "nanoseek" and ids["tiny"].model_extra["max_model_len"] == CONTEXT
    t = httpx.post(server.url + "/v1/tokenize", json={"model": "tiny", "prompt": "hi"}).json()
    assert t["count"] == len(t["tokens"]) and t["max_model_len"] == CONTEXT
    d = httpx.post(server.url + "/detokenize", json={"model": "tiny", "tokens": t["tokens"]}).json()
    assert d["prompt"].endswith("hi")
    assert httpx.get(server.url + "/user/balance").json()["is_available"] is True


def _error(resp, status):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_client_errors_are_openai_bodies(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=HELLO, tool_choice="required",
                                       tools=[{"type": "function", "function": {"name": "bad name"}}])
    assert e.value.body["param"] == "tools[0].function.name"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x" * 400}])
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=HELLO)
    url = server.url + "/v1/chat/completions"
    err = _error(httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}), 400)
    assert err["code"] == "invalid_json"
    err = _error(httpx.post(url, json={"model": "tiny", "messages": HELLO, "temperature": "hot"}), 422)
    assert err["param"] == "temperature"
    _error(httpx.post(url, json={"model": "tiny"}), 422)
    # more sequences than the queue can ever hold: the client's error, not a 503 "retry shortly"
    err = _error(httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": ["a"] * 20, "n": 16}), 400)
    assert err["param"] == "prompt" and "320" in err["message"]
    _error(httpx.get(server.url + "/v1/no-such-route"), 404)
    _error(httpx.get(url), 405)
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_dropped_stream_frees_its_row(server, models):
    sched = models["slow"].scheduler
    cancelled = sched.stats()["finished"].get("cancelled", 0)
    baseline = scrape(server.url)
    body = {"model": "slow", "messages": HELLO, "max_tokens": 200, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]   # role chunk and a few content chunks, then hang up
    assert any(line.startswith("data: ") for line in got)
    deadline = time.monotonic() + 10
    while sched.stats()["running"] or sched.stats()["finished"].get("cancelled", 0) == cancelled:
        assert time.monotonic() < deadline, sched.stats()
        time.sleep(0.05)
    assert sched.stats()["running"] == 0 and sched.stats()["waiting"] == 0
    now = scrape(server.url)
    for name in ("nanoseek_num_requests_running", "nanoseek_num_requests_waiting", "nanoseek_kv_cache_rows_used"):
        assert metric(now, name, "slow") == metric(baseline, name, "slow") == 0
    assert metric(now, "nanoseek_request_finished_total", "slow", finished_reason="cancelled") == cancelled + 1
    assert metric(now, "nanoseek_prefix_cache_blocks_used", "slow") <= metric(now, "nanoseek_prefix_cache_blocks_total",
                                                                              "slow")
    assert httpx.get(server.url + "/health").status_code == 200


def test_keepalive_while_queued(server, models):
    """One row: the second stream waits behind the first and hears keep-alive comments meanwhile."""
    first = threading.Thread(target=lambda: server.client().chat.completions.create(
        model="slow", messages=HELLO, max_tokens=40))
    first.start()
    deadline = time.monotonic() + 10
    while not models["slow"].scheduler.stats()["running"]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    body = {"model": "slow", "messages": HELLO, "max_tokens": 2, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as r:
        text = r.read().decode()
    first.join(30)
    assert ": keep-alive" in text and text.rstrip().endswith("data: [DONE]")
    # no chunk (not even the role-only one) before the request got a row and produced its first token, so
    # vllm bench's TTFT (time to the first chunk with choices) measures the queue and prefill, not the network
    assert text.index(": keep-alive") < text.index("data: ")


def test_engine_failure_is_a_500_or_an_error_event(server, client):
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model="broken", messages=HELLO, max_tokens=4)
    assert e.value.body["type"] == "server_error" and "simulated" not in e.value.body["message"]
    body = {"model": "broken", "messages": HELLO, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200        # the stream had begun: the error travels as its last event
        events = [line for line in r.iter_lines() if line]
    assert json.loads(events[-1][6:])["error"]["type"] == "server_error"
    with pytest.raises(openai.APIError):   # the SDK raises on it
        list(client.chat.completions.create(**body))
    assert httpx.get(server.url + "/health").status_code == 200


# ---------------------------------------------------------------------------------------------------------
# Keys


@pytest.fixture(scope="module")
def keyed(models, tmp_path_factory):
    with Store(tmp_path_factory.mktemp("keys")) as st:
        s = _Server(create_app(models, st, require_auth=False, poll_s=0.05))
        yield s, st
        s.stop()


def test_auth_once_a_key_exists(keyed):
    server, st = keyed
    key_id, secret = st.create_key("alice")
    with pytest.raises(openai.AuthenticationError):
        server.client("sk-ns-wrong").chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny", "messages": HELLO})
    assert _error(r, 401)["type"] == "authentication_error"
    r = server.client(secret).chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)
    assert r.usage.completion_tokens == 2
    time.sleep(0.2)
    assert [row.key_id for row in st.usage_rows(key=key_id)] == [key_id]
    st.revoke_key(key_id)
    with pytest.raises(openai.AuthenticationError):
        server.client(secret).models.list()
    assert httpx.get(server.url + "/health").status_code == 200


def test_budget_and_rate_limit(keyed):
    server, st = keyed
    _, broke = st.create_key("broke", budget_usd=0)
    with pytest.raises(openai.APIStatusError) as e:
        server.client(broke).chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)
    assert e.value.status_code == 402
    _, slow = st.create_key("slow", rpm=1)
    server.client(slow).chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)
    with pytest.raises(openai.RateLimitError) as e:
        server.client(slow).chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)
    assert int(e.value.response.headers["retry-after"]) >= 1
    key_id, funded = st.create_key("funded", budget_usd=5)
    body = httpx.get(server.url + "/user/balance", headers={"Authorization": f"Bearer {funded}"}).json()
    assert body["is_available"] and body["balance_infos"][0]["total_balance"] == "5.00"

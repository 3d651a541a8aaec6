"""The Anthropic Messages API (serve/anthropic.py), driven by the official `anthropic` SDK.

Against the tiny random models of test_serve.py (contract: shapes, stop reasons, usage arithmetic, the ledger,
errors, auth) and the trained R1-like model of test_serve_reasoning.py (thinking blocks and signatures). The
tool translations are checked directly on the pydantic objects; their end-to-end loop needs tool calling
from the chat pipeline.
"""

import copy
import json
import time

import anthropic
import httpx
import pytest
import torch

from nanoseek.engine.scheduler import Scheduler
from nanoseek.models import build_model
from nanoseek.models.config import DenseConfig
from nanoseek.serve.anthropic import AnthropicStream, MessagesRequest, Signer, chat_body, from_chat
from nanoseek.serve.app import ServedModel, create_app
from nanoseek.serve.routes import ChatRun
from nanoseek.serve.store import Store
from test_chat import CHATML, R1_LIKE, make_tokenizer
from test_serve import _served, _Server, stopping
from test_serve_reasoning import CONTENT, REASONING
from test_serve_reasoning import CHATML as PLAIN_TEMPLATE
from test_serve_reasoning import _tokenizer, _train

HELLO = [{"role": "user", "content": "Hello there"}]
GREEDY = {"extra_body": {"temperature": 0}}   # the API takes temperature; this SDK no longer has the argument


@pytest.fixture(scope="module")
def models():
    served = {"tiny": _served("tiny", CHATML), "tiny-r1": _served("tiny-r1", R1_LIKE, reasoning=True),
              "short": _served("short", CHATML, context=48),
              "slow": _served("slow", CHATML, slow_s=0.02, max_batch=1),
              "broken": _served("broken", CHATML, broken=True)}
    yield from stopping(served)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    with Store(tmp_path_factory.mktemp("anthropic")) as st:
        yield st


@pytest.fixture(scope="module")
def server(models, store):
    s = _Server(create_app(models, store, require_auth=False, keepalive_s=0.2, poll_s=0.05))
    yield s
    s.stop()


def _client(server, key="none", base="/anthropic"):
    return anthropic.Anthropic(base_url=server.url + base, api_key=key, max_retries=0)


def _greedy(client, **kw):
    return client.messages.create(**{"model": "tiny", "max_tokens": 8, "messages": HELLO, **GREEDY, **kw})


def test_plain_message_shape_usage_and_ledger(server, store):
    client = _client(server)
    before = len(store.usage_rows())
    m = _greedy(client)
    assert m.type == "message" and m.role == "assistant" and m.model == "tiny" and m.id.startswith("msg_")
    assert [b.type for b in m.content] == ["text"] and m.content[0].text
    assert m.stop_reason == "max_tokens" and m.stop_sequence is None
    assert m.usage.output_tokens == 8
    count = client.messages.count_tokens(model="tiny", messages=HELLO).input_tokens
    u = m.usage
    assert u.input_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens == count
    time.sleep(0.2)   # the ledger write is fire-and-forget
    rows = store.usage_rows()
    assert len(rows) == before + 1
    row = rows[-1]
    assert (row.model, row.completion_tokens) == ("tiny", 8)
    assert (row.prompt_cache_miss_tokens, row.prompt_cache_hit_tokens) == (u.input_tokens, u.cache_read_input_tokens)
    # The same request through chat completions bills the same row (a second run: all but the last token hit).
    chat = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny", "messages": HELLO, "max_tokens": 8,
                                                                "temperature": 0, "thinking": {"type": "disabled"}})
    assert chat.json()["choices"][0]["message"]["content"] == m.content[0].text
    assert chat.json()["usage"]["prompt_tokens"] == count
    m2 = _greedy(client)
    assert m2.usage.cache_read_input_tokens == chat.json()["usage"]["prompt_cache_hit_tokens"] > 0
    time.sleep(0.2)
    a, b = store.usage_rows()[-2:]
    assert (a.cost_usd, a.prompt_cache_hit_tokens) == (b.cost_usd, b.prompt_cache_hit_tokens)


def test_models(server, models):
    client = _client(server)
    assert [m.id for m in client.models.list()] == list(models)
    assert client.models.retrieve("tiny").type == "model"
    with pytest.raises(anthropic.NotFoundError):
        client.models.retrieve("nope")
    assert httpx.get(server.url + "/v1/models").json()["object"] == "list"   # /v1/models stays OpenAI's


def test_both_base_urls_and_system(server):
    a = _greedy(_client(server), system="Be brief.")
    b = _greedy(_client(server, base=""), system=[{"type": "text", "text": "Be brief."}])
    assert a.content[0].text == b.content[0].text
    assert a.usage.input_tokens + a.usage.cache_read_input_tokens > _greedy(_client(server)).usage.input_tokens


def test_stream_matches_non_stream(server):
    client = _client(server)
    whole = _greedy(client, max_tokens=12)
    with client.messages.stream(model="tiny", max_tokens=12, messages=HELLO, **GREEDY) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == whole.content[0].text == final.content[0].text
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 12
    assert (final.usage.input_tokens + final.usage.cache_read_input_tokens
            == whole.usage.input_tokens + whole.usage.cache_read_input_tokens)


def test_raw_event_sequence(server):
    body = {"model": "tiny", "max_tokens": 4, "messages": HELLO, "stream": True, "temperature": 0}
    with httpx.stream("POST", server.url + "/v1/messages", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    names = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    datas = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    assert [d["type"] for d in datas] == names
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) <= {"content_block_delta", "ping"}
    assert datas[-2]["delta"]["stop_reason"] == "max_tokens" and datas[-2]["usage"]["output_tokens"] == 4


def test_stop_sequence(server):
    client = _client(server)
    text = _greedy(client, max_tokens=16).content[0].text
    stop = text[5:7]
    m = _greedy(client, max_tokens=16, stop_sequences=["\x00never", stop])
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == stop
    assert m.content[0].text == text[:text.index(stop)]
    with client.messages.stream(model="tiny", max_tokens=16, messages=HELLO, **GREEDY,
                                stop_sequences=[stop]) as s:
        final = s.get_final_message()
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", stop)


def test_max_tokens_is_a_cap_and_prompt_too_long(server):
    client = _client(server)
    m = client.messages.create(model="short", max_tokens=20000, messages=[{"role": "user", "content": "Hi"}],
                               **GREEDY)
    assert m.stop_reason == "max_tokens"      # clamped to the room left in the 48-token context, not a 400
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens + m.usage.output_tokens == 48
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model="short", max_tokens=4, messages=[{"role": "user", "content": "x " * 60}])
    assert e.value.status_code == 400
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "invalid_request_error"
    assert e.value.body["error"]["message"].startswith("prompt is too long: ")


@pytest.mark.parametrize("body, status, kind", [
    ({"model": "tiny", "messages": HELLO}, 400, "invalid_request_error"),                  # max_tokens missing
    ({"model": "nope", "max_tokens": 4, "messages": HELLO}, 404, "not_found_error"),
    ({"model": "tiny", "max_tokens": 4, "messages": HELLO, "temperature": 1.5}, 400, "invalid_request_error"),
    ({"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": ""}}]}]},
     400, "invalid_request_error"),
    ({"model": "tiny", "max_tokens": 4, "messages": HELLO, "thinking": {"type": "enabled"}}, 400,
     "invalid_request_error"),
])
def test_errors_have_anthropic_shape(server, body, status, kind):
    r = httpx.post(server.url + "/anthropic/v1/messages", json=body, timeout=30)
    assert r.status_code == status
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == kind and r.json()["error"]["message"]
    assert set(r.json()) == {"type", "error"}


def test_stream_failure_is_an_error_event(server):
    body = {"model": "broken", "max_tokens": 8, "messages": HELLO, "stream": True}
    with httpx.stream("POST", server.url + "/v1/messages", json=body, timeout=30) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[0] == "event: message_start" and lines[-2] == "event: error"
    err = json.loads(lines[-1].removeprefix("data: "))
    assert err["type"] == "error" and err["error"]["type"] == "api_error"


def test_hung_up_stream_is_cancelled_and_billed(server, models, store):
    """The chat stream's own cancellation and billing run under the translation: the Anthropic generator
    closes the chat one."""
    sched = models["slow"].scheduler
    rows = len(store.usage_rows())
    body = {"model": "slow", "max_tokens": 200, "messages": HELLO, "stream": True, "temperature": 0}
    with httpx.stream("POST", server.url + "/anthropic/v1/messages", json=body, timeout=30) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(12)]
    assert "event: content_block_delta" in got
    deadline = time.monotonic() + 10
    while sched.stats()["running"] or len(store.usage_rows()) == rows:
        assert time.monotonic() < deadline, sched.stats()
        time.sleep(0.05)
    row = store.usage_rows()[-1]
    assert row.model == "slow" and 0 < row.completion_tokens < 200


def test_openai_routes_keep_openai_errors(server):
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "nope", "messages": HELLO}, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_keys_x_api_key_and_401(models, tmp_path):
    with Store(tmp_path) as st:
        _, secret = st.create_key("agent")
        s = _Server(create_app(models, st, require_auth=True, poll_s=0.05))
        try:
            with pytest.raises(anthropic.AuthenticationError) as e:
                _greedy(_client(s, key="sk-ns-wrong"))
            assert e.value.status_code == 401
            assert e.value.body == {"type": "error", "error": {"type": "authentication_error",
                                                               "message": e.value.body["error"]["message"]}}
            with pytest.raises(anthropic.AuthenticationError):
                _client(s, key="sk-ns-wrong").messages.count_tokens(model="tiny", messages=HELLO)
            m = _greedy(_client(s, key=secret))      # this SDK sends the key as Bearer
            assert m.usage.output_tokens == 8
            # x-api-key, as Claude Code and earlier SDKs send it
            body = {"model": "tiny", "max_tokens": 4, "messages": HELLO, "temperature": 0}
            r = httpx.post(s.url + "/anthropic/v1/messages", json=body, headers={"x-api-key": secret}, timeout=30)
            assert r.status_code == 200 and r.json()["usage"]["output_tokens"] == 4
            r = httpx.post(s.url + "/v1/messages", json=body, headers={"x-api-key": "sk-ns-wrong"}, timeout=30)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
            time.sleep(0.2)
            rows = st.usage_rows()
            assert [(row.key_id is not None, row.completion_tokens) for row in rows] == [(True, 8), (True, 4)]
            _, broke = st.create_key("broke", budget_usd=0.0)
            r = httpx.post(s.url + "/v1/messages", json=body, headers={"x-api-key": broke}, timeout=30)
            assert r.status_code == 402 and r.json()["error"]["type"] == "billing_error"
        finally:
            s.stop()


# --- thinking, on a model trained to reason (test_serve_reasoning.py)


@pytest.fixture(scope="module")
def reasoning_server():
    tok = _tokenizer(PLAIN_TEMPLATE)
    model, _ = _train(tok)
    models = {}
    for name, reasoning in (("reasoner", True), ("plain", False)):
        sched = Scheduler(copy.deepcopy(model), copy.deepcopy(tok), max_batch=2, max_len=128).start()
        models[name] = ServedModel(name, sched.tokenizer, sched, sched.max_len, reasoning=reasoning)
    s = _Server(create_app(models, None, require_auth=False, poll_s=0.05))
    yield s
    s.stop()
    for m in models.values():
        m.scheduler.stop(timeout=5)


QUESTION = [{"role": "user", "content": "What is 2 plus 2?"}]
THINK = {"type": "enabled", "budget_tokens": 32}


def test_thinking_blocks_signed_and_verified(reasoning_server):
    client = _client(reasoning_server)
    m = client.messages.create(model="plain", max_tokens=64, messages=QUESTION, thinking=THINK, **GREEDY)
    assert [b.type for b in m.content] == ["thinking", "text"]
    thinking, text = m.content
    assert (thinking.thinking, text.text) == (REASONING, CONTENT) and m.stop_reason == "end_turn"
    assert thinking.signature
    # Sent back unaltered: accepted. Altered: Anthropic's 400.
    history = QUESTION + [{"role": "assistant", "content": [b.model_dump() for b in m.content]},
                          {"role": "user", "content": "And 3 plus 3?"}]
    again = client.messages.create(model="plain", max_tokens=40, messages=history, thinking=THINK, **GREEDY)
    assert again.usage.output_tokens > 0
    history[1]["content"][0]["thinking"] = "2 plus 2 is 5\n"
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model="plain", max_tokens=40, messages=history, thinking=THINK, **GREEDY)
    assert "signature" in e.value.body["error"]["message"]


def test_thinking_stream(reasoning_server):
    client = _client(reasoning_server)
    with client.messages.stream(model="reasoner", max_tokens=64, messages=QUESTION, thinking=THINK, **GREEDY) as s:
        events = list(s)
        final = s.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert (final.content[0].thinking, final.content[1].text) == (REASONING, CONTENT)
    deltas = [e.delta.type for e in events if e.type == "content_block_delta"]
    assert "thinking_delta" in deltas and deltas.count("signature_delta") == 1
    assert deltas.index("signature_delta") < deltas.index("text_delta")
    whole = client.messages.create(model="reasoner", max_tokens=64, messages=QUESTION, thinking=THINK, **GREEDY)
    assert final.content[0].signature == whole.content[0].signature


def test_thinking_off_by_default(reasoning_server):
    """Anthropic's default is no thinking: on the plain model the answer comes without a think block."""
    m = _client(reasoning_server).messages.create(model="plain", max_tokens=64, messages=QUESTION, **GREEDY)
    assert "thinking" not in [b.type for b in m.content]


# --- the tool translations, on the objects themselves


TOOLS = [{"name": "get_weather", "description": "Weather for a city.",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]


def test_tools_and_blocks_to_chat():
    signer = Signer(None)
    req = MessagesRequest.parse(json.dumps({
        "model": "tiny", "max_tokens": 32, "system": "sys", "tools": TOOLS,
        "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "use the tool", "signature": signer.sign("use the tool")},
                {"type": "text", "text": "Let me look."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "18 C"}]},
                {"type": "tool_result", "tool_use_id": "toolu_2", "content": "gone", "is_error": True},
                {"type": "text", "text": "Thanks"}]}]}).encode())
    body = chat_body(req, signer)
    assert body["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city.", "parameters": TOOLS[0]["input_schema"]}}]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert body["parallel_tool_calls"] is False
    assert body["messages"] == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [
            {"id": "toolu_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}],
         "reasoning_content": "use the tool"},   # verified, and kept behind the calls (the replay rule)
        {"role": "tool", "tool_call_id": "toolu_1", "content": "18 C"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: gone"},
        {"role": "user", "content": "Thanks"}]
    for choice, want in (("auto", "auto"), ("any", "required"), ("none", "none")):
        req = MessagesRequest.parse(json.dumps({"max_tokens": 4, "messages": HELLO, "tools": TOOLS,
                                                "tool_choice": {"type": choice}}).encode())
        assert chat_body(req, signer)["tool_choice"] == want
    # a thinking budget becomes the largest reasoning_effort step not above it
    for budget, effort in ((100, "minimal"), (1024, "low"), (5000, "medium"), (10**6, "xhigh")):
        req = MessagesRequest.parse(json.dumps({"max_tokens": budget + 1, "messages": HELLO, "thinking": {
            "type": "enabled", "budget_tokens": budget}}).encode())
        assert chat_body(req, signer)["reasoning_effort"] == effort


def _run():
    return ChatRun()


def test_tool_calls_and_reasoning_from_chat():
    signer = Signer(None)
    completion = {"choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": None, "reasoning_content": "think",
        "tool_calls": [{"id": "call_1", "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "prompt_cache_hit_tokens": 4}}
    m = from_chat(completion, _run(), signer, "tiny")
    assert m["stop_reason"] == "tool_use"
    assert m["content"] == [{"type": "thinking", "thinking": "think", "signature": signer.sign("think")},
                            {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}}]
    assert m["usage"] == {"input_tokens": 6, "cache_read_input_tokens": 4, "cache_creation_input_tokens": 0,
                          "output_tokens": 5}
    assert anthropic.types.Message.model_validate(m).content[1].input == {"city": "Paris"}


def test_tool_call_deltas_to_events():
    signer = Signer(None)
    tr = AnthropicStream(_run(), signer, "tiny")
    chunks = [{"choices": [{"index": 0, "delta": {"reasoning_content": "hm"}}]},
              {"choices": [{"index": 0, "delta": {"content": "ok"}}]},
              {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                                                  "function": {"name": "f", "arguments": ""}}]}}]},
              {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"a":'}}]}}]},
              {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": ' 1}'}}]}}]},
              {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
              {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 9, "prompt_cache_hit_tokens": 0}}]
    events = [json.loads(e.split("data: ", 1)[1]) for c in chunks for e in tr.feed(c)] + \
             [json.loads(e.split("data: ", 1)[1]) for e in tr.end()]
    kinds = [(e["type"], (e.get("delta") or e.get("content_block") or {}).get("type")) for e in events]
    assert kinds == [("content_block_start", "thinking"), ("content_block_delta", "thinking_delta"),
                     ("content_block_delta", "signature_delta"), ("content_block_stop", None),
                     ("content_block_start", "text"), ("content_block_delta", "text_delta"),
                     ("content_block_stop", None),
                     ("content_block_start", "tool_use"), ("content_block_delta", "input_json_delta"),
                     ("content_block_delta", "input_json_delta"), ("content_block_stop", None),
                     ("message_delta", None), ("message_stop", None)]
    assert [e["index"] for e in events if "index" in e] == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    assert events[-2]["delta"]["stop_reason"] == "tool_use" and events[-2]["usage"]["output_tokens"] == 9
    assert "".join(e["delta"]["partial_json"] for e in events if e.get("delta", {}).get("type") == "input_json_delta") \
        == '{"a": 1}'


# --- tools end to end: a random model held to a valid call by the chat route's grammar


def long_served(name: str, context: int = 1024) -> ServedModel:
    """A tiny random model with room for a tool-description prompt (the generic tool format takes ~600 byte
    tokens); test_serve's models stop at 256 positions."""
    tok = make_tokenizer(CHATML)
    torch.manual_seed(0)
    cfg = DenseConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context, eos_token_id=None)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.3)
    sched = Scheduler(model.eval(), tok, max_batch=2, max_len=context).start()
    return ServedModel(name, tok, sched, sched.max_len)


@pytest.fixture(scope="module")
def tool_server():
    models = {"tool": long_served("tool")}
    s = _Server(create_app(models, None, require_auth=False, poll_s=0.05))
    yield s
    s.stop()
    models["tool"].scheduler.stop(timeout=5)


CITY_TOOLS = [{"name": "get_weather", "description": "Weather for a city.", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}}, "required": ["city"],
    "additionalProperties": False}}]
ASK = [{"role": "user", "content": "Weather in Paris?"}]


def test_tool_use_loop(tool_server):
    client = _client(tool_server)
    kw = dict(model="tool", max_tokens=200, tools=CITY_TOOLS, **GREEDY)
    m = client.messages.create(messages=ASK, tool_choice={"type": "tool", "name": "get_weather"}, **kw)
    assert m.stop_reason == "tool_use"
    (call,) = [b for b in m.content if b.type == "tool_use"]
    assert call.name == "get_weather" and call.input in ({"city": "Paris"}, {"city": "Rome"})
    # Streamed, the same call arrives as input_json_delta fragments
    with client.messages.stream(messages=ASK, tool_choice={"type": "tool", "name": "get_weather"}, **kw) as s:
        events = list(s)
        final = s.get_final_message()
    assert final.stop_reason == "tool_use"
    assert [(b.type, b.name, b.input) for b in final.content if b.type == "tool_use"] == [
        ("tool_use", call.name, call.input)]
    fragments = [e.delta.partial_json for e in events if e.type == "content_block_delta"
                 and e.delta.type == "input_json_delta"]
    assert json.loads("".join(fragments)) == call.input
    # The loop: the result goes back as a tool_result block, and the model answers without calling
    history = ASK + [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in m.content]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "18 C"}]}]
    answer = client.messages.create(messages=history, tool_choice={"type": "none"}, **{**kw, "max_tokens": 8})
    assert answer.stop_reason == "max_tokens" and [b.type for b in answer.content] == ["text"]
    counted = client.messages.count_tokens(model="tool", messages=history, tools=CITY_TOOLS).input_tokens
    assert answer.usage.input_tokens + answer.usage.cache_read_input_tokens == counted
    assert counted > m.usage.input_tokens + m.usage.cache_read_input_tokens

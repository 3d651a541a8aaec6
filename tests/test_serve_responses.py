"""The OpenAI Responses API (serve/responses.py), driven by the `openai` SDK's client.responses, and its storage
in the Store's responses table; and one conversation through all three APIs giving the same greedy tokens.

The tiny models are random (see test_serve.py): the tests check the contract, never the text. Function tools
and JSON schemas are checked on the translations themselves; end to end they need the chat pipeline's tool
calling and grammars.
"""

import json
import sqlite3
import time

import anthropic
import httpx
import openai
import pytest

from nanoseek.errors import NotFoundError, QuotaExceededError
from nanoseek.serve import store as store_mod
from nanoseek.serve.app import create_app
from nanoseek.serve.responses import Output, ResponsesRequest, chat_body
from nanoseek.serve.store import SCHEMA_VERSION, Store, StoreLimits
from test_chat import CHATML, R1_LIKE
from test_serve import _served, _Server, stopping
from test_serve_anthropic import long_served

HELLO = "Hello there"


@pytest.fixture(scope="module")
def models():
    served = {"tiny": _served("tiny", CHATML), "tiny-r1": _served("tiny-r1", R1_LIKE, reasoning=True),
              "broken": _served("broken", CHATML, broken=True)}
    yield from stopping(served)


@pytest.fixture(scope="module")
def keyed(models, tmp_path_factory):
    """A server with two keys: (server, store, secret A, secret B)."""
    with Store(tmp_path_factory.mktemp("responses")) as st:
        _, a = st.create_key("a")
        _, b = st.create_key("b")
        s = _Server(create_app(models, st, require_auth=True, keepalive_s=0.2, poll_s=0.05))
        yield s, st, a, b
        s.stop()


def _greedy(client, **kw):
    return client.responses.create(**{"model": "tiny", "input": HELLO, "max_output_tokens": 8, "temperature": 0,
                                      **kw})


def test_non_stream_matches_chat(keyed):
    s, st, a, _ = keyed
    client = s.client(a)
    r = _greedy(client, instructions="Be brief.")
    assert r.object == "response" and r.id.startswith("resp_") and r.model == "tiny"
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    (item,) = r.output
    assert item.type == "message" and item.role == "assistant" and item.content[0].type == "output_text"
    chat = client.chat.completions.create(model="tiny", max_tokens=8, temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": HELLO}])
    assert r.output_text == chat.choices[0].message.content
    assert r.usage.input_tokens == chat.usage.prompt_tokens and r.usage.output_tokens == 8
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.usage.input_tokens_details.cached_tokens <= r.usage.input_tokens


def test_stream_events_and_stored_copy(keyed):
    s, st, a, _ = keyed
    client = s.client(a)
    whole = _greedy(client, max_output_tokens=12)
    events = list(_greedy(client, max_output_tokens=12, stream=True))
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[2:5] == ["response.output_item.added", "response.content_part.added", "response.output_text.delta"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    item_id = events[2].item.id
    assert all((d.item_id, d.output_index, d.content_index) == (item_id, 0, 0) for d in deltas)
    final = events[-1].response
    assert "".join(d.delta for d in deltas) == final.output_text == whole.output_text
    assert final.usage.output_tokens == 12 and final.output[0].id == item_id
    got = client.responses.retrieve(final.id)     # stored by default, as streamed
    assert got.model_dump() == final.model_dump()


def test_previous_response_id_get_delete_and_keys(keyed):
    s, st, a, b = keyed
    client = s.client(a)
    key_a = st.authenticate(a).id
    bytes0 = st.stored_bytes(key_a)
    first = _greedy(client)
    assert st.stored_bytes(key_a) > bytes0       # counted against the key's storage quota
    second = _greedy(client, input="And then?", previous_response_id=first.id)
    # The same conversation spelled out through chat completions
    chat = client.chat.completions.create(model="tiny", max_tokens=8, temperature=0, messages=[
        {"role": "user", "content": HELLO}, {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "And then?"}])
    assert second.output_text == chat.choices[0].message.content
    assert second.usage.input_tokens == chat.usage.prompt_tokens
    assert second.previous_response_id == first.id
    # Another key sees none of it
    other = s.client(b)
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        _greedy(other, previous_response_id=first.id)
    # Delete frees the bytes; then it is gone
    stored = st.stored_bytes(key_a)
    client.responses.delete(first.id)
    assert st.stored_bytes(key_a) < stored
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    # store: false keeps nothing
    r = _greedy(client, store=False)
    assert r.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)


def test_bad_input_is_a_400(keyed):
    s, _, a, _ = keyed
    client = s.client(a)
    for bad, status in (([{"type": "item_reference", "id": "x"}], 400),
                        ([{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}], 400),
                        ([{"role": "robot", "content": "hi"}], 422),   # schema errors are 422 (serve/errors.py)
                        ([], 400)):
        with pytest.raises(openai.APIStatusError) as e:
            client.responses.create(model="tiny", input=bad, max_output_tokens=4)
        assert e.value.status_code == status
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="tiny", input=HELLO, tools=[{"type": "web_search"}])
    r = httpx.get(s.url + "/v1/responses/resp_nope", headers={"Authorization": f"Bearer {a}"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(s.url + "/v1/responses", json={"model": "tiny", "input": HELLO}, headers={"x-api-key": "nope"})
    assert r.status_code == 401 and "error" in r.json()


def test_storage_quota(models, tmp_path):
    """Paid-for output is never thrown away: a response too big for the key's storage quota is returned with
    store false (whole and streamed), and once the quota is full a stored request is a 413 before it runs."""
    with Store(tmp_path, limits=StoreLimits(stored_bytes_per_owner=600)) as st:
        s = _Server(create_app(models, st, require_auth=False, poll_s=0.05))
        try:
            whole = _greedy(s.client())
            assert whole.output and whole.store is False
            events = list(_greedy(s.client(), stream=True))
            assert events[-1].type in ("response.completed", "response.incomplete")
            assert events[-1].response.store is False
            assert st.stored_bytes(None) == 0
            st.put_response(None, "resp_filler", "x" * 200, "y" * 200)
            full = st.stored_bytes(None)
        finally:
            s.stop()
    with Store(tmp_path, limits=StoreLimits(stored_bytes_per_owner=full)) as st:   # now exactly full
        s = _Server(create_app(models, st, require_auth=False, poll_s=0.05))
        try:
            billed = len(st.usage_rows())
            with pytest.raises(openai.APIStatusError) as e:
                _greedy(s.client())
            assert e.value.status_code == 413 and "quota" in e.value.message
            assert len(st.usage_rows()) == billed       # refused before anything ran or was billed
            assert _greedy(s.client(), store=False).output   # unstored answers still run
        finally:
            s.stop()


def test_stream_failure_is_an_error_event(keyed):
    s, st, a, _ = keyed
    body = {"model": "broken", "input": HELLO, "max_output_tokens": 8, "stream": True}
    with httpx.stream("POST", s.url + "/v1/responses", json=body, headers={"Authorization": f"Bearer {a}"},
                      timeout=30) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert events[0]["type"] == "response.created" and events[-1]["type"] == "error"
    assert events[-1]["message"] and events[-1]["sequence_number"] == len(events) - 1


def test_store_retention_quota_and_migration(tmp_path):
    with Store(tmp_path / "a", limits=StoreLimits(response_retention_s=0.2, stored_bytes_per_owner=2000)) as st:
        st.put_response(None, "resp_1", '{"id": "resp_1"}', "[]")
        assert st.get_response(None, "resp_1") == ('{"id": "resp_1"}', "[]")
        with pytest.raises(NotFoundError):
            st.get_response(7, "resp_1")           # another owner
        assert st.stored_bytes(None) > 0
        with pytest.raises(QuotaExceededError):
            st.put_response(None, "resp_2", "x" * 3000, "[]")
        time.sleep(0.25)
        with pytest.raises(NotFoundError):
            st.get_response(None, "resp_1")        # expired: deleted, and its bytes freed
        assert st.stored_bytes(None) == 0
        assert st.secret("s") == st.secret("s") != st.secret("t")
    # A version-3 file (with a conversation) migrates, keeping its quota count
    path = tmp_path / "old"
    path.mkdir()
    conn = sqlite3.connect(path / store_mod.DB_FILENAME)
    for statements in store_mod.MIGRATIONS[:3]:
        for sql in statements:
            conn.execute(sql)
    conn.execute("INSERT INTO owner_totals (owner, stored_bytes) VALUES (0, 123)")
    conn.execute("PRAGMA user_version = 3")
    conn.commit()
    conn.close()
    with Store(path) as st:
        assert st.schema_version() == SCHEMA_VERSION and st.stored_bytes(None) == 123
        st.put_response(None, "resp_x", "{}", "[]")
        assert st.stored_bytes(None) > 123


# --- the translations, on the objects themselves


TOOL = {"type": "function", "name": "get_weather", "description": "Weather for a city.", "strict": True,
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                       "additionalProperties": False}}
SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"],
          "additionalProperties": False}


def test_items_tools_and_formats_to_chat():
    req = ResponsesRequest.parse(json.dumps({
        "model": "tiny", "instructions": "sys", "tools": [TOOL],
        "tool_choice": {"type": "function", "name": "get_weather"},
        "reasoning": {"effort": "low"}, "max_output_tokens": 50, "parallel_tool_calls": False,
        "text": {"format": {"type": "json_schema", "name": "answer", "schema": SCHEMA, "strict": True}},
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
                  {"type": "reasoning", "id": "rs_1", "summary": []},
                  {"type": "function_call", "call_id": "call_1", "name": "get_weather",
                   "arguments": '{"city":"Paris"}'},
                  {"type": "function_call", "call_id": "call_2", "name": "get_weather",
                   "arguments": '{"city":"Rome"}'},
                  {"type": "function_call_output", "call_id": "call_1", "output": "18 C"},
                  {"type": "function_call_output", "call_id": "call_2",
                   "output": [{"type": "input_text", "text": "21 C"}]}],
    }).encode())
    body, conversation = chat_body(req, [{"role": "user", "content": "earlier"}])
    assert body["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "parameters": TOOL["parameters"], "description": "Weather for a city.", "strict": True}}]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert body["response_format"] == {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA,
                                                                              "strict": True}}
    assert (body["reasoning_effort"], body["max_tokens"], body["parallel_tool_calls"]) == ("low", 50, False)
    assert body["messages"][0] == {"role": "system", "content": "sys"} and body["messages"][1:] == conversation
    assert conversation == [
        {"role": "user", "content": "earlier"},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
            {"id": "call_2", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "21 C"}]
    off = ResponsesRequest.parse(b'{"input": "hi", "reasoning": {"effort": "none"}, '
                                 b'"text": {"format": {"type": "text"}}}')
    body, _ = chat_body(off, [])
    assert body["thinking"] == {"type": "disabled"} and "reasoning_effort" not in body and "response_format" not in body


def test_tool_calls_and_reasoning_to_items():
    message = {"role": "assistant", "content": None, "reasoning_content": "think",
               "tool_calls": [{"id": "call_1", "type": "function",
                               "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}
    whole = Output()
    whole.feed_message(message, "tool_calls")
    assert [i["type"] for i in whole.items] == ["reasoning", "function_call"]
    assert whole.items[0]["content"] == [{"type": "reasoning_text", "text": "think"}]
    assert {k: whole.items[1][k] for k in ("call_id", "name", "arguments", "status")} == {
        "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}', "status": "completed"}
    assert whole.reply() == {"role": "assistant", "content": None, "tool_calls": message["tool_calls"],
                             "reasoning_content": "think"}   # the replay rule: reasoning behind calls is kept
    # The same message streamed as chat deltas gives the same items and typed events
    streamed = Output()
    def delta(d, finish=None):
        return {"choices": [{"index": 0, "delta": d, "finish_reason": finish}]}

    def args(fragment):
        return delta({"tool_calls": [{"index": 0, "function": {"arguments": fragment}}]})
    chunks = [delta({"reasoning_content": "th"}), delta({"reasoning_content": "ink"}),
              delta({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                     "function": {"name": "get_weather", "arguments": ""}}]}),
              args('{"city": '), args('"Paris"}'), delta({}, "tool_calls")]
    events = [e for c in chunks for e in streamed.feed_chunk(c)] + streamed.close()
    strip = [{k: v for k, v in i.items() if k != "id"} for i in streamed.items]
    assert strip == [{k: v for k, v in i.items() if k != "id"} for i in whole.items]
    assert [e["type"] for e in events] == [
        "response.output_item.added", "response.content_part.added", "response.reasoning_text.delta",
        "response.reasoning_text.delta", "response.reasoning_text.done", "response.content_part.done",
        "response.output_item.done", "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done", "response.output_item.done"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e.get("output_index") for e in events if e["type"].startswith("response.function")] == [1, 1, 1]


# --- one conversation through all three APIs


CONVERSATION = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi! How can I help?"},
                {"role": "user", "content": "Tell me a story."}]


def test_three_apis_same_greedy_tokens(models, tmp_path):
    """Thinking pinned off (the R1-like template forces a think block open: each API must close it alike)."""
    with Store(tmp_path) as st:
        s = _Server(create_app(models, st, require_auth=False, poll_s=0.05))
        try:
            chat = s.client().chat.completions.create(
                model="tiny-r1", messages=[{"role": "system", "content": "Be kind."}, *CONVERSATION], max_tokens=10,
                temperature=0, extra_body={"thinking": {"type": "disabled"}})
            msg = anthropic.Anthropic(base_url=s.url + "/anthropic", api_key="none", max_retries=0).messages.create(
                model="tiny-r1", system="Be kind.", messages=CONVERSATION, max_tokens=10,
                thinking={"type": "disabled"}, extra_body={"temperature": 0})
            resp = s.client().responses.create(
                model="tiny-r1", instructions="Be kind.", input=CONVERSATION, max_output_tokens=10, temperature=0,
                reasoning={"effort": "none"})
        finally:
            s.stop()
    text = chat.choices[0].message.content
    assert "reasoning_content" not in (chat.choices[0].message.model_extra or {})
    assert [b.type for b in msg.content] == ["text"] and msg.content[0].text == text
    assert [i.type for i in resp.output] == ["message"] and resp.output_text == text
    assert chat.usage.completion_tokens == msg.usage.output_tokens == resp.usage.output_tokens == 10
    assert (chat.usage.prompt_tokens == resp.usage.input_tokens
            == msg.usage.input_tokens + msg.usage.cache_read_input_tokens)


# --- function tools and JSON schemas end to end: a random model held to valid output by the chat grammar


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory):
    models = {"tool": long_served("tool")}
    with Store(tmp_path_factory.mktemp("tools")) as st:
        s = _Server(create_app(models, st, require_auth=False, poll_s=0.05))
        yield s
        s.stop()
    models["tool"].scheduler.stop(timeout=5)


CITY = {"type": "function", "name": "get_weather", "description": "Weather for a city.", "strict": True,
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
                       "required": ["city"], "additionalProperties": False}}
OK_SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
             "additionalProperties": False}


def test_function_tool_stream_and_output_loop(tool_server):
    client = tool_server.client()
    kw = dict(model="tool", input="Weather in Paris?", tools=[CITY], temperature=0, max_output_tokens=200,
              tool_choice={"type": "function", "name": "get_weather"})
    r = client.responses.create(**kw)
    assert r.status == "completed"
    (fc,) = [i for i in r.output if i.type == "function_call"]
    assert fc.name == "get_weather" and json.loads(fc.arguments) in ({"city": "Paris"}, {"city": "Rome"})
    events = list(client.responses.create(**kw, stream=True))
    assert events[-1].type == "response.completed"
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert deltas == done.arguments == fc.arguments
    assert [(i.type, getattr(i, "arguments", None)) for i in events[-1].response.output] == \
        [(i.type, getattr(i, "arguments", None)) for i in r.output]
    # The loop: the call's output continues the stored response
    answer = client.responses.create(model="tool", previous_response_id=r.id, tools=[CITY], tool_choice="none",
                                     input=[{"type": "function_call_output", "call_id": fc.call_id, "output": "18 C"}],
                                     temperature=0, max_output_tokens=8)
    assert [i.type for i in answer.output] == ["message"] and answer.status == "incomplete"
    assert answer.usage.input_tokens > r.usage.input_tokens


def test_json_schema_stream_and_not(tool_server):
    client = tool_server.client()
    kw = dict(model="tool", input="Is it sunny?", temperature=0,
              text={"format": {"type": "json_schema", "name": "answer", "schema": OK_SCHEMA, "strict": True}})
    r = client.responses.create(**kw)
    assert r.status == "completed" and r.text.format.type == "json_schema"
    value = json.loads(r.output_text)
    assert set(value) == {"ok"} and isinstance(value["ok"], bool)
    events = list(client.responses.create(**kw, stream=True))
    assert events[-1].type == "response.completed" and events[-1].response.output_text == r.output_text

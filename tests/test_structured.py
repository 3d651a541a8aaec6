"""Tools, structured output and thinking budgets: the grammar constraint (engine/grammar.py), the tool format
(nanoseek/toolcall.py), and real clients (openai, LangChain, LiteLLM) against the server on the built-in model.

Every JSON output that ends with `stop` is checked with jsonschema-rs, never with the grammar engine that
produced it.
"""

import json
import os
import random
import sys

import jsonschema_rs
import pytest
import torch

from nanoseek.engine.grammar import Grammar, GrammarCompiler, any_json_object, json_schema, lark
from nanoseek.errors import BadInputError
from nanoseek.toolcall import CallStream, Function, call_grammar, format_call, parse_calls, render_generic
from test_chat import CHATML, make_tokenizer

# ---------------------------------------------------------------------------------------------------------
# Without a model: a byte-level tokenizer (every byte one token)


@pytest.fixture(scope="module")
def byte_tok():
    return make_tokenizer(CHATML)


@pytest.fixture(scope="module")
def compiler(byte_tok):
    return GrammarCompiler(byte_tok, len(byte_tok), [byte_tok.eos_token_id])


def _ids(tok, text):
    return tok.encode(text, add_special_tokens=False)


def _allowed_text(tok, mask):
    return {tok.decode([i]) for i in mask.nonzero().flatten().tolist() if i < 256}


def test_constraint_masks_follow_the_schema_and_roll_back(compiler, byte_tok):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
              "additionalProperties": False}
    c = compiler.constraint(Grammar(json_schema(schema)))
    first = c.allowed()
    assert _allowed_text(byte_tok, first) == {"{"}
    for t in _ids(byte_tok, '{"a": 1'):
        c.advance(t)
    mid = c.allowed()
    assert "}" in _allowed_text(byte_tok, mid) and "x" not in _allowed_text(byte_tok, mid)
    assert not mid[byte_tok.eos_token_id]
    c.rollback(6)   # back to just "{"
    assert _allowed_text(byte_tok, c.allowed()) == {'"'}
    for t in _ids(byte_tok, '"a": 12}'):
        c.advance(t)
    done = c.allowed()
    assert done[byte_tok.eos_token_id] and int(done.sum()) == 1   # complete: only the end token


def test_constraint_waits_for_reasoning_to_close_and_forces_the_close_at_the_budget(compiler, byte_tok):
    c = compiler.constraint(Grammar(any_json_object(), reasoning="open"))
    for t in _ids(byte_tok, "hmm </thi"):
        assert c.allowed() is None   # thinking stays free
        c.advance(t)
    for t in _ids(byte_tok, "nk>\n"):
        c.advance(t)
    assert _allowed_text(byte_tok, c.allowed()) == {"{", " ", "\n", "\r", "\t"}   # a blank line, or the JSON
    c.rollback(3)                    # back inside "</thi" + "n": the grammar is off again
    assert c.allowed() is None and c.active is False
    # a spent budget forces "\n</think>" token by token, then the grammar takes over
    b = compiler.constraint(Grammar(any_json_object(), reasoning="open", reasoning_budget=3))
    out = []
    for t in _ids(byte_tok, "abc"):
        assert b.allowed() is None
        b.advance(t)
    while (m := b.allowed()) is not None and int(m.sum()) == 1:
        tok = int(m.nonzero()[0])
        out.append(tok)
        b.advance(tok)
    assert byte_tok.decode(out) == "\n</think>" and b.active
    # "maybe": an output that does not open a think block is held by the grammar from its first token
    m = compiler.constraint(Grammar(any_json_object(), reasoning="maybe"))
    m.advance(_ids(byte_tok, "{")[0])
    assert m.active and '"' in _allowed_text(byte_tok, m.allowed())


def test_unenforceable_keyword_is_named_with_its_path(compiler):
    schema = {"type": "object", "properties": {"a": {"not": {"type": "string"}}, "not": {"type": "integer"}}}
    with pytest.raises(BadInputError) as e:
        compiler.check(json_schema(schema), schema, "response_format.json_schema.schema")
    assert "response_format.json_schema.schema.properties.a.not" in str(e.value)
    assert ".properties.not" not in str(e.value).replace(".properties.a.not", "")   # a property named "not" is fine


CALLS_TEXT = ('Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris \\"\\u00e9\\"", '
              '"days": [1, 2]}}\n</tool_call>\n<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>')


def test_call_stream_agrees_with_parse_for_every_cut():
    content, calls, cut = parse_calls(CALLS_TEXT)
    assert content == "Let me check." and not cut
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": 'Paris "é"', "days": [1, 2]}), ("now", {})]
    rng = random.Random(0)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(CALLS_TEXT)), rng.randint(1, 30)))
        pieces = [CALLS_TEXT[a:b] for a, b in zip([0, *cuts], [*cuts, len(CALLS_TEXT)])]
        s, events = CallStream(), []
        for p in pieces:
            events += s.feed(p)
        events += s.finish()
        assert "".join(e[1] for e in events if e[0] == "content") == "Let me check."
        got: dict[int, list] = {}
        for _, index, cid, name, args in (e for e in events if e[0] == "call"):
            if cid is not None:
                assert index not in got and name   # id and name come first, once
                got[index] = [name, ""]
            got[index][1] += args
        assert [tuple(v) for _, v in sorted(got.items())] == [(c.name, c.arguments) for c in calls]


def test_a_call_cut_by_max_tokens_is_dropped():
    text = CALLS_TEXT[:CALLS_TEXT.rindex("</tool_call>") - 3]
    content, calls, cut = parse_calls(text)
    assert cut and [c.name for c in calls] == ["get_weather"]
    from nanoseek.chat import Prompt
    from nanoseek.serve.structured import ChatPlan, read_reply
    reply = read_reply(ChatPlan(Prompt([1], "", False), parse_tools=True), text, "length")
    assert reply.finish_reason == "length" and [c.function.name for c in reply.tool_calls] == ["get_weather"]
    whole = read_reply(ChatPlan(Prompt([1], "", False), parse_tools=True), CALLS_TEXT, "stop")
    assert whole.finish_reason == "tool_calls" and len(whole.tool_calls) == 2


def test_tool_grammar_accepts_exactly_declared_calls(compiler, byte_tok):
    fns = [Function("add", None, {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"],
                                  "additionalProperties": False})]
    good = format_call("add", '{"x": 3}')
    for text, ok in [(good, True), (good + "\n" + good, True), (format_call("sub", '{"x": 3}'), False),
                     (format_call("add", '{"x": "3"}'), False)]:
        c = compiler.constraint(Grammar(lark(call_grammar(fns, forced=True))))
        valid = True
        for t in _ids(byte_tok, text):
            if not c.allowed()[t]:
                valid = False
                break
            c.advance(t)
        assert valid == ok, text
    single = compiler.constraint(Grammar(lark(call_grammar(fns, forced=True, parallel=False))))
    for t in _ids(byte_tok, good):
        single.advance(t)
    assert int(single.allowed().sum()) == 1   # one call only: nothing but the end may follow


def test_generic_format_renders_tool_history_in_a_template_without_tools(byte_tok):
    from nanoseek.chat import render_prompt
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"x":1}'}}
    msgs = [{"role": "user", "content": "add 1"}, {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": "2", "tool_call_id": "call_1"}]
    text = render_prompt(byte_tok, render_generic(msgs, [Function("add")])).text
    assert '<tool_call>\n{"name": "add", "arguments": {"x": 1}}\n</tool_call>' in text
    assert "<|im_start|>user\n<tool_response>\n2\n</tool_response>" in text
    assert text.startswith("<|im_start|>system\n# Tools") and '"name": "add"' in text


# ---------------------------------------------------------------------------------------------------------
# The built-in model behind the server


@pytest.fixture(scope="module")
def smol():
    from nanoseek.weights.registry import load_model
    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def server(smol):
    from nanoseek.engine.scheduler import Scheduler
    from nanoseek.serve.app import ServedModel, create_app
    from test_serve import _Server
    sched = Scheduler(smol.model, smol.tokenizer, max_batch=8, max_len=2048, max_queue=64).start()
    sm = ServedModel("smol", smol.tokenizer, sched, sched.max_len)
    s = _Server(create_app({"smol": sm}, None, require_auth=False))
    yield s
    s.stop()
    sched.stop(timeout=5)


WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                   "additionalProperties": False}, "strict": True}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_openai_parse_with_a_nested_pydantic_model(server):
    from pydantic import BaseModel, Field

    class Address(BaseModel):
        city: str = Field(min_length=2, title="City")
        zip_code: int = Field(ge=0)

    class Person(BaseModel):
        name: str = Field(min_length=1)
        age: int = Field(ge=0, le=150)
        home: Address
        tags: list[str] = Field(max_length=3)

    r = server.client().chat.completions.parse(model="smol", messages=[{"role": "user", "content":
                                               "Describe a person who lives in Paris."}],
                                               response_format=Person, temperature=0.7, seed=1, n=2)
    schema = Person.model_json_schema()
    assert "$defs" in schema and "$ref" in json.dumps(schema)
    assert len(r.choices) == 2   # n > 1: each choice under its own constraint
    for choice in r.choices:
        assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Person)
        jsonschema_rs.validate(schema, json.loads(choice.message.content))


def test_unenforceable_schema_is_a_400_naming_the_keyword_path(server):
    import openai
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": {
        "type": "object", "properties": {"a": {"not": {"type": "string"}}}}}}
    with pytest.raises(openai.BadRequestError) as e:
        server.client().chat.completions.create(model="smol", messages=ASK, response_format=fmt)
    assert "response_format.json_schema.schema.properties.a.not" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        server.client().chat.completions.create(model="smol", messages=ASK, max_tokens=5000)
    assert "5000" in e.value.message and "2048" in e.value.message


def _tool_loop(client, stream: bool):
    kw = dict(model="smol", tools=WEATHER, temperature=0, max_tokens=60, parallel_tool_calls=False)
    if not stream:
        first = client.chat.completions.create(messages=ASK, tool_choice="required", **kw)
        msg, finish = first.choices[0].message, first.choices[0].finish_reason
        calls = [(c.id, c.function.name, c.function.arguments) for c in msg.tool_calls]
    else:
        parts: dict[int, list] = {}
        finish = None
        for ch in client.chat.completions.create(messages=ASK, tool_choice="required", stream=True, **kw):
            if not ch.choices:
                continue
            for tc in ch.choices[0].delta.tool_calls or []:
                if tc.id is not None:
                    assert tc.function.name and tc.index not in parts   # id and name first
                    parts[tc.index] = [tc.id, tc.function.name, ""]
                parts[tc.index][2] += tc.function.arguments or ""
            finish = ch.choices[0].finish_reason or finish
        calls = [tuple(v) for _, v in sorted(parts.items())]
    assert finish == "tool_calls" and calls and all(c[0].startswith("call_") for c in calls)
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": i, "type": "function", "function": {"name": n, "arguments": a}} for i, n, a in calls]}]
    history += [{"role": "tool", "tool_call_id": i, "content": "18 C and sunny"} for i, _, _ in calls]
    final = client.chat.completions.create(messages=history, tool_choice="none", **kw)
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls
    return [(n, a) for _, n, a in calls]


def test_tool_loop_streamed_and_not_agree(server):
    client = server.client()
    whole = _tool_loop(client, stream=False)
    assert whole[0][0] == "get_weather" and isinstance(json.loads(whole[0][1])["city"], str)
    assert _tool_loop(client, stream=True) == whole   # streamed deltas reassemble to the non-streamed calls


def test_auto_tool_choice_and_a_cut_call(server):
    client = server.client()
    r = client.chat.completions.create(model="smol", messages=ASK, tools=WEATHER, temperature=0, max_tokens=40)
    c = r.choices[0]
    assert (c.finish_reason == "tool_calls") == bool(c.message.tool_calls)
    cut = client.chat.completions.create(model="smol", messages=ASK, tools=WEATHER, tool_choice="required",
                                         temperature=0, max_tokens=8)
    assert cut.choices[0].finish_reason == "length" and not cut.choices[0].message.tool_calls


def test_langchain_bind_tools_and_structured_output(server):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    llm = ChatOpenAI(model="smol", base_url=server.url + "/v1", api_key="none", temperature=0, max_tokens=60,
                     max_retries=0)

    def get_weather(city: str) -> str:
        """Current weather of a city."""
        return "18 C"

    bound = llm.bind_tools([get_weather], tool_choice="required")
    ai = bound.invoke([HumanMessage("What is the weather in Paris?")])
    assert ai.tool_calls and ai.tool_calls[0]["name"] == "get_weather"
    follow = bound.bind(tool_choice="none").invoke(
        [HumanMessage("What is the weather in Paris?"), ai, ToolMessage("18 C", tool_call_id=ai.tool_calls[0]["id"])])
    assert isinstance(follow.content, str)

    class City(BaseModel):
        name: str = Field(description="The city's name")
        population: int = Field(ge=0)

    city = llm.with_structured_output(City, method="json_schema").invoke("Tell me about Lyon.")
    assert isinstance(city, City)


def test_litellm_tools(server):
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    import litellm
    r = litellm.completion(model="openai/smol", api_base=server.url + "/v1", api_key="none", messages=ASK,
                           tools=WEATHER, tool_choice="required", parallel_tool_calls=False, temperature=0,
                           max_tokens=40)
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert "city" in json.loads(call.function.arguments)


SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 5}]},
    {"type": "number", "minimum": -1.5, "maximum": 2.5},
    {"type": "string", "pattern": "^[a-z]{3}-[0-9]{2}$"},
    {"type": "object", "properties": {"quote": {"type": "string", "minLength": 3}}, "required": ["quote"]},
    {"$defs": {"pt": {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                      "required": ["x", "y"], "additionalProperties": False}},
     "type": "object", "properties": {"a": {"$ref": "#/$defs/pt"}, "b": {"$ref": "#/$defs/pt"}},
     "required": ["a", "b"], "additionalProperties": False},
    {"type": "boolean"},
    {"type": "object", "properties": {"items": {"type": "array", "items": {
        "type": "object", "properties": {"sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}},
        "required": ["sku", "qty"]}, "maxItems": 2}}, "required": ["items"]},
    {"const": "yes"},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "note": {"type": ["string", "null"]}},
     "required": ["ok", "note"], "additionalProperties": False},
    {"type": "string", "format": "date"},
    {"type": "integer", "exclusiveMinimum": 10, "maximum": 99},
    {"type": "object", "properties": {"tree": {"type": "object", "properties": {"leaf": {"type": "object", "properties": {
        "v": {"type": "string", "enum": ["a\"b", "c\\d", "é\n"]}}, "required": ["v"]}}, "required": ["leaf"]}},
     "required": ["tree"]},
    {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "items": False},
    {"oneOf": [{"type": "object", "properties": {"kind": {"const": "a"}}, "required": ["kind"],
                "additionalProperties": False},
               {"type": "object", "properties": {"kind": {"const": "b"}, "n": {"type": "integer"}},
                "required": ["kind", "n"], "additionalProperties": False}]},
    {"type": "object", "additionalProperties": {"type": "integer"}, "maxProperties": 3},
    {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
    {"type": "object", "properties": {"email": {"type": "string", "format": "email"}}, "required": ["email"]},
    {"type": "number", "multipleOf": 0.5, "minimum": 0, "maximum": 10},
]


def test_twenty_schemas_in_one_batch_with_free_rows_validate(smol):
    """One Engine.generate pass: 21 constrained rows, free rows and a stop string in the same batch. Every
    constrained output that ends with `stop` must validate (jsonschema-rs)."""
    from nanoseek.chat import render_prompt
    from nanoseek.engine.generate import Engine
    from nanoseek.engine.sampling import SamplingParams
    eng = Engine(smol.model, smol.tokenizer, max_batch=32)
    comp = GrammarCompiler(smol.tokenizer, eng.vocab_size, eng.eos_token_ids)
    prompts, constraints = [], []
    for s in SCHEMAS:
        comp.check(json_schema(s), s)
        prompts.append(render_prompt(smol.tokenizer, [{"role": "user", "content":
                                     f"Reply with JSON matching this schema: {json.dumps(s)}"}]).ids)
        constraints.append(comp.constraint(Grammar(json_schema(s))))
    free = render_prompt(smol.tokenizer, [{"role": "user", "content": "Count to five."}]).ids
    prompts += [free, free]
    constraints += [None, None]
    params = [SamplingParams(temperature=0.7, seed=i, max_tokens=48) for i in range(len(SCHEMAS))]
    params += [SamplingParams(temperature=0, max_tokens=24), SamplingParams(temperature=0, max_tokens=24, stop=["."])]
    outs = eng.generate(prompts, params, constraints=constraints)
    stopped = 0
    for s, out in zip(SCHEMAS, outs):
        assert out.finish_reason in ("stop", "length"), out.error
        if out.finish_reason == "stop":
            stopped += 1
            jsonschema_rs.validate(s, json.loads(out.text))
    assert stopped >= len(SCHEMAS) // 2
    assert "." not in outs[-1].text and outs[-1].finish_reason == "stop"
    alone = eng.generate([free], SamplingParams(temperature=0, max_tokens=24))[0]
    assert alone.token_ids == outs[-2].token_ids   # a free row is untouched by its constrained neighbours

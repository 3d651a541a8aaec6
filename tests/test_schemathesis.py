"""Property-based fuzzing of the server's OpenAPI spec (schemathesis): no generated request gets a 5xx.

schemathesis reads /openapi.json from the app itself and calls it in-process (ASGI transport): valid bodies
and near-valid ones for every /v1 route, including streams. The model is a tiny random one served with a
64-token context and a 16-request queue, so whatever max_tokens, n and prompt list a generated body asks for,
generation stays a few dozen steps of at most 16 sequences.
Afterwards the server must still answer normally: fuzzing must not leave rows or queue slots behind.
"""

import json
import time

import jsonschema_rs
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from starlette.testclient import TestClient

from nanoseek.serve.anthropic import CountTokensRequest, MessagesRequest, Signer, to_chat
from nanoseek.serve.app import create_app
from nanoseek.serve.errors import ApiError
from nanoseek.serve.schemas import ChatCompletionRequest, CompletionRequest, TokenizeRequest
from test_chat import CHATML
from test_schemas import USER
from test_serve import _served

CONTEXT = 64


@pytest.fixture(scope="module")
def served():
    # A short queue bounds the work one fuzzed body can ask for (prompts × n beyond it is a 400).
    models = {"tiny": _served("tiny", CHATML, max_batch=8, context=CONTEXT, max_queue=16)}
    yield models
    models["tiny"].scheduler.stop(timeout=5)


@pytest.fixture(scope="module")
def app(served):
    return create_app(served, None, require_auth=False, poll_s=0.05)


@pytest.fixture(scope="module")
def api_schema(app):
    # The bare routes are the same handlers as the /v1 ones: fuzz each handler once.
    return schemathesis.openapi.from_asgi("/openapi.json", app).include(path_regex="^/v1/")


# Listed here rather than discovered by schemathesis' pytest plugin, whose lazy loader does not run under
# pytest 9; test_every_operation_is_fuzzed keeps the list complete.
OPERATIONS = [("/v1/chat/completions", "POST"), ("/v1/completions", "POST"), ("/v1/tokenize", "POST"),
              ("/v1/detokenize", "POST"), ("/v1/models", "GET"), ("/v1/health", "GET"), ("/v1/metrics", "GET"),
              ("/v1/user/balance", "GET"), ("/v1/models/{model_id}", "GET"), ("/v1/messages", "POST"),
              ("/v1/messages/count_tokens", "POST"), ("/v1/responses", "POST"), ("/v1/responses/{response_id}", "GET"),
              ("/v1/responses/{response_id}", "DELETE")]


@pytest.mark.parametrize("path,method", OPERATIONS)
def test_no_server_errors(api_schema, path, method):
    # 25 bodies per route (the GET routes take no input and stop at one): about 15 s for all of them. Anthropic's
    # Messages gets 50: about 1 in 6 of its bodies reach the handler (schemathesis sends whole floats such as 2.0
    # for the required max_tokens, which strict parsing refuses), so 25 would all miss in ~1 run of 100.
    @given(case=api_schema[path][method].as_strategy())
    @settings(max_examples=50 if path == "/v1/messages" else 25, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate],
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
    def fuzz(case):
        statuses.append(case.call_and_validate(checks=[not_a_server_error]).status_code)

    statuses = []
    fuzz()
    if "{" in path:   # a random id names no served model (nor stored response): the handler's 404, never a 5xx
        assert set(statuses) <= {200, 404}, statuses
    else:
        assert 200 in statuses, statuses      # the fuzzer got past validation, into the handler proper


@pytest.mark.parametrize("body", [
    {"messages": [{"role": "assistant", "content": "Once", "prefix": True}]},   # a prefix with nothing before it
    {"messages": [{"role": "user", "content": "hi"}], "top_p": 5e-324},         # zero once rounded to float32
    {"messages": [{"role": "user", "content": "hi"}], "repetition_penalty": 5e-324},
    {"messages": [{"role": "user", "content": "hi"}], "temperature": 3e-122},
    {"messages": [{"role": "user", "content": "hi"}], "temperature": 1e-40},   # subnormal in float32
    {"messages": [{"role": "user", "content": "hi"}], "top_p": 1e-45},
])
def test_what_fuzzing_found_is_a_400(app, body):
    with TestClient(app) as client:
        r = client.post("/v1/chat/completions", json={"max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] in {"messages[0].prefix", "top_p", "repetition_penalty", "temperature"}


def test_every_operation_is_fuzzed(api_schema):
    spec_ops = {(op.path, op.method.upper()) for op in (r.ok() for r in api_schema.get_all_operations())}
    assert spec_ops == set(OPERATIONS)


def test_spec_publishes_request_bodies(app):
    """The generating routes read their own bodies; the spec must still describe them, or a fuzzer (and a
    client generator) would see routes that take nothing."""
    spec = app.openapi()
    for path, model in (("/v1/chat/completions", "ChatCompletionRequest"), ("/v1/completions", "CompletionRequest"),
                        ("/v1/tokenize", "TokenizeRequest"), ("/v1/detokenize", "DetokenizeRequest")):
        ref = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref == f"#/components/schemas/{model}"
    schemas = spec["components"]["schemas"]
    assert "messages" in schemas["ChatCompletionRequest"]["required"]
    # An empty list is a 400: saying so keeps the chat fuzz case from spending its 25 bodies on it.
    assert schemas["ChatCompletionRequest"]["properties"]["messages"]["minItems"] == 1
    refs = {v.split("/")[-1] for v in _refs(spec)}
    assert refs <= set(schemas), refs - set(schemas)     # every reference resolves


@pytest.mark.parametrize("body", [
    {"prompt": "hi"}, {"messages": USER}, {"prompt": "hi", "messages": None}, {"prompt": None, "messages": USER},
    {}, {"prompt": None}, {"prompt": None, "messages": None}, {"prompt": "hi", "messages": USER},
])
def test_tokenize_spec_says_exactly_one_input(app, body):
    """The published tokenize schema accepts a body exactly when the parser does (one of prompt/messages):
    otherwise a fuzzer builds mostly bodies with both or neither, all rightly refused, and never reaches
    the handler (test_no_server_errors then sees no 200)."""
    spec = app.openapi()
    validator = jsonschema_rs.validator_for({"components": spec["components"],
                                             "$ref": "#/components/schemas/TokenizeRequest"})
    try:
        TokenizeRequest.parse(body)
        parsed = True
    except ApiError as err:
        assert err.status == 400 and "exactly one" in err.message, err.body()
        parsed = False
    assert validator.is_valid(body) == parsed, body


def _published(app, model: str):
    spec = app.openapi()
    return jsonschema_rs.validator_for({"components": spec["components"], "$ref": f"#/components/schemas/{model}"})


def _anthropic(cls):
    # what the route runs before the handler proper: the body's parse, then its translation to a chat request
    return lambda body: to_chat(cls.parse(json.dumps(body).encode()), Signer(None))


PARSERS = {"ChatCompletionRequest": ChatCompletionRequest.parse, "CompletionRequest": CompletionRequest.parse,
           "MessagesRequest": _anthropic(MessagesRequest), "CountTokensRequest": _anthropic(CountTokensRequest)}
TOOL = {"type": "function", "function": {"name": "f"}}
A_TOOL = {"name": "f", "input_schema": {"type": "object"}}
SAY = {"role": "user", "content": "hi"}


@pytest.mark.parametrize("model,body", [
    # rules between fields, checked in code
    ("ChatCompletionRequest", {"messages": USER, "stream_options": {"include_usage": True}}),
    ("ChatCompletionRequest", {"messages": USER, "stream_options": {}, "stream": False}),
    ("ChatCompletionRequest", {"messages": USER, "stream_options": {}, "stream": True}),
    ("ChatCompletionRequest", {"messages": USER, "top_logprobs": 2}),
    ("ChatCompletionRequest", {"messages": USER, "top_logprobs": 2, "logprobs": False}),
    ("ChatCompletionRequest", {"messages": USER, "top_logprobs": 2, "logprobs": True}),
    ("ChatCompletionRequest", {"messages": USER, "tool_choice": "auto"}),
    ("ChatCompletionRequest", {"messages": USER, "tool_choice": "required", "tools": []}),
    ("ChatCompletionRequest", {"messages": USER, "tool_choice": "none"}),
    ("ChatCompletionRequest", {"messages": USER, "tool_choice": "auto", "tools": [TOOL]}),
    # chat's own Tool (not Anthropic's, which has the same name), with _check_tools' name rule
    ("ChatCompletionRequest", {"messages": USER, "tools": [{"type": "function", "function": {"name": "a b"}}]}),
    ("ChatCompletionRequest", {"messages": USER, "tools": [{"type": "function", "function": {"name": ""}}]}),
    # the sampler's float32 floor
    ("ChatCompletionRequest", {"messages": USER, "top_p": 1e-40}),
    ("ChatCompletionRequest", {"messages": USER, "top_p": 2e-38}),
    ("CompletionRequest", {"prompt": "hi", "repetition_penalty": 1e-40}),
    ("CompletionRequest", {"prompt": "hi", "repetition_penalty": 1e39}),
    ("CompletionRequest", {"prompt": "hi", "stream_options": {}}),
    # no empty list of prompts or of token ids
    ("CompletionRequest", {"prompt": []}), ("CompletionRequest", {"prompt": [[]]}),
    ("CompletionRequest", {"prompt": [[1], []]}), ("CompletionRequest", {"prompt": [[1], [2]]}),
    ("CompletionRequest", {"prompt": [""]}), ("CompletionRequest", {"prompt": [3]}),
    # Anthropic: which blocks each role sends, tool_choice and thinking rules, the tool name, top_p's floor
    ("MessagesRequest", {"max_tokens": 5, "messages": [
        SAY, {"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "t"}]}]}),
    ("MessagesRequest", {"max_tokens": 5, "messages": [
        {"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]}),
    ("MessagesRequest", {"max_tokens": 5, "messages": [
        {"role": "user", "content": [{"type": "thinking", "thinking": "x", "signature": "y"}]}]}),
    ("MessagesRequest", {"max_tokens": 5, "messages": [
        SAY, {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "ok"}]}]}),
    ("MessagesRequest", {"max_tokens": 5, "messages": [SAY], "tool_choice": {"type": "any"}}),
    ("MessagesRequest", {"max_tokens": 5, "messages": [SAY], "tool_choice": {"type": "tool", "name": "f"}}),
    ("MessagesRequest", {"max_tokens": 5, "messages": [SAY], "tool_choice": {"type": "tool"}, "tools": [A_TOOL]}),
    ("MessagesRequest", {"max_tokens": 5, "messages": [SAY], "tool_choice": {"type": "tool", "name": ""},
                         "tools": [A_TOOL]}),
    ("MessagesRequest", {"max_tokens": 5, "messages": [SAY], "tool_choice": {"type": "tool", "name": None},
                         "tools": [A_TOOL]}),
    ("MessagesRequest", {"max_tokens": 5, "messages": [SAY], "tool_choice": {"type": "tool", "name": "f"},
                         "tools": [A_TOOL]}),
    ("MessagesRequest", {"max_tokens": 5, "messages": [SAY], "tool_choice": {"type": "auto"}}),
    ("MessagesRequest", {"max_tokens": 5, "messages": [SAY], "thinking": {"type": "enabled"}}),
    ("MessagesRequest", {"max_tokens": 5, "messages": [SAY], "thinking": {"type": "enabled", "budget_tokens": 2}}),
    ("MessagesRequest", {"max_tokens": 5, "messages": [SAY], "thinking": {"type": "adaptive"}}),
    ("MessagesRequest", {"max_tokens": 5, "messages": [SAY], "tools": [{**A_TOOL, "name": "a.b"}]}),
    ("MessagesRequest", {"max_tokens": 5, "messages": [SAY], "top_p": 1e-40}),
    # count_tokens: max_tokens may be left out, and keeps its rules when given
    ("CountTokensRequest", {"messages": [SAY]}), ("CountTokensRequest", {"messages": [SAY], "max_tokens": 0}),
    ("MessagesRequest", {"messages": [SAY]}),
])
def test_spec_states_the_parsers_rules(app, model, body):
    """The published schema accepts each of these bodies exactly when the server's parsing does: a rule the
    spec leaves out makes a fuzzer (test_no_server_errors) spend its bodies on rightly refused requests."""
    try:
        PARSERS[model](body)
        parsed = True
    except ApiError as err:
        assert err.status in (400, 422), err.body()
        parsed = False
    assert _published(app, model).is_valid(body) == parsed, body


def test_count_tokens_publishes_its_own_body(app):
    paths = app.openapi()["paths"]
    body = paths["/v1/messages/count_tokens"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"] == "#/components/schemas/CountTokensRequest"


def _refs(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref":
                yield v
            else:
                yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)


def test_server_still_serves_after_fuzzing(app, served):
    sched = served["tiny"].scheduler
    deadline = time.monotonic() + 10
    while sched.stats()["running"] or sched.stats()["waiting"]:   # dropped fuzz streams end within a step
        assert time.monotonic() < deadline, sched.stats()
        time.sleep(0.05)
    with TestClient(app) as client:
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                      "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3

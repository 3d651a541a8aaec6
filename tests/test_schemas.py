"""The HTTP contract layer (nanoseek/serve/schemas.py, serve/errors.py), without a server.

Covers: bodies real clients send (DeepSeek's docs, the OpenAI SDK, `vllm bench serve`) parse; known but
unsupported parameters are a 400 naming them; wrong types are a 422, out-of-range values a 400 in
SamplingParams' words; usage stays consistent; responses and stream chunks have the exact JSON shapes
clients parse; errors are OpenAI-shaped. The last section replays all of it through the real OpenAI SDK
when it happens to be installed (it is not a dependency).
"""

import json

import pytest

from nanoseek.engine.sampling import SamplingParams
from nanoseek.errors import BadInputError, NanoseekError, NotFoundError, UnsupportedError
from nanoseek.serve.errors import SCHEMA_STATUS, ApiError, ErrorResponse, error_response
from nanoseek.serve.schemas import (SSE_DONE, SSE_KEEPALIVE, ChatChoice, ChatChunkChoice, ChatCompletion,
                                    ChatCompletionChunk, ChatCompletionRequest, ChatDelta, ChatMessage,
                                    Completion, CompletionChoice, CompletionRequest, DetokenizeRequest,
                                    ModelCard, ModelList, TokenizeRequest, TokenizeResponse, Usage, choice_params,
                                    sse_event, to_sampling_params)

USER = [{"role": "user", "content": "hi"}]


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.parse({"model": "m", "messages": USER, **fields})


def refused(cls, body) -> ApiError:
    with pytest.raises(ApiError) as info:
        cls.parse(body)
    err = info.value
    assert set(err.body()["error"]) == {"message", "type", "param", "code"}
    return err


def sampling_message(**params) -> str:
    """What SamplingParams.validate() itself says about these values."""
    with pytest.raises(BadInputError) as info:
        SamplingParams(**params).validate()
    return str(info.value)


# ---------------------------------------------------------------------------------------------------------
# Requests real clients send


def test_deepseek_docs_sample_body_parses():
    # The request body from DeepSeek's "Create Chat Completion" page: every inert value spelled out.
    body = {"messages": [{"content": "You are a helpful assistant", "role": "system"},
                         {"content": "Hi", "role": "user"}],
            "model": "deepseek-chat", "frequency_penalty": 0, "max_tokens": 2048, "presence_penalty": 0,
            "response_format": {"type": "text"}, "stop": None, "stream": False, "stream_options": None,
            "temperature": 1, "top_p": 1, "tools": None, "tool_choice": "none", "logprobs": False,
            "top_logprobs": None}
    req = ChatCompletionRequest.parse(body)
    assert req.ignored_fields == []       # inert known fields are dropped, not reported as unknown
    assert to_sampling_params(req) == SamplingParams(max_tokens=2048)
    assert not req.include_usage


def test_openai_sdk_style_chat_request():
    body = {"model": "m", "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "developer", "content": "Be brief."},
                         {"role": "user", "name": "ann", "content": [{"type": "text", "text": "Hello, "},
                                                                    {"type": "text", "text": "world"}]},
                         {"role": "assistant", "content": "Hi!", "refusal": None, "annotations": []},
                         {"role": "user", "content": "again"}],
            "temperature": 0.7, "top_p": 0.9, "n": 2, "stop": ["\n\n", "END"], "seed": 7,
            "presence_penalty": 0.5, "frequency_penalty": -0.5, "logprobs": True, "top_logprobs": 3,
            "max_tokens": 100, "max_completion_tokens": 50, "user": "u-1", "metadata": {"k": "v"}}
    req = ChatCompletionRequest.parse(body)
    assert req.include_usage and req.n == 2
    assert req.ignored_fields == ["metadata"]
    assert req.template_messages() == [{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": "Hello, world", "name": "ann"},
                                       {"role": "assistant", "content": "Hi!"},
                                       {"role": "user", "content": "again"}]
    p = to_sampling_params(req)
    assert p == SamplingParams(max_tokens=50, temperature=0.7, top_p=0.9, stop=["\n\n", "END"], seed=7,
                               presence_penalty=0.5, frequency_penalty=-0.5, logprobs=3)


def test_vllm_bench_chat_payload():
    # What `vllm bench serve --backend openai-chat --ignore-eos` posts.
    body = {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "x y z"}]}],
            "max_completion_tokens": 128, "stream": True, "stream_options": {"include_usage": True},
            "ignore_eos": True}
    req = ChatCompletionRequest.parse(body)
    assert req.include_usage
    assert to_sampling_params(req) == SamplingParams(max_tokens=128, ignore_eos=True)


@pytest.mark.parametrize("prompt, prompts", [("once upon", ["once upon"]), (["a", "b"], ["a", "b"]),
                                             ([1, 2, 3], [[1, 2, 3]]), ([[1, 2], [3]], [[1, 2], [3]])])
def test_vllm_bench_completions_payload(prompt, prompts):
    body = {"model": "m", "prompt": prompt, "repetition_penalty": 1.0, "max_tokens": 64, "logprobs": None,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True, "best_of": 1}
    req = CompletionRequest.parse(body)
    assert req.prompts == prompts and req.include_usage
    assert to_sampling_params(req) == SamplingParams(max_tokens=64, ignore_eos=True)


def test_engine_extensions_map_to_sampling_params():
    req = chat(top_k=40, min_p=0.05, repetition_penalty=1.1, stop="###", stop_token_ids=[7], temperature=0)
    assert to_sampling_params(req) == SamplingParams(max_tokens=4096, temperature=0.0, top_k=40, min_p=0.05,
                                                     repetition_penalty=1.1, stop=["###"], stop_token_ids=[7])


def test_r1_multi_round_without_reasoning_parses():
    # DeepSeek's reasoner example: the earlier answer goes back as plain content.
    req = chat(messages=[{"role": "user", "content": "9.11 or 9.8?"},
                         {"role": "assistant", "content": "9.8"},
                         {"role": "user", "content": "strawberry?"}])
    assert not req.continues_final_message and req.prefix_reasoning is None


def test_chat_prefix_completion():
    req = chat(messages=[{"role": "user", "content": "quick sort"},
                         {"role": "assistant", "content": "```python\n", "prefix": True,
                          "reasoning_content": "Use Hoare partitioning."}], stop=["```"])
    assert req.continues_final_message
    assert req.prefix_reasoning == "Use Hoare partitioning."
    assert req.template_messages()[-1] == {"role": "assistant", "content": "```python\n"}


def test_tool_history_parses_and_renders():
    call = {"id": "c1", "type": "function", "function": {"name": "now", "arguments": "{}"}}
    req = chat(messages=[{"role": "user", "content": "time?"},
                         {"role": "assistant", "content": None, "tool_calls": [call]},
                         {"role": "tool", "tool_call_id": "c1", "content": "12:00"}])
    msgs = req.template_messages()
    assert msgs[1] == {"role": "assistant", "content": "", "tool_calls": [call]}
    assert msgs[2] == {"role": "tool", "content": "12:00", "tool_call_id": "c1"}


@pytest.mark.parametrize("thinking, expected", [(None, None), ({"type": "enabled"}, True),
                                                ({"type": "disabled"}, False)])
def test_thinking_switch(thinking, expected):
    assert chat(thinking=thinking).thinking_enabled is expected


def test_unknown_fields_are_ignored_and_listed():
    req = chat(num_keep=5, skip_special_tokens=True)
    assert req.ignored_fields == ["num_keep", "skip_special_tokens"]
    assert to_sampling_params(req) == SamplingParams(max_tokens=4096)


def test_tokenize_and_detokenize_requests():
    assert TokenizeRequest.parse({"model": "m", "prompt": "hi"}).prompt == "hi"
    tok = TokenizeRequest.parse({"messages": USER, "add_generation_prompt": False, "return_token_strs": True})
    assert tok.messages[0].content == "hi" and tok.return_token_strs and tok.add_special_tokens is None
    assert refused(TokenizeRequest, {"prompt": "a", "messages": USER}).status == 400
    assert refused(TokenizeRequest, {}).status == 400
    assert DetokenizeRequest.parse({"tokens": [1, 2]}).tokens == [1, 2]


# ---------------------------------------------------------------------------------------------------------
# Known parameters nanoseek can't honour: 400 naming them


CHAT_UNSUPPORTED = [
    ("functions", [{"name": "f"}]), ("function_call", "auto"),
    ("logit_bias", {"50256": -100}), ("audio", {"voice": "alloy", "format": "wav"}),
    ("modalities", ["text", "audio"]), ("prediction", {"type": "content", "content": "x"}),
    ("web_search_options", {}), ("verbosity", "low"), ("store", True),
    ("guided_json", {"type": "object"}), ("guided_choice", ["a", "b"]), ("min_tokens", 10),
    ("use_beam_search", True), ("prompt_logprobs", 1), ("include_stop_str_in_output", True), ("echo", True),
    ("chat_template_kwargs", {"enable_thinking": False}), ("chat_template", "{{ messages }}"),
]


@pytest.mark.parametrize("name, value", CHAT_UNSUPPORTED)
def test_chat_unsupported_parameter_is_400_naming_it(name, value):
    err = refused(ChatCompletionRequest, {"model": "m", "messages": USER, name: value})
    assert err.status == 400 and err.param == name and err.code == "unsupported_parameter"
    assert f"'{name}'" in err.message and err.type == "invalid_request_error"


@pytest.mark.parametrize("name, value", [("tools", None), ("tools", []), ("tool_choice", "none"),
                                         ("functions", []), ("function_call", "none"),
                                         ("response_format", {"type": "text"}), ("logit_bias", {}),
                                         ("modalities", ["text"]), ("store", False), ("min_tokens", 0),
                                         ("echo", False), ("chat_template_kwargs", {})])
def test_inert_values_of_unsupported_parameters_pass(name, value):
    req = chat(**{name: value})
    assert name not in req.ignored_fields


@pytest.mark.parametrize("name, value", [("best_of", 3), ("logit_bias", {"1": 1}),
                                         ("response_format", {"type": "json_object"}), ("guided_regex", "a+")])
def test_completion_unsupported_parameter_is_400_naming_it(name, value):
    err = refused(CompletionRequest, {"model": "m", "prompt": "x", name: value})
    assert err.status == 400 and err.param == name and f"'{name}'" in err.message


def test_best_of_equal_to_n_and_empty_suffix_pass():
    CompletionRequest.parse({"prompt": "x", "n": 2, "best_of": 2, "suffix": ""})
    assert CompletionRequest.parse({"prompt": "def f(", "suffix": "\n"}).suffix == "\n"
    err = refused(CompletionRequest, {"prompt": [1, 2], "suffix": "x"})
    assert (err.status, err.param) == (400, "prompt")


def test_non_text_content_part_is_400_naming_it():
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                                      {"type": "image_url", "image_url": {"url": "data:,"}}]}]}
    err = refused(ChatCompletionRequest, body)
    assert err.status == 400 and err.param == "messages[0].content[1]" and "image_url" in err.message


def test_unsupported_wins_over_type_errors():
    err = refused(ChatCompletionRequest, {"messages": "oops", "temperature": "hot", "functions": [{"name": "f"}]})
    assert (err.status, err.param) == (400, "functions")


# ---------------------------------------------------------------------------------------------------------
# Wrong types and missing fields: SCHEMA_STATUS (422)


@pytest.mark.parametrize("body, param, words", [
    ({"messages": USER, "temperature": "0.7"}, "temperature", "expected a number, but got a string"),
    ({"messages": USER, "stream": "true"}, "stream", "expected a boolean, but got a string"),
    ({"messages": USER, "n": 2.5}, "n", "expected an integer, but got a decimal"),
    ({"messages": USER, "max_tokens": True}, "max_tokens", "expected an integer, but got a boolean"),
    ({"messages": USER, "logprobs": 1}, "logprobs", "expected a boolean, but got an integer"),
    ({"messages": USER, "model": 5}, "model", "expected a string, but got an integer"),
    ({"messages": USER, "stop": 5}, "stop", "expected a string or an array of strings, but got an integer"),
    ({"messages": USER, "stop": ["a", 1]}, "stop[1]", "expected a string, but got an integer"),
    ({"messages": USER, "stream_options": True}, "stream_options", "expected an object, but got a boolean"),
    ({"messages": "hi"}, "messages", "expected an array, but got a string"),
    ({"messages": ["hi"]}, "messages[0]", "expected an object, but got a string"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content",
     "expected a string or an array of text parts, but got an integer"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages[0].content[0].text",
     "expected a string, but got an integer"),
    ({"messages": [{"role": "assistant", "content": "x", "prefix": "yes"}]}, "messages[0].prefix",
     "expected a boolean, but got a string"),
])
def test_wrong_type_is_schema_error(body, param, words):
    err = refused(ChatCompletionRequest, body)
    assert err.status == SCHEMA_STATUS == 422
    assert err.param == param and err.code == "invalid_type"
    assert err.message == f"Invalid type for '{param}': {words} instead."


@pytest.mark.parametrize("body, param", [({}, "messages"), ({"messages": [{"content": "x"}]}, "messages[0].role"),
                                         ({"messages": [{"role": "user"}]}, "messages[0].content"),
                                         ({"messages": [{"role": "tool", "content": "x"}]},
                                          "messages[0].tool_call_id")])
def test_missing_field_is_schema_error(body, param):
    err = refused(ChatCompletionRequest, body)
    assert (err.status, err.param, err.code) == (422, param, "missing_required_parameter")
    assert err.message == f"Missing required parameter: '{param}'."


def test_unknown_role_is_schema_error():
    err = refused(ChatCompletionRequest, {"messages": [{"role": "wizard", "content": "x"}]})
    assert (err.status, err.param) == (422, "messages[0].role")
    assert "'wizard'" in err.message and "'assistant'" in err.message


@pytest.mark.parametrize("body, message", [(["not", "an", "object"], "Invalid type for the request body: expected "
                                                                      "an object, but got an array instead."),
                                           (None, "Invalid type for the request body: expected an object, but got "
                                                  "null instead.")])
def test_body_that_is_not_an_object(body, message):
    err = refused(ChatCompletionRequest, body)
    assert (err.status, err.param, err.message) == (422, None, message)


def test_fastapi_missing_body():
    class RequestValidationError(Exception):
        def errors(self):
            return [{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}]

    status, _, body = error_response(RequestValidationError())
    assert status == 422 and body["error"]["message"] == "The request body is missing."


def test_thinking_budget_is_not_silently_dropped():
    err = refused(ChatCompletionRequest, {"messages": USER, "thinking": {"type": "enabled", "budget_tokens": 9}})
    assert (err.status, err.param) == (422, "thinking.budget_tokens")


@pytest.mark.parametrize("prompt", [5, [1, "a"], None])
def test_completion_prompt_types(prompt):
    err = refused(CompletionRequest, {"prompt": prompt})
    assert (err.status, err.param) == (422, "prompt")
    assert "an array of token ids" in err.message


def test_invalid_json_is_400():
    with pytest.raises(ApiError) as info:
        ChatCompletionRequest.parse_json('{"messages": [')
    assert (info.value.status, info.value.code) == (400, "invalid_json")
    assert ChatCompletionRequest.parse_json(b'{"messages": [{"role": "user", "content": "hi"}]}').messages
    status, _, body = error_response(json.JSONDecodeError("Expecting value", "{", 1))
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    # FastAPI reports a body that isn't JSON as a validation error of type json_invalid
    class RequestValidationError(Exception):
        def errors(self):
            return [{"type": "json_invalid", "loc": ("body", 14), "msg": "JSON decode error", "input": {}}]

    assert error_response(RequestValidationError())[0] == 400


def test_fastapi_request_validation_error_is_mapped():
    # FastAPI's RequestValidationError: `.errors()` with locations that start with "body".
    class RequestValidationError(Exception):
        def errors(self):
            return [{"type": "float_type", "loc": ("body", "temperature"), "msg": "Input should be a valid number",
                     "input": "hot"}]

    status, headers, body = error_response(RequestValidationError())
    assert status == 422 and headers == {}
    assert body == {"error": {"message": "Invalid type for 'temperature': expected a number, but got a string "
                                         "instead.", "type": "invalid_request_error", "param": "temperature",
                              "code": "invalid_type"}}


# ---------------------------------------------------------------------------------------------------------
# Out-of-range values and contradictions: 400, in SamplingParams' words where it has them


@pytest.mark.parametrize("field, value", [("temperature", 2.5), ("temperature", -0.1), ("top_p", 0.0),
                                          ("top_p", 1.5), ("top_k", -2), ("min_p", 1.5), ("presence_penalty", 2.5),
                                          ("frequency_penalty", -2.5), ("repetition_penalty", 0.0),
                                          ("max_tokens", 0), ("stop", ["s"] * 17), ("stop", ["ok", ""])])
def test_out_of_range_uses_sampling_params_wording(field, value):
    err = refused(ChatCompletionRequest, {"messages": USER, field: value})
    assert err.status == 400 and err.type == "invalid_request_error"
    assert err.message == sampling_message(**{field: value})
    assert err.param == field or err.param.startswith(f"{field}[")


def test_completion_logprobs_range_uses_sampling_params_wording():
    err = refused(CompletionRequest, {"prompt": "x", "logprobs": 21})
    assert (err.status, err.param) == (400, "logprobs")
    assert err.message == sampling_message(logprobs=21)


@pytest.mark.parametrize("field, value, expected", [
    ("n", 0, "Invalid 'n': integer below minimum value. Expected a value >= 1, but got 0 instead."),
    ("n", 17, "Invalid 'n': integer above maximum value. Expected a value <= 16, but got 17 instead."),
    ("max_completion_tokens", 0, "Invalid 'max_completion_tokens': integer below minimum value. Expected a "
                                 "value >= 1, but got 0 instead."),
])
def test_own_ranges_use_the_same_wording(field, value, expected):
    err = refused(ChatCompletionRequest, {"messages": USER, field: value})
    assert (err.status, err.param, err.message) == (400, field, expected)


def test_top_logprobs_rules():
    err = refused(ChatCompletionRequest, {"messages": USER, "logprobs": True, "top_logprobs": 21})
    assert (err.status, err.param) == (400, "top_logprobs") and "<= 20" in err.message
    err = refused(ChatCompletionRequest, {"messages": USER, "top_logprobs": 2})
    assert (err.status, err.param) == (400, "top_logprobs") and "'logprobs'" in err.message
    err = refused(ChatCompletionRequest, {"messages": USER, "logprobs": False, "top_logprobs": 2})
    assert err.status == 400


def test_stream_options_need_stream():
    err = refused(ChatCompletionRequest, {"messages": USER, "stream_options": {"include_usage": True}})
    assert (err.status, err.param) == (400, "stream_options")
    assert not chat(stream=False, stream_options=None).include_usage


def test_empty_messages_is_400():
    err = refused(ChatCompletionRequest, {"messages": []})
    assert (err.status, err.param) == (400, "messages")


def test_reasoning_content_in_history_kept_only_for_tool_call_turns():
    """DeepSeek's thinking-mode replay rule replaces the R1-launch 400: reasoning sent back is accepted; it
    stays in the history for a turn that made tool calls, and is dropped for any other turn."""
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    req = chat(messages=[*USER, {"role": "assistant", "content": "b", "reasoning_content": "thought"},
                         {"role": "user", "content": "c"},
                         {"role": "assistant", "content": None, "tool_calls": [call], "reasoning_content": "why"},
                         {"role": "tool", "content": "42", "tool_call_id": "call_1"}])
    msgs = req.template_messages()
    assert "reasoning_content" not in msgs[1] and msgs[3]["reasoning_content"] == "why"


@pytest.mark.parametrize("messages, param", [
    ([{"role": "assistant", "content": "x", "prefix": True}, *USER], "messages[0].prefix"),
    ([{"role": "user", "content": "x", "prefix": True}], "messages[0].prefix"),
    ([{"role": "user", "content": "x", "reasoning_content": "r"}], "messages[0].reasoning_content"),
])
def test_prefix_rules(messages, param):
    err = refused(ChatCompletionRequest, {"messages": messages})
    assert (err.status, err.param) == (400, param)


@pytest.mark.parametrize("body, param", [({"prompt": []}, "prompt"), ({"prompt": [[1], []]}, "prompt[1]"),
                                         ({"prompt": [1, -2]}, "prompt"),
                                         ({"prompt": "x", "echo": True, "logprobs": 1}, "echo")])
def test_completion_value_rules(body, param):
    err = refused(CompletionRequest, body)
    assert (err.status, err.param) == (400, param)


# ---------------------------------------------------------------------------------------------------------
# to_sampling_params


def test_max_tokens_defaults_and_precedence():
    assert to_sampling_params(chat()).max_tokens == 4096
    assert to_sampling_params(chat(max_tokens=10)).max_tokens == 10
    assert to_sampling_params(chat(max_tokens=10, max_completion_tokens=20)).max_tokens == 20
    assert to_sampling_params(chat(), default_max_tokens=300).max_tokens == 300
    assert to_sampling_params(CompletionRequest.parse({"prompt": "x"})).max_tokens == 16


def test_max_tokens_is_clamped_to_the_context():
    assert to_sampling_params(chat(max_tokens=500), prompt_tokens=900, max_model_len=1024).max_tokens == 124
    assert to_sampling_params(chat(), prompt_tokens=1000, max_model_len=1024).max_tokens == 24
    assert to_sampling_params(chat(max_tokens=5), prompt_tokens=10, max_model_len=1024).max_tokens == 5


@pytest.mark.parametrize("cls, body, param", [(ChatCompletionRequest, {"messages": USER}, "messages"),
                                              (CompletionRequest, {"prompt": "x"}, "prompt")])
@pytest.mark.parametrize("prompt_tokens", [1024, 5000])
def test_prompt_that_fills_the_context_is_400_with_both_lengths(cls, body, param, prompt_tokens):
    with pytest.raises(ApiError) as info:
        to_sampling_params(cls.parse(body), prompt_tokens=prompt_tokens, max_model_len=1024)
    err = info.value
    assert (err.status, err.param, err.code) == (400, param, "context_length_exceeded")
    assert str(prompt_tokens) in err.message and "1024" in err.message


@pytest.mark.parametrize("fields, logprobs", [({}, None), ({"logprobs": False}, None), ({"logprobs": True}, 0),
                                              ({"logprobs": True, "top_logprobs": 5}, 5)])
def test_chat_logprobs_mapping(fields, logprobs):
    assert to_sampling_params(chat(**fields)).logprobs == logprobs


def test_choice_params_give_each_seeded_choice_its_own_seed():
    p = to_sampling_params(chat(seed=10, n=3, stop=["x"]))
    seeds = [c.seed for c in choice_params(p, 3)]
    assert seeds == [10, 11, 12]
    unseeded = to_sampling_params(chat(n=2))
    assert choice_params(unseeded, 2) == [unseeded, unseeded]


# ---------------------------------------------------------------------------------------------------------
# Usage


def test_usage_derives_and_reports_both_dialects():
    u = Usage.of(prompt_tokens=100, completion_tokens=20, cached_tokens=64, reasoning_tokens=5)
    assert json.loads(u.model_dump_json()) == {
        "prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120,
        "prompt_cache_hit_tokens": 64, "prompt_cache_miss_tokens": 36,
        "prompt_tokens_details": {"cached_tokens": 64}, "completion_tokens_details": {"reasoning_tokens": 5}}
    assert Usage.model_validate({"prompt_tokens": 7, "completion_tokens": 3}) == Usage.of(7, 3)
    assert Usage.model_validate({"prompt_tokens": 7, "completion_tokens": 3,
                                 "prompt_tokens_details": {"cached_tokens": 4}}).prompt_cache_miss_tokens == 3


@pytest.mark.parametrize("fields", [
    {"prompt_cache_hit_tokens": 3, "prompt_cache_miss_tokens": 3},                   # 3 + 3 != 10
    {"total_tokens": 12},                                                            # != 10 + 1
    {"prompt_cache_hit_tokens": 4, "prompt_tokens_details": {"cached_tokens": 5}},   # two cache counts
    {"completion_tokens_details": {"reasoning_tokens": 2}},                          # more than completion
    {"prompt_cache_hit_tokens": 11},                                                 # miss would be -1
])
def test_usage_invariants_are_enforced(fields):
    with pytest.raises(ValueError):
        Usage.model_validate({"prompt_tokens": 10, "completion_tokens": 1, **fields})


# ---------------------------------------------------------------------------------------------------------
# Response and chunk JSON shapes


def dumped(model) -> dict:
    return json.loads(model.model_dump_json())


def chunk(**choice) -> ChatCompletionChunk:
    return ChatCompletionChunk(id="chatcmpl-1", created=1700000000, model="m", system_fingerprint="fp_ns",
                               choices=[ChatChunkChoice(index=0, **choice)])


HEAD = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000, "model": "m",
        "system_fingerprint": "fp_ns"}


def test_chat_stream_chunk_shapes():
    assert dumped(chunk(delta=ChatDelta.of(role=True, content=""))) == {
        **HEAD, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}]}
    assert dumped(chunk(delta=ChatDelta.of(reasoning="Hmm"))) == {
        **HEAD, "choices": [{"index": 0, "delta": {"reasoning_content": "Hmm"}, "logprobs": None,
                             "finish_reason": None}]}
    assert dumped(chunk(delta=ChatDelta.of(reasoning="Hmm", mirror=True)))["choices"][0]["delta"] == {
        "reasoning_content": "Hmm", "reasoning": "Hmm"}
    assert dumped(chunk(delta=ChatDelta.of(content="Hi"))) == {
        **HEAD, "choices": [{"index": 0, "delta": {"content": "Hi"}, "logprobs": None, "finish_reason": None}]}
    assert dumped(chunk(delta=ChatDelta(), finish_reason="length")) == {
        **HEAD, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}]}


def test_usage_chunk_has_empty_choices_and_other_chunks_no_usage():
    usage = Usage.of(5, 2)
    last = ChatCompletionChunk.usage_chunk(id="chatcmpl-1", created=1700000000, model="m",
                                           system_fingerprint="fp_ns", usage=usage)
    assert dumped(last) == {**HEAD, "choices": [], "usage": dumped(usage)}
    assert "usage" not in dumped(chunk(delta=ChatDelta.of(content="x")))


def test_chat_completion_shape():
    body = ChatCompletion(id="chatcmpl-2", created=1700000000, model="m", system_fingerprint="fp_ns",
                          choices=[ChatChoice(index=0, message=ChatMessage.of("42", "Let me add."),
                                              finish_reason="stop")],
                          usage=Usage.of(9, 4, reasoning_tokens=3))
    d = dumped(body)
    assert d == {"id": "chatcmpl-2", "object": "chat.completion", "created": 1700000000, "model": "m",
                 "system_fingerprint": "fp_ns",
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": "42",
                                                      "reasoning_content": "Let me add."},
                              "logprobs": None, "finish_reason": "stop"}],
                 "usage": dumped(Usage.of(9, 4, reasoning_tokens=3))}
    # no reasoning → no reasoning key; mirror → both names
    assert dumped(ChatMessage.of("x")) == {"role": "assistant", "content": "x"}
    assert dumped(ChatMessage.of("x", "r", mirror=True)) == {"role": "assistant", "content": "x",
                                                             "reasoning_content": "r", "reasoning": "r"}
    assert ChatCompletion(model="m", choices=[], usage=Usage.of(1, 1)).id.startswith("chatcmpl-")


def test_completion_shapes():
    full = Completion(id="cmpl-1", created=1700000000, model="m",
                      choices=[CompletionChoice(index=0, text=" there", finish_reason="length")],
                      usage=Usage.of(2, 1))
    assert dumped(full) == {"id": "cmpl-1", "object": "text_completion", "created": 1700000000, "model": "m",
                            "system_fingerprint": None,
                            "choices": [{"index": 0, "text": " there", "logprobs": None, "finish_reason": "length"}],
                            "usage": dumped(Usage.of(2, 1))}
    piece = Completion(id="cmpl-1", created=1700000000, model="m", choices=[CompletionChoice(index=0, text="x")])
    assert "usage" not in dumped(piece)
    last = Completion.usage_chunk(id="cmpl-1", created=1700000000, model="m", usage=Usage.of(2, 1))
    assert dumped(last)["choices"] == [] and dumped(last)["object"] == "text_completion"


def test_model_list_and_tokenize_shapes():
    models = ModelList(data=[ModelCard(id="smollm2-135m", created=1, root="HuggingFaceTB/SmolLM2-135M",
                                       max_model_len=8192)])
    assert dumped(models) == {"object": "list", "data": [{"id": "smollm2-135m", "object": "model", "created": 1,
                                                          "owned_by": "nanoseek",
                                                          "root": "HuggingFaceTB/SmolLM2-135M",
                                                          "max_model_len": 8192}]}
    assert dumped(TokenizeResponse(count=2, max_model_len=8192, tokens=[1, 2])) == {
        "count": 2, "max_model_len": 8192, "tokens": [1, 2], "token_strs": None}


def test_sse_framing():
    c = chunk(delta=ChatDelta.of(content="é"))
    event = sse_event(c)
    assert event.startswith("data: {") and event.endswith("}\n\n") and "\n" not in event[:-2]
    assert json.loads(event[len("data: "):]) == dumped(c)
    assert SSE_DONE == "data: [DONE]\n\n" and SSE_KEEPALIVE.startswith(":")
    assert json.loads(sse_event(ApiError.server_error().body())[6:])["error"]["type"] == "server_error"


def test_request_schema_publishes_ranges_but_not_unsupported_fields():
    props = ChatCompletionRequest.model_json_schema()["properties"]
    assert props["temperature"]["maximum"] == 2 and props["top_logprobs"]["maximum"] == 20
    assert props["n"]["maximum"] == 16
    assert "functions" not in props and "messages" in props and "max_completion_tokens" in props
    assert "tools" in props and "response_format" in props


# ---------------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("err, status, type_", [
    (ApiError.bad_request("x"), 400, "invalid_request_error"),
    (ApiError.authentication(), 401, "authentication_error"),
    (ApiError.insufficient_balance(), 402, "insufficient_quota"),
    (ApiError.invalid_schema("x"), 422, "invalid_request_error"),
    (ApiError.rate_limited(1.5), 429, "rate_limit_error"),
    (ApiError.server_error(), 500, "server_error"),
    (ApiError.overloaded(), 503, "service_unavailable_error"),
    (ApiError.model_not_found("gpt-9"), 404, "invalid_request_error"),
])
def test_status_table_and_body_shape(err, status, type_):
    got_status, headers, body = error_response(err)
    assert got_status == status and body["error"]["type"] == type_
    assert ErrorResponse.model_validate(body).error.message == err.message
    assert list(body) == ["error"] and list(body["error"]) == ["message", "type", "param", "code"]


def test_retry_after_headers():
    _, headers, _ = error_response(ApiError.rate_limited(1.2))
    assert headers == {"Retry-After": "2", "retry-after-ms": "1200"}
    _, headers, _ = error_response(ApiError.overloaded(retry_after_s=5))
    assert headers["Retry-After"] == "5"
    assert error_response(ApiError.overloaded())[1] == {}
    assert error_response(ApiError.authentication())[1] == {"WWW-Authenticate": "Bearer"}


def test_nanoseek_errors_map_to_statuses():
    status, _, body = error_response(BadInputError("Invalid 'top_p': decimal above maximum value. Expected a "
                                                   "value <= 1, but got 2 instead."))
    assert status == 400 and body["error"]["param"] == "top_p"
    assert error_response(NotFoundError("no model named 'x'"))[0] == 404
    assert error_response(UnsupportedError("MoE on this device"))[2]["error"]["code"] == "unsupported_parameter"
    assert error_response(NanoseekError("something"))[0] == 400


def test_unexpected_errors_are_500_without_details():
    status, _, body = error_response(RuntimeError("CUDA out of memory at 0xdeadbeef"))
    assert status == 500 and "deadbeef" not in body["error"]["message"]
    # a response object the server built wrong is its own fault, not the client's
    with pytest.raises(ValueError) as info:
        Usage.model_validate({"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 9})
    assert error_response(info.value)[0] == 500


def test_http_exceptions_keep_their_status():
    class HTTPException(Exception):
        status_code, detail, headers = 405, "Method Not Allowed", {"Allow": "POST"}

    assert error_response(HTTPException()) == (405, {"Allow": "POST"}, {"error": {
        "message": "Method Not Allowed", "type": "invalid_request_error", "param": None, "code": None}})


# ---------------------------------------------------------------------------------------------------------
# Through the real OpenAI SDK, when installed (not a dependency: skipped otherwise)


def _sdk():
    openai = pytest.importorskip("openai")
    for name in ("httpx", "httpx2"):      # the SDK's HTTP library, under whichever name this build uses
        try:
            return openai, __import__(name)
        except ImportError:
            continue
    pytest.skip("no httpx for the OpenAI SDK")


def _client(handler):
    openai, httpx = _sdk()
    transport = httpx.MockTransport(lambda request: handler(httpx, request))
    return openai, openai.OpenAI(api_key="k", base_url="http://nanoseek/v1", max_retries=0,
                                 http_client=httpx.Client(transport=transport))


def test_sdk_request_bodies_parse():
    sent = []

    def handler(httpx, request):
        sent.append((request.url.path, json.loads(request.content)))
        if request.url.path.endswith("/chat/completions"):
            return httpx.Response(200, json=dumped(ChatCompletion(model="m", choices=[], usage=Usage.of(1, 1))))
        return httpx.Response(200, json=dumped(Completion(model="m", choices=[], usage=Usage.of(1, 1))))

    _, client = _client(handler)
    client.chat.completions.create(model="m", messages=[{"role": "system", "content": "s"},
                                                        {"role": "user", "content": [{"type": "text", "text": "q"}]}],
                                   temperature=0.3, top_p=0.8, n=2, stop=["x"], seed=1, logprobs=True,
                                   top_logprobs=2, max_completion_tokens=9, presence_penalty=0.1,
                                   frequency_penalty=0.2, user="u", extra_body={"top_k": 4, "thinking":
                                                                                {"type": "disabled"}})
    client.completions.create(model="m", prompt=["a", "b"], max_tokens=3, echo=True, logprobs=None,
                              extra_body={"ignore_eos": True})
    (chat_path, chat_body), (comp_path, comp_body) = sent
    assert chat_path.endswith("/chat/completions") and comp_path.endswith("/completions")
    req = ChatCompletionRequest.parse(chat_body)
    assert req.thinking_enabled is False and req.ignored_fields == []
    assert to_sampling_params(req) == SamplingParams(max_tokens=9, temperature=0.3, top_p=0.8, top_k=4, stop=["x"],
                                                     seed=1, logprobs=2, presence_penalty=0.1,
                                                     frequency_penalty=0.2)
    assert CompletionRequest.parse(comp_body).prompts == ["a", "b"]


def test_sdk_reads_our_stream():
    created = 1700000000
    head = dict(id="chatcmpl-9", created=created, model="m")
    events = [ChatCompletionChunk(**head, choices=[ChatChunkChoice(index=0, delta=ChatDelta.of(role=True))]),
              ChatCompletionChunk(**head, choices=[ChatChunkChoice(index=0, delta=ChatDelta.of(reasoning="hm"))]),
              ChatCompletionChunk(**head, choices=[ChatChunkChoice(index=0, delta=ChatDelta.of(content="4"))]),
              ChatCompletionChunk(**head, choices=[ChatChunkChoice(index=0, delta=ChatDelta(), finish_reason="stop")]),
              ChatCompletionChunk.usage_chunk(**head, usage=Usage.of(5, 2, cached_tokens=0, reasoning_tokens=1))]
    stream = SSE_KEEPALIVE + "".join(sse_event(e) for e in events) + SSE_DONE

    def handler(httpx, request):
        return httpx.Response(200, content=stream.encode(), headers={"content-type": "text/event-stream"})

    _, client = _client(handler)
    got = list(client.chat.completions.create(model="m", messages=USER, stream=True,
                                              stream_options={"include_usage": True}))
    assert len(got) == 5 and {c.id for c in got} == {"chatcmpl-9"}
    assert got[0].choices[0].delta.role == "assistant"
    assert got[1].choices[0].delta.reasoning_content == "hm"        # DeepSeek's extra field survives
    assert got[2].choices[0].delta.content == "4"
    assert got[3].choices[0].finish_reason == "stop"
    assert got[4].choices == [] and got[4].usage.completion_tokens == 2
    assert got[4].usage.completion_tokens_details.reasoning_tokens == 1


@pytest.mark.parametrize("err, exc_name", [(ApiError.unsupported("tools", "no"), "BadRequestError"),
                                           (ApiError.invalid_schema("bad", param="n"), "UnprocessableEntityError"),
                                           (ApiError.authentication(), "AuthenticationError"),
                                           (ApiError.model_not_found("x"), "NotFoundError"),
                                           (ApiError.rate_limited(1), "RateLimitError"),
                                           (ApiError.overloaded(), "InternalServerError")])
def test_sdk_raises_the_right_error(err, exc_name):
    def handler(httpx, request):
        status, headers, body = error_response(err)
        return httpx.Response(status, json=body, headers=headers)

    openai, client = _client(handler)
    with pytest.raises(getattr(openai, exc_name)) as info:
        client.chat.completions.create(model="m", messages=USER)
    assert info.value.status_code == err.status
    assert info.value.param == err.param and info.value.code == err.code and err.message in str(info.value)


def test_sdk_raises_on_error_mid_stream():
    first = chunk(delta=ChatDelta.of(role=True, content=""))
    stream = sse_event(first) + sse_event(ApiError.server_error("engine crashed").body())

    def handler(httpx, request):
        return httpx.Response(200, content=stream.encode(), headers={"content-type": "text/event-stream"})

    openai, client = _client(handler)
    with pytest.raises(openai.APIError, match="engine crashed"):
        list(client.chat.completions.create(model="m", messages=USER, stream=True))

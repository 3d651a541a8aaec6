"""The HTTP API's request and response bodies (DeepSeek/OpenAI-compatible), as pydantic v2 models.

Owns the contract, not the serving: what a request may say, what it means for sampling
(`to_sampling_params`), and the exact JSON shapes of responses, stream chunks and usage. FastAPI publishes
these models as the OpenAPI spec; `nanoseek.serve.errors` turns every failure into an OpenAI error body.

Requests are validated in three layers, each with its own status (see serve/errors.py for why):
  1. parameters nanoseek knows but cannot honour (tools, JSON mode, logit_bias, …) → 400 naming the
     parameter, checked on the raw body first. A value that asks for nothing ("tools": null, [],
     "tool_choice": "none", "response_format": {"type": "text"}) passes: DeepSeek's own sample request
     sends exactly those.
  2. types and shape (strict: "0.7" is not a number, 1 is not a boolean) → 422.
  3. values: ranges, contradictions, the R1 message rules → 400, with SamplingParams.validate()'s
     OpenAI wording for everything it covers.
Each layer raises `ApiError` (or pydantic's ValidationError for layer 2). Use `Model.parse(body)` to get
only ApiErrors; under FastAPI, layer 2 arrives as RequestValidationError and error_response() handles it.

Unknown fields are accepted and ignored (`ignored_fields` lists them, for a log line or a header). OpenAI
itself rejects them ("Unrecognized request argument supplied"), but local servers (vLLM, SGLang,
llama.cpp, Ollama) ignore them, and clients written against those send vendor extras freely (Open WebUI's
num_keep, enable_thinking, …). Anything known to change the output is in the unsupported tables instead.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# SamplingParams' own range check and wording, reused for n & co.
from nanoseek.engine.sampling import F32, MAX_LOGPROBS, SamplingParams, check_integer
from nanoseek.errors import BadInputError
from nanoseek.serve.errors import ApiError, from_nanoseek, from_validation_errors

MAX_N = 16
CHAT_DEFAULT_MAX_TOKENS = 4096        # DeepSeek's default when max_tokens is unset
COMPLETION_DEFAULT_MAX_TOKENS = 16    # OpenAI's (and vLLM's) default for legacy /completions


def _range(**bounds) -> dict:
    """Bounds published in the OpenAPI spec only. They are enforced by SamplingParams.validate() (or the
    request's own checks) so that an out-of-range value gets a 400 in OpenAI's words, not a pydantic 422."""
    names = {"ge": "minimum", "le": "maximum", "gt": "exclusiveMinimum"}
    return {"json_schema_extra": {names[k]: v for k, v in bounds.items()}}


# The sampler's floor for positive divisors (engine/sampling.py _normal_f32): published as the spec's minimum.
F32_TINY = float(F32.tiny)

# A tool or function name, as the chat route's _check_tools (and so the Anthropic route) accepts it.
TOOL_NAME_PATTERN = "^[A-Za-z0-9_-]{1,64}$"


def only_with(name: str, inert: dict, needs: dict) -> dict:
    """The spec of a rule between fields, checked in code with its own 400: `name` is absent or matches
    `inert`, or the body meets `needs`. Published so that a client generator or a fuzzer builds bodies that
    keep it (otherwise most fuzzed bodies break some such rule, and none reaches the handler). A dependent
    schema, not a bare anyOf: the same rule, but a generator then meets `needs` only for bodies that set
    `name`, rather than adding, say, tools to half of all bodies (each a longer prompt)."""
    return {"dependentSchemas": {name: {"anyOf": [{"properties": {name: inert}}, needs]}}}


_STREAM_OPTIONS_NEED_STREAM = only_with("stream_options", {"type": "null"},
                                        {"required": ["stream"], "properties": {"stream": {"const": True}}})


# ---------------------------------------------------------------------------------------------------------
# Known parameters nanoseek can't honour. name → (accepts: value that asks for nothing, why not).

def _absent(v) -> bool:
    return v is None


def _empty(v) -> bool:
    return v is None or v == [] or v == {}


def _off(v) -> bool:
    return v is None or v is False


def _no_tools(v) -> bool:
    return v is None or v == "none"


_NO_GRAMMAR = "constrained (structured) decoding is not implemented"
_TEXT_ONLY = "nanoseek serves text-only models"

Unsupported = dict[str, tuple[Callable[[Any], bool], str | None]]

COMMON_UNSUPPORTED: Unsupported = {
    "logit_bias": (_empty, "per-token logit biases are not implemented"),
    "response_format": (lambda v: v is None or v == {"type": "text"},
                        "only plain text output; JSON mode and JSON schemas need " + _NO_GRAMMAR),
    "store": (_off, "nanoseek stores no completions"),
    # vLLM/SGLang extensions that change what is generated
    "guided_json": (_absent, _NO_GRAMMAR), "guided_regex": (_absent, _NO_GRAMMAR),
    "guided_choice": (_absent, _NO_GRAMMAR), "guided_grammar": (_absent, _NO_GRAMMAR),
    "structured_outputs": (_absent, _NO_GRAMMAR), "regex": (_absent, _NO_GRAMMAR), "ebnf": (_absent, _NO_GRAMMAR),
    "min_tokens": (lambda v: v is None or v == 0, "a minimum output length is not implemented"),
    "use_beam_search": (_off, "beam search is not implemented"),
    "prompt_logprobs": (_absent, "prompt logprobs are not computed"),
    "include_stop_str_in_output": (_off, "stop strings are always cut from the output"),
}

CHAT_UNSUPPORTED: Unsupported = {
    **{k: v for k, v in COMMON_UNSUPPORTED.items() if k != "response_format"},   # chat has response_format
    "functions": (_empty, "the deprecated 'functions' parameter is not supported; use 'tools'"),
    "function_call": (_no_tools, "the deprecated 'function_call' parameter is not supported; use 'tool_choice'"),
    "audio": (_absent, _TEXT_ONLY), "modalities": (lambda v: v is None or v == ["text"], _TEXT_ONLY),
    "prediction": (_absent, "predicted outputs are not implemented"),
    "web_search_options": (_absent, "web search is not available"),
    "verbosity": (_absent, "the length of the answer cannot be steered"),
    "echo": (_off, "chat completions cannot echo the prompt; use /v1/completions"),
    "chat_template": (_absent, "the model's own chat template is always used"),
    "chat_template_kwargs": (_empty, "use 'thinking': {\"type\": \"enabled\" | \"disabled\"} to switch reasoning"),
}

COMPLETION_UNSUPPORTED: Unsupported = COMMON_UNSUPPORTED


def reject_unsupported(data: dict, table: Unsupported) -> dict:
    """Raise for the first known-unsupported parameter that asks for something; drop the inert ones so that
    `ignored_fields` lists only truly unknown fields."""
    for name, (inert, why) in table.items():
        if name in data and not inert(data[name]):
            raise ApiError.unsupported(name, why)
    return {k: v for k, v in data.items() if k not in table}


# ---------------------------------------------------------------------------------------------------------
# Request building blocks


class _Part(BaseModel):
    """Nested request objects: strict types, unknown keys dropped (clients echo response objects back with
    fields like refusal/annotations that mean nothing to us)."""

    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Part):
    type: Literal["text"]
    text: str


Content = str | list[TextPart]


def _text(content: Content | None) -> str:
    # OpenAI concatenates text parts with no separator.
    if content is None:
        return ""
    return content if isinstance(content, str) else "".join(p.text for p in content)


class ToolCallFunction(_Part):
    name: str
    arguments: str


class ToolCall(_Part):
    """A tool call: in an earlier assistant turn of the history, or in a response's message."""

    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class SystemMessage(_Part):
    """`developer` is OpenAI's newer name for the system role; it renders as `system`."""

    role: Literal["system", "developer"]
    content: Content
    name: str | None = None


class UserMessage(_Part):
    role: Literal["user"]
    content: Content
    name: str | None = None


class AssistantMessage(_Part):
    """An earlier assistant turn, or — with prefix: true, last only — the start of the reply to continue
    (DeepSeek's chat prefix completion, Beta). reasoning_content (DeepSeek's thinking-mode replay rule) is
    accepted anywhere: it is fed back to the model for turns that made tool calls (the reasoning behind the
    calls is still in play) and dropped for every other turn; on the prefix message it is the reasoning to
    continue."""

    role: Literal["assistant"]
    content: Content | None = None
    name: str | None = None
    prefix: bool | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ToolMessage(_Part):
    role: Literal["tool"]
    content: Content
    tool_call_id: str


Message = Annotated[SystemMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")]


class StreamOptions(_Part):
    include_usage: bool | None = Field(None, description="Send a last chunk with `usage` and `choices: []`.")


class ThinkingOptions(_Part):
    """DeepSeek's switch for hybrid models: start the reply inside <think> or skip reasoning."""

    model_config = ConfigDict(strict=True, extra="forbid")   # a thinking budget would otherwise vanish
    type: Literal["enabled", "disabled"]


MAX_TOOLS = 128
# Reasoning-token budgets per reasoning_effort (serve/structured.py caps the reasoning at them; "none" turns
# thinking off; "max" has no cap). DeepSeek maps minimal→low and xhigh→high; a local model gets finer steps,
# each about 4x the one before.
REASONING_BUDGETS: dict[str, int | None] = {"minimal": 256, "low": 1024, "medium": 4096, "high": 16384,
                                            "xhigh": 32768, "max": None}
REASONING_EFFORTS = ("none", *REASONING_BUDGETS)


class FunctionDef(_Part):
    name: str = Field(description="a-z, A-Z, 0-9, underscores and dashes; at most 64 characters.",
                      json_schema_extra={"pattern": TOOL_NAME_PATTERN})   # _check_tools' rule, its 400
    description: str | None = None
    parameters: dict | None = Field(None, description="A JSON schema for the arguments (an object).")
    strict: bool | None = Field(None, description="true: a schema the grammar cannot enforce is a 400 (the "
                                "arguments always follow the schema when the grammar is on).")


class Tool(_Part):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Part):
    name: str


class NamedToolChoice(_Part):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Part):
    name: str | None = None
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Part):
    """text (default), json_object (one JSON object) or json_schema (a value valid against the schema)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


# ---------------------------------------------------------------------------------------------------------
# Requests


class _Body(BaseModel):
    """A request body: strict types, unknown fields kept aside (see the module docstring)."""

    model_config = ConfigDict(strict=True, extra="allow")

    @classmethod
    def parse(cls, body: Any):
        """Validate a decoded JSON body; every failure is an ApiError (422 for shape, 400 for the rest)."""
        try:
            return cls.model_validate(body)
        except ValidationError as err:
            raise from_validation_errors(err.errors()) from None

    @classmethod
    def parse_json(cls, raw: str | bytes):
        """`parse` for an undecoded body; text that isn't JSON is a 400."""
        try:
            return cls.model_validate_json(raw)
        except ValidationError as err:
            raise from_validation_errors(err.errors()) from None

    @property
    def ignored_fields(self) -> list[str]:
        """Unknown top-level fields that were accepted and ignored."""
        return sorted(self.model_extra or {})


class _Request(_Body):
    """What chat and legacy completions share: the sampling parameters and the three validation layers."""

    UNSUPPORTED: ClassVar[Unsupported] = COMMON_UNSUPPORTED
    DEFAULT_MAX_TOKENS: ClassVar[int] = CHAT_DEFAULT_MAX_TOKENS
    PROMPT_PARAM: ClassVar[str] = "messages"

    model_config = ConfigDict(json_schema_extra={"allOf": [_STREAM_OPTIONS_NEED_STREAM]})

    model: str | None = Field(None, description="Served model id; may be omitted on a one-model server.")
    max_tokens: int | None = Field(None, description="Most tokens to generate; clamped to the context left "
                                   "after the prompt.", **_range(ge=1))
    temperature: float | None = Field(None, description="0 = greedy. Default 1.", **_range(ge=0, le=2))
    top_p: float | None = Field(None, description="Default 1.", **_range(ge=F32_TINY, le=1))
    top_k: int | None = Field(None, description="0 or -1 = off (vLLM extension).", **_range(ge=-1))
    min_p: float | None = Field(None, description="vLLM extension. Default 0.", **_range(ge=0, le=1))
    n: int | None = Field(None, description="Choices to generate. Default 1.", **_range(ge=1, le=MAX_N))
    stop: str | list[str] | None = Field(None, description="Up to 16 stop strings, cut from the output.")
    stop_token_ids: list[int] | None = Field(None, description="vLLM extension: token ids that end the output.")
    seed: int | None = Field(None, description="Makes sampling reproducible (choice i uses seed + i).")
    presence_penalty: float | None = Field(None, **_range(ge=-2, le=2))
    frequency_penalty: float | None = Field(None, **_range(ge=-2, le=2))
    repetition_penalty: float | None = Field(None, description="vLLM extension. Default 1 (off).",
                                             **_range(ge=F32_TINY, le=float(F32.max)))
    ignore_eos: bool | None = Field(None, description="vLLM extension: keep generating past end-of-sequence.")
    stream: bool | None = None
    stream_options: StreamOptions | None = Field(None, description="Only with stream: true.")
    user: str | None = Field(None, description="Accepted and ignored.")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    # -- validation ---------------------------------------------------------------------------------------

    @model_validator(mode="before")
    @classmethod
    def _layer1(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = reject_unsupported(data, cls.UNSUPPORTED)
            cls._check_raw(data)
        return data

    @classmethod
    def _check_raw(cls, data: dict) -> None:
        """Subclass hook: raw-body checks that must win over type errors."""

    @model_validator(mode="after")
    def _layer3(self):
        try:
            if self.n is not None:
                check_integer("n", self.n, ge=1, le=MAX_N)
            if self.stream_options is not None and not self.stream:
                raise ApiError.bad_request("'stream_options' is only allowed when 'stream' is true.",
                                           param="stream_options")
            self._check_values()
            to_sampling_params(self)   # the rest: ranges in SamplingParams' words
        except BadInputError as err:
            raise from_nanoseek(err) from None
        return self

    def _check_values(self) -> None:
        """Subclass hook: value checks that SamplingParams doesn't cover."""

    def _logprobs(self) -> int | None:
        return None


class ChatCompletionRequest(_Request):
    """POST /chat/completions (and /v1/…, /beta/…).

    Known OpenAI/DeepSeek/vLLM parameters that nanoseek cannot honour — tools, tool_choice,
    parallel_tool_calls, functions, function_call, response_format (json_object / json_schema), logit_bias,
    audio, modalities, prediction, web_search_options, reasoning_effort, verbosity, store, guided_* … — are
    refused with a 400 naming the parameter unless their value asks for nothing (null, [], "none",
    {"type": "text"}). Other unknown fields are ignored.
    """

    UNSUPPORTED: ClassVar[Unsupported] = CHAT_UNSUPPORTED
    DEFAULT_MAX_TOKENS: ClassVar[int] = CHAT_DEFAULT_MAX_TOKENS
    # _check_values' rules between fields, in the spec (its own config replaces _Request's: repeated here)
    model_config = ConfigDict(json_schema_extra={"allOf": [
        _STREAM_OPTIONS_NEED_STREAM,
        only_with("top_logprobs", {"type": "null"},
                  {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}),
        only_with("tool_choice", {"enum": [None, "none"]},
                  {"required": ["tools"], "properties": {"tools": {"type": "array", "minItems": 1}}})]})
    PROMPT_PARAM: ClassVar[str] = "messages"

    messages: list[Message] = Field(json_schema_extra={"minItems": 1})   # the spec of _check_values' rule
    max_completion_tokens: int | None = Field(None, description="OpenAI's current name for max_tokens; wins "
                                              "over max_tokens when both are given.", **_range(ge=1))
    logprobs: bool | None = Field(None, description="Return the chosen tokens' logprobs.")
    top_logprobs: int | None = Field(None, description="Alternatives per position; needs logprobs: true.",
                                     **_range(ge=0, le=MAX_LOGPROBS))
    thinking: ThinkingOptions | None = Field(None, description="enabled: reply starts with reasoning; "
                                             "disabled: no reasoning. Unset: the chat template decides.")
    mirror_reasoning: bool | None = Field(None, description="nanoseek extension: also send the reasoning as "
                                          "`reasoning` (vLLM/Ollama's name) besides `reasoning_content`. "
                                          "Unset: the server's default.")
    reasoning_effort: Literal[REASONING_EFFORTS] | None = Field(  # type: ignore[valid-type]
        None, description="none: no reasoning; the others cap the reasoning at a token budget "
        "(serve/structured.py REASONING_BUDGETS). Ignored by non-reasoning models.")
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(None, description=f"Functions the model may call (at most {MAX_TOOLS}).")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = Field(None, description="false: at most one call per reply.")

    @property
    def requested_max_tokens(self) -> int | None:
        # max_completion_tokens is OpenAI's current name and what `vllm bench serve` sends.
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def thinking_enabled(self) -> bool | None:
        """render_prompt's `thinking`: True, False, or None (leave the template alone)."""
        return None if self.thinking is None else self.thinking.type == "enabled"

    @property
    def continues_final_message(self) -> bool:
        """Chat prefix completion: render without a generation prompt and continue the last message."""
        last = self.messages[-1]
        return isinstance(last, AssistantMessage) and bool(last.prefix)

    @property
    def prefix_reasoning(self) -> str | None:
        """The reasoning to continue, when the prefix message carries one."""
        return self.messages[-1].reasoning_content if self.continues_final_message else None

    def template_messages(self) -> list[dict]:
        """Messages as nanoseek.chat.render_prompt takes them: content as one string, `developer` as
        `system`, no prefix/reasoning_content keys (see continues_final_message / prefix_reasoning)."""
        out = []
        for m in self.messages:
            d = {"role": "system" if m.role == "developer" else m.role, "content": _text(m.content)}
            if getattr(m, "name", None) is not None:
                d["name"] = m.name
            if isinstance(m, AssistantMessage) and m.tool_calls:
                d["tool_calls"] = [c.model_dump() for c in m.tool_calls]
                if m.reasoning_content:   # the replay rule: reasoning behind tool calls stays in the history
                    d["reasoning_content"] = m.reasoning_content
            if isinstance(m, ToolMessage):
                d["tool_call_id"] = m.tool_call_id
            out.append(d)
        return out

    @classmethod
    def _check_raw(cls, data: dict) -> None:
        messages = data.get("messages")
        if not isinstance(messages, list):
            return
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                continue
            content = m.get("content")
            for j, part in enumerate(content if isinstance(content, list) else []):
                kind = part.get("type") if isinstance(part, dict) else None
                if isinstance(kind, str) and kind != "text":
                    raise ApiError(400, f"Invalid 'messages[{i}].content[{j}]': content parts of type '{kind}' "
                                        f"are not supported; {_TEXT_ONLY}.", param=f"messages[{i}].content[{j}]",
                                   code="unsupported_content_type")
            if m.get("role") != "assistant":
                for key in ("prefix", "reasoning_content"):
                    if m.get(key) not in (None, False):
                        raise ApiError.bad_request(f"Invalid 'messages[{i}].{key}': only assistant messages may "
                                                   f"carry '{key}'.", param=f"messages[{i}].{key}")

    def _check_values(self) -> None:
        if not self.messages:
            raise ApiError.bad_request("Invalid 'messages': empty array. Expected at least one message.",
                                       param="messages")
        last = len(self.messages) - 1
        for i, m in enumerate(self.messages):
            if not isinstance(m, AssistantMessage):
                continue
            if m.prefix and i != last:
                raise ApiError.bad_request(f"Invalid 'messages[{i}].prefix': only the last message may be a "
                                           "prefix to continue.", param=f"messages[{i}].prefix")
            if m.prefix and i == 0:
                # the prefix continues a reply, so there must be a conversation for it to reply to
                raise ApiError.bad_request("Invalid 'messages[0].prefix': a prefix to continue needs at least "
                                           "one message before it.", param="messages[0].prefix")
        self._check_tools()
        if self.max_completion_tokens is not None:
            check_integer("max_completion_tokens", self.max_completion_tokens, ge=1)
        if self.top_logprobs is not None:
            check_integer("top_logprobs", self.top_logprobs, ge=0, le=MAX_LOGPROBS)
            if not self.logprobs:
                raise ApiError.bad_request("'top_logprobs' requires 'logprobs' to be true.", param="top_logprobs")

    def _check_tools(self) -> None:
        tools = self.tools or []
        if len(tools) > MAX_TOOLS:
            raise ApiError.bad_request(f"Invalid 'tools': {len(tools)} tools; at most {MAX_TOOLS} are allowed.",
                                       param="tools")
        seen = set()
        for i, t in enumerate(tools):
            name = t.function.name
            if re.fullmatch(TOOL_NAME_PATTERN, name) is None:
                raise ApiError.bad_request(f"Invalid 'tools[{i}].function.name': {name!r} must be 1 to 64 of "
                                           "a-z, A-Z, 0-9, '_' and '-'.", param=f"tools[{i}].function.name")
            if name in seen:
                raise ApiError.bad_request(f"Invalid 'tools': the function name {name!r} is declared twice.",
                                           param="tools")
            seen.add(name)
            params = t.function.parameters
            if params is not None and params.get("type", "object") != "object":
                raise ApiError.bad_request(f"Invalid 'tools[{i}].function.parameters': the schema must describe "
                                           "an object.", param=f"tools[{i}].function.parameters")
        choice = self.tool_choice
        if choice is not None and choice != "none" and not tools:
            raise ApiError.bad_request("Invalid 'tool_choice': it needs 'tools' to choose from.",
                                       param="tool_choice")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in seen:
            raise ApiError.bad_request(f"Invalid 'tool_choice': no tool is named {choice.function.name!r}.",
                                       param="tool_choice")
        rf = self.response_format
        if rf is not None and rf.type == "json_schema" and (rf.json_schema is None or rf.json_schema.schema_ is None):
            raise ApiError.bad_request("Invalid 'response_format.json_schema': a 'schema' is required.",
                                       param="response_format.json_schema")

    def _logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Request):
    """POST /completions (legacy): raw prompt in, text out. `prompt` is one string, a list of strings, one
    list of token ids or a list of them; each prompt gets n choices, indexed prompt_index * n + i.

    `suffix` asks for fill-in-the-middle (the text between prompt and suffix; models whose tokenizer has FIM
    tokens, nanoseek/fim.py). The chat-independent unsupported parameters (logit_bias, response_format other
    than text, guided_* …) and best_of other than n are refused with a 400.
    """

    UNSUPPORTED: ClassVar[Unsupported] = COMPLETION_UNSUPPORTED
    DEFAULT_MAX_TOKENS: ClassVar[int] = COMPLETION_DEFAULT_MAX_TOKENS
    PROMPT_PARAM: ClassVar[str] = "prompt"

    # _check_values' rule in the spec: no empty list, of prompts or of token ids (its 400s stay _check_values').
    # Token ids >= 0 is left out: schemathesis spells a *bounded* integer as a whole float (2.0) half the
    # time, a 422 here, and a list of them almost always holds one; unbounded ids fail less often.
    prompt: str | list[str] | list[int] | list[list[int]] = Field(json_schema_extra={"anyOf": [
        {"type": "string"}, {"type": "array", "minItems": 1, "items": {"type": "string"}},
        {"type": "array", "minItems": 1, "items": {"type": "integer"}},
        {"type": "array", "minItems": 1, "items": {"type": "array", "minItems": 1, "items": {"type": "integer"}}}]})
    echo: bool | None = Field(None, description="Prepend the prompt to each choice's text.")
    suffix: str | None = Field(None, description="Fill in the middle: the text that follows the completion "
                               "(DeepSeek FIM, Beta). Needs a model with FIM tokens and string prompts.")
    logprobs: int | None = Field(None, description="Chosen token's logprob plus this many alternatives. With "
                                 "echo: the prompt's tokens too (the first has none), then the generated ones.",
                                 **_range(ge=0, le=MAX_LOGPROBS))
    return_tokens_as_token_ids: bool | None = Field(None, description="vLLM extension: logprobs name tokens "
                                                    "'token_id:N', so a client can map them back to ids exactly.")

    @property
    def prompts(self) -> list[str] | list[list[int]]:
        """The prompt as a list: strings, or token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        return [p] if p and isinstance(p[0], int) else list(p)

    @classmethod
    def _check_raw(cls, data: dict) -> None:
        best_of = data.pop("best_of", None)
        n = data.get("n") if data.get("n") is not None else 1
        if best_of is not None and best_of != n:
            raise ApiError.unsupported("best_of", "generating more candidates than are returned is not "
                                       "implemented (best_of must equal n)")

    def _check_values(self) -> None:
        p = self.prompt
        if isinstance(p, list) and not p:
            raise ApiError.bad_request("Invalid 'prompt': empty array. Expected at least one prompt.", param="prompt")
        for i, ids in enumerate(self.prompts):
            if isinstance(ids, list):
                where = "prompt" if p and isinstance(p[0], int) else f"prompt[{i}]"
                if not ids:
                    raise ApiError.bad_request(f"Invalid '{where}': empty array of token ids.", param=where)
                if any(t < 0 for t in ids):
                    raise ApiError.bad_request(f"Invalid '{where}': token ids must be >= 0.", param=where)
        if self.suffix and any(not isinstance(x, str) for x in self.prompts):
            raise ApiError.bad_request("Invalid 'prompt': fill-in-the-middle (suffix) needs text prompts, not "
                                       "token ids.", param="prompt")
        if self.echo and self.logprobs is not None and self.stream:
            raise ApiError.unsupported("stream", "echo with logprobs (prompt log-probs) is not streamed")
        if self.echo and self.logprobs is not None and self.suffix:
            raise ApiError.unsupported("suffix", "echo with logprobs scores the prompt as sent, not a FIM prompt")

    def _logprobs(self) -> int | None:
        return self.logprobs


def _or_default(value, default):
    return default if value is None else value


def to_sampling_params(req: ChatCompletionRequest | CompletionRequest, *, prompt_tokens: int | None = None,
                       max_model_len: int | None = None, default_max_tokens: int | None = None) -> SamplingParams:
    """The engine's SamplingParams for one choice of `req`, validated.

    max_tokens: the request's (max_completion_tokens over max_tokens), else `default_max_tokens`, else the
    endpoint's default (chat 4096, completions 16). An explicit one above max_model_len is a 400 naming both
    numbers (it can never be honoured). Given prompt_tokens and max_model_len it is clamped to
    the room left in the context (DeepSeek: "the total length … is limited by the model's context length",
    the output then ends with finish_reason "length"); a prompt that leaves no room is a 400 stating both
    lengths. Range errors are 400 ApiErrors in SamplingParams' words. For n > 1 use `choice_params`.
    """
    max_tokens = req.requested_max_tokens
    if max_tokens is not None and max_model_len is not None and max_tokens > max_model_len:
        name = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) is not None else "max_tokens"
        raise ApiError.bad_request(f"Invalid '{name}': {max_tokens} is more than this model's context length of "
                                   f"{max_model_len} tokens.", param=name)
    if max_tokens is None:
        max_tokens = default_max_tokens or req.DEFAULT_MAX_TOKENS
    if prompt_tokens is not None and max_model_len is not None:
        room = max_model_len - prompt_tokens
        if room < 1:
            raise ApiError.context_length_exceeded(prompt_tokens, max_model_len, param=req.PROMPT_PARAM)
        max_tokens = min(max_tokens, room)
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=_or_default(req.temperature, 1.0),
        top_p=_or_default(req.top_p, 1.0),
        top_k=_or_default(req.top_k, 0),
        min_p=_or_default(req.min_p, 0.0),
        presence_penalty=_or_default(req.presence_penalty, 0.0),
        frequency_penalty=_or_default(req.frequency_penalty, 0.0),
        repetition_penalty=_or_default(req.repetition_penalty, 1.0),
        seed=req.seed,
        stop=req.stop,
        stop_token_ids=list(req.stop_token_ids or []),
        ignore_eos=bool(req.ignore_eos),
        logprobs=req._logprobs(),
    )
    try:
        return params.validate()
    except BadInputError as err:
        raise from_nanoseek(err) from None


def choice_params(params: SamplingParams, n: int) -> list[SamplingParams]:
    """One SamplingParams per choice. A seeded request gets seeds seed, seed+1, …: the same seed n times
    would return n identical choices."""
    if params.seed is None or n == 1:
        return [params] * n
    return [replace(params, seed=params.seed + i, stop=list(params.stop)) for i in range(n)]


# ---------------------------------------------------------------------------------------------------------
# Responses


def new_id(kind: Literal["chatcmpl", "cmpl"]) -> str:
    """Response ids in OpenAI's form: chatcmpl-… for chat, cmpl-… for completions."""
    return f"{kind}-{uuid.uuid4().hex}"


def _now() -> int:
    return int(time.time())


def _omitted_if_none(description: str | None = None):
    """A field left out of the JSON when None (optional deltas, DeepSeek-only or mirrored fields)."""
    return Field(None, exclude_if=lambda v: v is None, description=description)


FinishReason = Literal["stop", "length", "content_filter", "tool_calls", "insufficient_system_resource"]


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class Usage(BaseModel):
    """Token counts in both dialects: DeepSeek's prompt_cache_hit/miss_tokens and OpenAI's
    prompt_tokens_details.cached_tokens (the same number as the hits). Always consistent:
    hit + miss == prompt_tokens, total == prompt + completion, reasoning_tokens <= completion_tokens.
    Build it with `Usage.of(...)`; missing derived fields are filled in, contradictory ones refused.
    For n > 1 the prompt counts once and completion_tokens sums all choices (OpenAI's rule)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_cache_hit_tokens: int
    prompt_cache_miss_tokens: int
    prompt_tokens_details: PromptTokensDetails
    completion_tokens_details: CompletionTokensDetails

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0,
           reasoning_tokens: int = 0) -> Usage:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
                   completion_tokens_details=CompletionTokensDetails(reasoning_tokens=reasoning_tokens))

    @model_validator(mode="before")
    @classmethod
    def _derive(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "prompt_tokens" not in data or "completion_tokens" not in data:
            return data
        d = dict(data)
        details = d.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else getattr(details, "cached_tokens", None)
        hit = d.setdefault("prompt_cache_hit_tokens", cached if cached is not None else 0)
        if isinstance(d["prompt_tokens"], int) and isinstance(hit, int):
            d.setdefault("prompt_cache_miss_tokens", d["prompt_tokens"] - hit)
            if isinstance(d["completion_tokens"], int):
                d.setdefault("total_tokens", d["prompt_tokens"] + d["completion_tokens"])
        d.setdefault("prompt_tokens_details", {"cached_tokens": hit})
        d.setdefault("completion_tokens_details", {"reasoning_tokens": 0})
        return d

    @model_validator(mode="after")
    def _consistent(self) -> Usage:
        counts = {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                  "prompt_cache_hit_tokens": self.prompt_cache_hit_tokens,
                  "prompt_cache_miss_tokens": self.prompt_cache_miss_tokens,
                  "reasoning_tokens": self.completion_tokens_details.reasoning_tokens}
        if any(v < 0 for v in counts.values()):
            raise ValueError(f"token counts must be >= 0: {counts}")
        if self.prompt_cache_hit_tokens + self.prompt_cache_miss_tokens != self.prompt_tokens:
            raise ValueError("prompt_cache_hit_tokens + prompt_cache_miss_tokens must equal prompt_tokens")
        if self.prompt_tokens_details.cached_tokens != self.prompt_cache_hit_tokens:
            raise ValueError("prompt_tokens_details.cached_tokens must equal prompt_cache_hit_tokens")
        if self.total_tokens != self.prompt_tokens + self.completion_tokens:
            raise ValueError("total_tokens must equal prompt_tokens + completion_tokens")
        if self.completion_tokens_details.reasoning_tokens > self.completion_tokens:
            raise ValueError("reasoning_tokens cannot exceed completion_tokens")
        return self


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class ChatMessage(BaseModel):
    """The reply. reasoning_content (DeepSeek's name) is present when the model reasoned; `reasoning`
    (vLLM/Ollama's name) only when mirroring was asked for."""

    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = _omitted_if_none()
    reasoning: str | None = _omitted_if_none()
    tool_calls: list[ToolCall] | None = _omitted_if_none("The calls the model made (finish_reason tool_calls).")

    @classmethod
    def of(cls, content: str | None, reasoning: str | None = None, mirror: bool = False,
           tool_calls: list[ToolCall] | None = None) -> ChatMessage:
        return cls(content=content, reasoning_content=reasoning, reasoning=reasoning if mirror else None,
                   tool_calls=tool_calls or None)


class ToolCallFunctionDelta(BaseModel):
    name: str | None = _omitted_if_none("Only in a call's first delta.")
    arguments: str = ""


class ToolCallDelta(BaseModel):
    """A piece of tool call `index`: id, type and name come first, then fragments of the arguments."""

    index: int
    id: str | None = _omitted_if_none()
    type: Literal["function"] | None = _omitted_if_none()
    function: ToolCallFunctionDelta


class ChatDelta(BaseModel):
    """One streamed piece; fields not carried by this chunk are left out (the last chunk's delta is {})."""

    role: Literal["assistant"] | None = _omitted_if_none("Only in the first chunk of each choice.")
    content: str | None = _omitted_if_none()
    reasoning_content: str | None = _omitted_if_none()
    reasoning: str | None = _omitted_if_none()
    tool_calls: list[ToolCallDelta] | None = _omitted_if_none()

    @classmethod
    def of(cls, *, role: bool = False, content: str | None = None, reasoning: str | None = None,
           mirror: bool = False) -> ChatDelta:
        return cls(role="assistant" if role else None, content=content, reasoning_content=reasoning,
                   reasoning=reasoning if mirror else None)


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = Field(None, description="null until the choice's last chunk.")


class ChatCompletion(BaseModel):
    id: str = Field(default_factory=lambda: new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage


class ChatCompletionChunk(BaseModel):
    """One `data:` event of a chat stream. All chunks of a stream share id and created. With
    stream_options.include_usage the stream ends with `usage_chunk(...)`: usage set, choices empty."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice]
    usage: Usage | None = _omitted_if_none()

    @classmethod
    def usage_chunk(cls, *, id: str, created: int, model: str, usage: Usage,
                    system_fingerprint: str | None = None) -> ChatCompletionChunk:
        return cls(id=id, created=created, model=model, system_fingerprint=system_fingerprint, choices=[],
                   usage=usage)


class CompletionLogprobs(BaseModel):
    """Legacy /completions logprobs: parallel arrays, one entry per generated token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class Completion(BaseModel):
    """A /completions response, and also each `data:` event of its stream (OpenAI uses the one object for
    both). Streams leave usage out except in the final `usage_chunk`, whose choices are empty."""

    id: str = Field(default_factory=lambda: new_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = _omitted_if_none()

    @classmethod
    def usage_chunk(cls, *, id: str, created: int, model: str, usage: Usage,
                    system_fingerprint: str | None = None) -> Completion:
        return cls(id=id, created=created, model=model, system_fingerprint=system_fingerprint, choices=[],
                   usage=usage)


# ---------------------------------------------------------------------------------------------------------
# Server-sent events

SSE_DONE = "data: [DONE]\n\n"
SSE_KEEPALIVE = ": keep-alive\n\n"   # a comment line: the OpenAI SDK and vLLM's bench client skip it


def sse_event(payload: BaseModel | dict) -> str:
    """One `data:` event. For a failed stream pass the ApiError body: the OpenAI SDK raises on `error`."""
    text = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(
        payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n"


# ---------------------------------------------------------------------------------------------------------
# Models, tokenizer endpoints


class ModelCard(BaseModel):
    """One entry of GET /v1/models. `root` is what `vllm bench serve` reads as the tokenizer when no
    --model is given; max_model_len is the context length (vLLM's field)."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "nanoseek"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(_Body):
    """POST /tokenize, vLLM's shape: either `prompt` (raw text) or `messages` (rendered with the chat
    template, like a chat request would be)."""

    # The spec states the rule _one_input enforces (one input given, the other absent or null), so that a client
    # generator or a fuzzer builds bodies that give exactly one; the two shapes exclude each other.
    model_config = ConfigDict(json_schema_extra={"oneOf": [
        {"required": ["prompt"], "properties": {"prompt": {"type": "string"}, "messages": {"type": "null"}}},
        {"required": ["messages"], "properties": {"messages": {"type": "array"}, "prompt": {"type": "null"}}}]})

    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: bool | None = Field(None, description="Default: true for prompt, false for messages "
                                            "(the template writes its own).")
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ApiError.bad_request("Give exactly one of 'prompt' and 'messages'.",
                                       param="prompt" if self.prompt is None else "messages")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


def given_fields(req: BaseModel, names: tuple[str, ...]) -> dict[str, Any]:
    """The fields of `req` among `names` that the request set (not None): what a translated API (Anthropic,
    Responses) passes on to the chat request unchanged."""
    return {n: getattr(req, n) for n in names if getattr(req, n) is not None}

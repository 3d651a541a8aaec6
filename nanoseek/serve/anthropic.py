"""The Anthropic Messages API on the chat pipeline: POST /v1/messages and /v1/messages/count_tokens, also under
the /anthropic base URL (DeepSeek's), which the Anthropic SDK and Claude Code are pointed at.

Owns the translation only, both ways:
  * in: an Anthropic request (`MessagesRequest`) → the internal ChatCompletionRequest (`to_chat`): system,
    text / tool_use / tool_result / thinking blocks → chat messages with tool_calls and role "tool",
    tools → OpenAI function tools, tool_choice auto/any/tool/none → auto/required/named/none, thinking →
    DeepSeek's `thinking` switch with budget_tokens → the largest reasoning_effort step not above it,
    output_config effort/format → reasoning_effort/response_format, stop_sequences → stop, max_tokens →
    max_tokens clamped to the context (temperature, top_p and top_k pass through: the API takes them, though
    the newest SDKs no longer send them);
  * out: the ChatCompletion body (`from_chat`) or the chat SSE stream (`AnthropicStream`) → a Message or
    Anthropic's SSE events, with stop_reason, Anthropic's usage arithmetic and signed thinking blocks.
Auth, reservations, billing, the engine and the SSE machinery (keep-alives, cancellation on hang-up) are
the chat route's own (serve/routes.py ChatService): this module runs a chat request and rewrites what comes
out. Errors get Anthropic's body through serve/errors.py (`dialect_of` picks it by path).

Thinking signatures. A thinking block carries `signature` = base64 HMAC-SHA256 of its text under a server
secret (kept in the store, so it survives restarts; a server without a store makes one per process). A
client sending thinking blocks back must send them unaltered: a wrong signature is a 400, as at Anthropic.

Usage: input_tokens are the prompt tokens that were not prefix-cache hits; cache_read_input_tokens the
hits; cache_creation_input_tokens is 0 (nanoseek's prefix cache fills itself, at no extra price), so
input_tokens + cache_read_input_tokens + cache_creation_input_tokens is the prompt, as Anthropic defines it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import uuid
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from nanoseek.serve.errors import (
    ApiError,
    anthropic_error,
    from_validation_errors,
    json_object,
)
from nanoseek.serve.routes import (
    ChatRun,
    ChatService,
    chat_plan,
    json_body,
)
from nanoseek.serve.schemas import (
    F32_TINY,
    REASONING_BUDGETS,
    SSE_DONE,
    SSE_KEEPALIVE,
    TOOL_NAME_PATTERN,
    ChatCompletionRequest,
    Unsupported,
    given_fields,
    only_with,
    reject_unsupported,
)
from nanoseek.serve.store import Store
from nanoseek.serve.streams import replay_chunk, sse

SECRET_NAME = "anthropic_thinking_signature"


class Signer:
    """Signs thinking text, and checks a signature a client sent back."""

    def __init__(self, store: Store | None):
        self._key = store.secret(SECRET_NAME) if store is not None else secrets.token_bytes(32)

    def sign(self, text: str) -> str:
        mac = hmac.new(self._key, text.encode(errors="surrogatepass"), hashlib.sha256).digest()
        return base64.b64encode(mac).decode()

    def verify(self, text: str, signature: str) -> bool:
        # as bytes: compare_digest refuses non-ASCII str, and a client may send anything as a signature
        return hmac.compare_digest(self.sign(text).encode(), signature.encode(errors="surrogatepass"))


# ---------------------------------------------------------------------------------------------------------
# The request


class _Part(BaseModel):
    # cache_control, citations and the like are accepted and ignored (prompt caching here is automatic)
    model_config = ConfigDict(strict=True, extra="ignore")


class TextBlock(_Part):
    type: Literal["text"]
    text: str


class ToolUseBlock(_Part):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(_Part):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] | None = None
    is_error: bool | None = None


class ThinkingBlock(_Part):
    type: Literal["thinking"]
    thinking: str
    signature: str


Block = Annotated[TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock, Field(discriminator="type")]


class InputMessage(_Part):
    # _chat_messages' rule in the spec: which blocks each role may send (its 400s stay _chat_messages')
    model_config = ConfigDict(json_schema_extra={"anyOf": [
        {"properties": {"role": {"const": role}, "content": {"items": {"properties": {"type": {"enum": kinds}}}}}}
        for role, kinds in (("user", ["text", "tool_result"]), ("assistant", ["text", "tool_use", "thinking"]))]})

    role: Literal["user", "assistant"]
    content: str | list[Block]


class AnthropicTool(_Part):
    """A tool in Anthropic's shape (named apart from chat's Tool, so the OpenAPI document holds both)."""

    name: str = Field(json_schema_extra={"pattern": TOOL_NAME_PATTERN})   # the chat route's rule, its 400
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None


class ToolChoice(_Part):
    # _check's rule in the spec: "tool" names its tool
    model_config = ConfigDict(json_schema_extra=only_with(
        "type", {"enum": ["auto", "any", "none"]},
        {"required": ["name"], "properties": {"name": {"type": "string", "minLength": 1}}}))

    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class Thinking(_Part):
    """enabled (with a budget) and adaptive both turn the model's reasoning on; disabled turns it off."""

    # _check's rule in the spec (all but budget_tokens < max_tokens, which a schema cannot say)
    model_config = ConfigDict(json_schema_extra=only_with(
        "type", {"enum": ["adaptive", "disabled"]},
        {"required": ["budget_tokens"], "properties": {"budget_tokens": {"type": "integer", "minimum": 1}}}))

    type: Literal["enabled", "adaptive", "disabled"]
    budget_tokens: int | None = None
    display: Literal["summarized"] | None = None   # "omitted" (signature without text) is not offered


class OutputFormat(_Part):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(_Part):
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None
    format: OutputFormat | None = None


class Metadata(_Part):
    user_id: str | None = None


# Anthropic block types nanoseek cannot take, refused by name before the schema check (a clearer 400 than
# "expected one of text, tool_use, …").
_UNSUPPORTED_BLOCKS = {"image": "nanoseek serves text-only models", "document": "nanoseek serves text-only models",
                       "redacted_thinking": "nanoseek never redacts thinking, so it cannot take redacted blocks",
                       "search_result": "search results are not supported", "server_tool_use":
                       "server tools are not supported", "web_search_tool_result": "server tools are not supported"}


# Top-level parameters nanoseek cannot honour (the chat route's kind of table; a false value asks for nothing)
_UNSUPPORTED_PARAMETERS: Unsupported = {"mcp_servers": (lambda v: not v, None), "container": (lambda v: not v, None)}


class MessagesRequest(BaseModel):
    """POST /v1/messages. Unknown top-level fields are ignored (Anthropic's betas send many)."""

    # The rule of _check and of the chat request it becomes, in the spec: a tool_choice other than "none"
    # needs tools ("auto" too: the chat route's 400)
    model_config = ConfigDict(strict=True, extra="allow", json_schema_extra=only_with(
        "tool_choice", {"anyOf": [{"type": "null"}, {"properties": {"type": {"const": "none"}}}]},
        {"required": ["tools"], "properties": {"tools": {"type": "array", "minItems": 1}}}))

    model: str | None = None
    max_tokens: int = Field(description="Required. A cap: clamped to the room the context leaves.",
                            json_schema_extra={"minimum": 1})
    messages: list[InputMessage] = Field(json_schema_extra={"minItems": 1})
    system: str | list[TextBlock] | None = None
    stop_sequences: list[str] | None = None
    # bounds published for the spec; enforced by _check in Anthropic's words
    temperature: float | None = Field(None, json_schema_extra={"minimum": 0, "maximum": 1})
    top_p: float | None = Field(None, json_schema_extra={"minimum": F32_TINY, "maximum": 1})   # the sampler's floor
    top_k: int | None = Field(None, json_schema_extra={"minimum": 0})
    metadata: Metadata | None = None
    stream: bool | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None

    @classmethod
    def parse(cls, raw: bytes) -> MessagesRequest:
        data = json_object(raw)
        _refuse_unsupported(data)
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise from_validation_errors(err.errors()) from None


class CountTokensRequest(MessagesRequest):
    """POST /v1/messages/count_tokens: the same body, where max_tokens may be left out (it counts nothing)."""

    max_tokens: int = Field(1, description="Optional here; the same rules when given.",
                            json_schema_extra={"minimum": 1})


def _listed(value) -> list:
    return value if isinstance(value, list) else []   # anything else is the schema check's to refuse


def _refuse_unsupported(data: dict) -> None:
    for i, m in enumerate(_listed(data.get("messages"))):
        content = m.get("content") if isinstance(m, dict) else None
        for j, block in enumerate(_listed(content)):
            kind = block.get("type") if isinstance(block, dict) else None
            if kind in _UNSUPPORTED_BLOCKS:
                raise ApiError(400, f"messages.{i}.content.{j}: '{kind}' blocks are not supported "
                                    f"({_UNSUPPORTED_BLOCKS[kind]}).", param=f"messages.{i}.content.{j}",
                               code="unsupported_content_type")
    for i, tool in enumerate(_listed(data.get("tools"))):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind not in (None, "custom"):
            raise ApiError.unsupported(f"tools.{i}.type", f"the server tool '{kind}' is not available; only "
                                       "client tools (name, description, input_schema) are")
    reject_unsupported(data, _UNSUPPORTED_PARAMETERS)


def _text(content: str | list[TextBlock] | None) -> str:
    if content is None:
        return ""
    return content if isinstance(content, str) else "".join(b.text for b in content)


def to_chat(req: MessagesRequest, signer: Signer, stream: bool = False,
            context: int | None = None) -> ChatCompletionRequest:
    """The chat request that runs an Anthropic one."""
    return ChatCompletionRequest.parse(chat_body(req, signer, stream, context))


def chat_body(req: MessagesRequest, signer: Signer, stream: bool = False, context: int | None = None) -> dict:
    """The chat request body (OpenAI's shape) for an Anthropic request. `context`: the served model's; the
    required max_tokens is a cap there (agents send 32k or more out of habit), so it shrinks to the context,
    where an explicit chat max_tokens above it is a 400."""
    _check(req)
    messages: list[dict] = []
    if req.system:
        messages.append({"role": "system", "content": _text(req.system)})
    for i, m in enumerate(req.messages):
        messages += _chat_messages(i, m, signer)
    last = messages[-1] if messages else None
    if last is not None and last["role"] == "assistant" and "tool_calls" not in last and len(messages) > 1:
        # Anthropic's prefill: a final assistant turn is the start of the reply, which the model continues
        # (chat's prefix completion; the response holds only the continuation, as Anthropic's does)
        last["prefix"] = True
        last["content"] = (last["content"] or "").rstrip()   # Anthropic refuses trailing whitespace here
        last.pop("reasoning_content", None)
    body: dict[str, Any] = {"messages": messages,
                            "max_tokens": req.max_tokens if context is None else min(req.max_tokens, context)}
    if req.model is not None:
        body["model"] = req.model
    body.update(given_fields(req, ("temperature", "top_p", "top_k")))
    if req.stop_sequences:
        body["stop"] = req.stop_sequences
    # Anthropic's default is no thinking: a hybrid template is switched off unless the request enables it.
    body["thinking"] = {"type": "enabled" if req.thinking and req.thinking.type != "disabled" else "disabled"}
    oc = req.output_config
    if oc is not None and oc.effort is not None:
        body["reasoning_effort"] = oc.effort
    elif req.thinking is not None and req.thinking.budget_tokens is not None:
        body["reasoning_effort"] = effort_for_budget(req.thinking.budget_tokens)
    if oc is not None and oc.format is not None:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": oc.format.schema_,
                                                                          "strict": True}}
    if req.tools:
        body["tools"] = [{"type": "function", "function": {
            "name": t.name, "parameters": t.input_schema,
            **({"description": t.description} if t.description is not None else {})}} for t in req.tools]
    if req.tool_choice is not None:
        tc = req.tool_choice
        body["tool_choice"] = ({"type": "function", "function": {"name": tc.name}} if tc.type == "tool"
                               else {"auto": "auto", "any": "required", "none": "none"}[tc.type])
        if tc.disable_parallel_tool_use and req.tools:
            body["parallel_tool_calls"] = False
    if stream:
        body["stream"], body["stream_options"] = True, {"include_usage": True}
    return body


def effort_for_budget(budget_tokens: int) -> str:
    """The chat reasoning_effort whose reasoning cap (serve/schemas.py REASONING_BUDGETS) is the largest
    not above `budget_tokens`: the model never thinks longer than asked (the smallest step, below it)."""
    capped = sorted((cap, effort) for effort, cap in REASONING_BUDGETS.items() if cap is not None)
    fits = [effort for cap, effort in capped if cap <= budget_tokens]
    return fits[-1] if fits else capped[0][1]


def _check(req: MessagesRequest) -> None:
    """Anthropic's own value rules, in its words, where they are stricter than chat's."""
    if req.max_tokens < 1:
        raise ApiError.bad_request("max_tokens: must be greater than or equal to 1", param="max_tokens")
    if not req.messages:
        raise ApiError.bad_request("messages: at least one message is required", param="messages")
    if req.temperature is not None and not 0 <= req.temperature <= 1:
        raise ApiError.bad_request("temperature: range: 0..1", param="temperature")
    t = req.thinking
    if t is not None and t.type == "enabled":
        if t.budget_tokens is None:
            raise ApiError.bad_request("thinking.enabled.budget_tokens: Field required", param="thinking.budget_tokens")
        if not 1 <= t.budget_tokens < req.max_tokens:
            raise ApiError.bad_request("thinking.budget_tokens: must be at least 1 and less than max_tokens",
                                       param="thinking.budget_tokens")
    tc = req.tool_choice
    if tc is not None and tc.type == "tool" and not tc.name:
        raise ApiError.bad_request("tool_choice.name: Field required", param="tool_choice.name")
    if tc is not None and tc.type in ("any", "tool") and not req.tools:
        raise ApiError.bad_request(f"tool_choice: '{tc.type}' needs 'tools'", param="tool_choice")


def _chat_messages(i: int, m: InputMessage, signer: Signer) -> list[dict]:
    """One Anthropic message as chat messages: tool results become role "tool" messages (first, as they
    answer the previous turn's calls), an assistant's tool_use blocks its tool_calls."""
    if isinstance(m.content, str):
        return [{"role": m.role, "content": m.content}]
    text, calls, results, thinking = [], [], [], []
    for j, b in enumerate(m.content):
        where = f"messages.{i}.content.{j}"
        if isinstance(b, TextBlock):
            text.append(b.text)
        elif isinstance(b, ToolUseBlock):
            if m.role != "assistant":
                raise ApiError.bad_request(f"{where}: tool_use blocks belong to assistant messages", param=where)
            calls.append({"id": b.id, "type": "function",
                          "function": {"name": b.name, "arguments": json.dumps(b.input, ensure_ascii=False)}})
        elif isinstance(b, ToolResultBlock):
            if m.role != "user":
                raise ApiError.bad_request(f"{where}: tool_result blocks belong to user messages", param=where)
            content = _text(b.content)
            results.append({"role": "tool", "tool_call_id": b.tool_use_id,
                            "content": f"Error: {content}" if b.is_error else content})
        elif isinstance(b, ThinkingBlock):
            if m.role != "assistant":
                raise ApiError.bad_request(f"{where}: thinking blocks belong to assistant messages", param=where)
            if not signer.verify(b.thinking, b.signature):
                raise ApiError.bad_request(f"{where}: Invalid `signature` in `thinking` block", param=where)
            # Verified: it goes back as the turn's reasoning_content, which the chat route keeps in the prompt
            # only behind tool calls (DeepSeek's replay rule; Anthropic's own rule for thinking with tools).
            thinking.append(b.thinking)
    out = list(results)
    if m.role == "assistant":
        if text or calls:
            out.append({"role": "assistant", "content": "".join(text) if text else None,
                        **({"tool_calls": calls} if calls else {}),
                        **({"reasoning_content": "".join(thinking)} if thinking else {})})
    elif text or not results:
        out.append({"role": "user", "content": "".join(text)})
    return out


# ---------------------------------------------------------------------------------------------------------
# The response


def new_message_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


def stop_reason(finish: str | None, stop_string: str | None) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) for a chat finish_reason and the stop string that ended the output."""
    if finish == "length":
        return "max_tokens", None
    if finish == "tool_calls":
        return "tool_use", None
    if stop_string is not None:
        return "stop_sequence", stop_string
    return "end_turn", None


def usage(chat_usage: dict) -> dict:
    hit = chat_usage.get("prompt_cache_hit_tokens", 0)
    return {"input_tokens": chat_usage["prompt_tokens"] - hit, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": hit, "output_tokens": chat_usage["completion_tokens"]}


def _tool_input(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:   # an unconstrained model may write broken JSON: hand it over as is
        return {"_raw_arguments": arguments}


def from_chat(completion: dict, run: ChatRun, signer: Signer, model: str) -> dict:
    """The Anthropic Message for a ChatCompletion body (one choice)."""
    choice = completion["choices"][0]
    msg = choice["message"]
    content: list[dict] = []
    if msg.get("reasoning_content") is not None:
        content.append({"type": "thinking", "thinking": msg["reasoning_content"],
                        "signature": signer.sign(msg["reasoning_content"])})
    if msg.get("content"):
        content.append({"type": "text", "text": msg["content"]})
    for call in msg.get("tool_calls") or []:
        content.append({"type": "tool_use", "id": call["id"], "name": call["function"]["name"],
                        "input": _tool_input(call["function"]["arguments"])})
    reason, sequence = stop_reason(choice["finish_reason"], _stop_string(run))
    return {"id": new_message_id(), "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": reason, "stop_sequence": sequence, "usage": usage(completion["usage"])}


def _stop_string(run: ChatRun) -> str | None:
    out = run.job.handles[0].completion if run.job is not None else None
    return getattr(out, "stop_string", None)


def _event(kind: str, data: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data}, ensure_ascii=False)}\n\n"


class AnthropicStream:
    """Chat SSE events in, Anthropic SSE events out: one content block per run of reasoning, text or one
    tool call, each opened and closed around its deltas; a thinking block ends with its signature_delta."""

    def __init__(self, run: ChatRun, signer: Signer, model: str):
        self.run, self.signer, self.model = run, signer, model
        self.index = -1
        self.open: str | None = None       # "thinking" | "text" | "tool_use"
        self.thinking = ""
        self.finish: str | None = None
        self.usage: dict | None = None

    def start(self) -> list[str]:
        prompt = len(self.run.prompt.ids) if self.run.prompt is not None else 0
        message = {"id": new_message_id(), "type": "message", "role": "assistant", "model": self.model,
                   "content": [], "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": prompt, "cache_creation_input_tokens": 0,
                             "cache_read_input_tokens": 0, "output_tokens": 0}}
        return [_event("message_start", {"message": message}), _event("ping", {})]

    def _open(self, kind: str, block: dict) -> list[str]:
        out = self._close()
        self.index += 1
        self.open = kind
        return out + [_event("content_block_start", {"index": self.index, "content_block": block})]

    def _close(self) -> list[str]:
        if self.open is None:
            return []
        out = []
        if self.open == "thinking":
            out.append(self._delta({"type": "signature_delta", "signature": self.signer.sign(self.thinking)}))
            self.thinking = ""
        self.open = None
        return out + [_event("content_block_stop", {"index": self.index})]

    def _delta(self, delta: dict) -> str:
        return _event("content_block_delta", {"index": self.index, "delta": delta})

    def feed(self, chunk: dict) -> list[str]:
        """Events for one chat chunk (a dict)."""
        if chunk.get("usage") is not None:
            self.usage = chunk["usage"]
        return replay_chunk(chunk, self)

    # the steps replay_chunk takes

    def reasoning(self, text: str) -> list[str]:
        out = [] if self.open == "thinking" else self._open("thinking", {"type": "thinking", "thinking": "",
                                                                          "signature": ""})
        self.thinking += text
        return out + [self._delta({"type": "thinking_delta", "thinking": text})]

    def text(self, text: str) -> list[str]:
        out = [] if self.open == "text" else self._open("text", {"type": "text", "text": ""})
        return out + [self._delta({"type": "text_delta", "text": text})]

    def call(self, call_id: str, name: str) -> list[str]:
        return self._open("tool_use", {"type": "tool_use", "id": call_id, "name": name, "input": {}})

    def arguments(self, fragment: str) -> list[str]:
        return [self._delta({"type": "input_json_delta", "partial_json": fragment})]

    def end(self) -> list[str]:
        reason, sequence = stop_reason(self.finish, _stop_string(self.run))
        totals = usage(self.usage) if self.usage else {"output_tokens": 0}
        return self._close() + [_event("message_delta", {"delta": {"stop_reason": reason, "stop_sequence": sequence},
                                                         "usage": totals}),
                                _event("message_stop", {})]


async def translate_stream(chat_events, tr: AnthropicStream):
    """Run the chat stream (its own keep-alives, billing and cancellation) and rewrite each of its events.
    Closing this generator closes the chat one, whose `finally` cancels the engine and bills what ran."""
    try:
        for e in tr.start():
            yield e
        async for raw in chat_events:
            if raw == SSE_KEEPALIVE:
                yield _event("ping", {})
                continue
            if raw == SSE_DONE:
                for e in tr.end():
                    yield e
                continue
            payload = json.loads(raw.removeprefix("data: "))
            if "error" in payload and "choices" not in payload:
                yield f"event: error\ndata: {json.dumps(_anthropic_body(payload), ensure_ascii=False)}\n\n"
                continue
            for e in tr.feed(payload):
                yield e
    finally:
        await chat_events.aclose()


def _anthropic_body(openai_body: dict) -> dict:
    err = openai_body["error"]
    api = ApiError(500 if err.get("type") == "server_error" else 400, err.get("message", ""), type=err.get("type"),
                   code=err.get("code"))
    return anthropic_error(api)[1]


# ---------------------------------------------------------------------------------------------------------
# The routes


def anthropic_models_router(chat: ChatService) -> APIRouter:
    """GET /models and /models/{id} in Anthropic's shape; mounted at /anthropic/v1 only (/v1/models is
    OpenAI's)."""
    router = APIRouter()

    def info(name: str) -> dict:
        created = datetime.fromtimestamp(chat.models[name].created, timezone.utc).isoformat().replace("+00:00", "Z")
        return {"type": "model", "id": name, "display_name": name, "created_at": created}

    @router.get("/models")
    async def list_models(request: Request):
        await chat.gate.caller(request)
        data = [info(name) for name in chat.models]
        return {"data": data, "has_more": False, "first_id": data[0]["id"], "last_id": data[-1]["id"]}

    @router.get("/models/{model_id}")
    async def get_model(model_id: str, request: Request):
        await chat.gate.caller(request)
        chat.pick(model_id)   # 404 for a model not served
        return info(model_id)

    return router


def anthropic_router(chat: ChatService, store: Store | None) -> APIRouter:
    """POST /messages and /messages/count_tokens; the app mounts it at /v1 and /anthropic/v1."""
    router = APIRouter()
    signer = Signer(store)

    @router.post("/messages", openapi_extra=json_body(MessagesRequest))
    async def messages(request: Request):
        caller = await chat.gate.caller(request)
        req = MessagesRequest.parse(await request.body())
        sm = chat.pick(req.model)
        chat_req = to_chat(req, signer, stream=bool(req.stream), context=sm.context)
        run = ChatRun()
        response = await chat.run(caller, chat_req, sm, request, run)
        name = req.model or sm.name
        if isinstance(response, StreamingResponse):
            return sse(translate_stream(response.body_iterator, AnthropicStream(run, signer, name)))
        if response.status_code != 200:     # the client left (499): nobody reads this
            return response
        body = json.loads(response.body)
        return JSONResponse(await asyncio.to_thread(from_chat, body, run, signer, name))

    @router.post("/messages/count_tokens", openapi_extra=json_body(CountTokensRequest))
    async def count_tokens(request: Request):
        caller = await chat.gate.caller(request)
        req = CountTokensRequest.parse(await request.body())
        sm = chat.pick(req.model)
        # It runs the tokenizer on the caller's text: the caller's limits apply, as to /tokenize.
        await chat.gate.check_funds(caller)
        chat.gate.count_request(caller)
        chat_req = to_chat(req, signer, context=sm.context)
        prompt = (await chat_plan(sm, chat_req)).prompt
        return {"input_tokens": len(prompt.ids)}

    return router

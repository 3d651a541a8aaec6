"""The OpenAI Responses API on the chat pipeline: POST /v1/responses, GET and DELETE /v1/responses/{id}.

Owns the translation only, both ways:
  * in: a Responses request (`ResponsesRequest`) → the internal ChatCompletionRequest (`chat_body`):
    instructions → a system message; `input` text or items (messages with input_text/output_text parts,
    function_call, function_call_output) → chat messages with tool_calls and role "tool"; function tools →
    chat function tools; text.format → response_format; reasoning.effort → reasoning_effort ("none" turns
    thinking off); max_output_tokens → max_tokens; `previous_response_id` → the stored conversation first;
  * out: the ChatCompletion body or the chat SSE stream → a Response with reasoning, message and
    function_call output items, or the typed `response.*` events (`Output` builds the items for both, so a
    streamed response ends as exactly the object a non-streamed one returns, and the one stored).
Auth, reservations, billing, the engine and the SSE machinery are the chat route's own (serve/routes.py
ChatService). Storage (`store`, default true as at OpenAI) is the Store's responses table: per key, kept for
the server's retention setting, counted against the key's storage quota; another key's id is a 404.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError

from nanoseek.errors import NanoseekError
from nanoseek.serve.errors import (
    ApiError,
    from_validation_errors,
    json_object,
    to_api_error,
)
from nanoseek.serve.routes import ChatRun, ChatService, json_body
from nanoseek.serve.schemas import (
    SSE_DONE,
    SSE_KEEPALIVE,
    ChatCompletionRequest,
    Unsupported,
    given_fields,
    reject_unsupported,
)
from nanoseek.serve.store import Store
from nanoseek.serve.streams import replay_chunk, sse

# Responses parameters nanoseek cannot honour (the chat route's kind of table; a false value asks for nothing)
_UNSUPPORTED_PARAMETERS: Unsupported = {
    "background": (lambda v: not v, "background responses are not offered"),
    "conversation": (lambda v: not v, "use previous_response_id to continue a stored response"),
    "prompt": (lambda v: not v, "stored prompt templates are not offered"),
}


class ResponsesRequest(BaseModel):
    """POST /v1/responses. Items are checked by `chat_body`, which names the offending item in its 400."""

    model_config = ConfigDict(strict=True, extra="allow")

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    reasoning: dict[str, Any] | None = None
    text: dict[str, Any] | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool | None = None
    store: bool | None = None
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    truncation: Literal["disabled", "auto"] | None = None

    @classmethod
    def parse(cls, raw: bytes) -> ResponsesRequest:
        data = json_object(raw)
        reject_unsupported(data, _UNSUPPORTED_PARAMETERS)
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise from_validation_errors(err.errors()) from None

    @property
    def stored(self) -> bool:
        return self.store is not False


# ---------------------------------------------------------------------------------------------------------
# In: items → chat messages


def _part_text(content: Any, where: str) -> str:
    """A message's content: a string, or input_text/output_text parts (joined with no separator)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError.invalid_schema(f"Invalid type for '{where}': expected a string or an array of parts.",
                                      param=where)
    out = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
            out.append(part["text"])
        elif kind in ("input_image", "input_file", "input_audio"):
            raise ApiError(400, f"Invalid '{where}[{j}]': '{kind}' parts are not supported; nanoseek serves "
                                "text-only models.", param=f"{where}[{j}]", code="unsupported_content_type")
        else:
            raise ApiError.invalid_schema(f"Invalid '{where}[{j}]': expected an input_text or output_text part.",
                                          param=f"{where}[{j}]")
    return "".join(out)


def input_messages(items: str | list[dict]) -> list[dict]:
    """The chat messages for `input`. Consecutive function_call items are one assistant turn's tool_calls."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict] = []
    pending_reasoning = ""
    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise ApiError.invalid_schema(f"Invalid '{where}.role': expected one of user, system, developer, "
                                              f"assistant, but got {json.dumps(role)} instead.", param=f"{where}.role")
            out.append({"role": role, "content": _part_text(item.get("content"), f"{where}.content")})
            if role == "assistant" and pending_reasoning:
                out[-1]["reasoning_content"], pending_reasoning = pending_reasoning, ""
        elif kind == "function_call":
            call = {"id": _string(item, "call_id", where), "type": "function",
                    "function": {"name": _string(item, "name", where), "arguments": _string(item, "arguments", where)}}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant" and not pending_reasoning:
                last.setdefault("tool_calls", []).append(call)    # the text of this turn, then its calls
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
                if pending_reasoning:
                    out[-1]["reasoning_content"], pending_reasoning = pending_reasoning, ""
        elif kind == "function_call_output":
            output = item.get("output")
            out.append({"role": "tool", "tool_call_id": _string(item, "call_id", where),
                        "content": _part_text(output, f"{where}.output")})
        elif kind == "reasoning":
            # kept as the next assistant turn's reasoning_content, which the chat route feeds back only
            # behind tool calls (DeepSeek's replay rule)
            parts = item.get("content")
            pending_reasoning += "".join(p["text"] for p in (parts if isinstance(parts, list) else [])
                                         if isinstance(p, dict) and isinstance(p.get("text"), str))
            continue
        else:
            raise ApiError.unsupported(f"{where}.type", f"input items of type '{kind}' are not supported")
    return out


def _string(item: dict, key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise ApiError.invalid_schema(f"Invalid '{where}.{key}': expected a string.", param=f"{where}.{key}")
    return value


def _tools(tools: list[dict]) -> list[dict]:
    out = []
    for i, t in enumerate(tools):
        if t.get("type") != "function":
            raise ApiError.unsupported(f"tools[{i}].type", f"the built-in tool '{t.get('type')}' is not available; "
                                       "only function tools are")
        fn = {"name": t.get("name"), "parameters": t.get("parameters") or {"type": "object", "properties": {}}}
        for key in ("description", "strict"):
            if t.get(key) is not None:
                fn[key] = t[key]
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice: str | dict) -> str | dict:
    if isinstance(choice, str):
        return choice
    if choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    raise ApiError.unsupported("tool_choice", f"tool_choice of type '{choice.get('type')}' is not supported")


def _response_format(fmt) -> dict | None:
    if not isinstance(fmt, dict):
        raise ApiError.invalid_schema("Invalid type for 'text.format': expected an object.", param="text.format")
    kind = fmt.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if fmt.get(k) is not None}
        return {"type": "json_schema", "json_schema": spec}
    raise ApiError.bad_request(f"Invalid 'text.format.type': '{kind}'.", param="text.format.type")


def chat_body(req: ResponsesRequest, history: list[dict], stream: bool = False) -> tuple[dict, list[dict]]:
    """(the chat request body, the conversation it continues, without the instructions). `history`: the
    conversation stored with previous_response_id (OpenAI does not carry instructions over)."""
    conversation = history + input_messages(req.input)
    if not conversation:
        raise ApiError.bad_request("Invalid 'input': empty array. Expected at least one item.", param="input")
    messages = ([{"role": "system", "content": req.instructions}] if req.instructions else []) + conversation
    body: dict[str, Any] = {"messages": messages}
    if req.model is not None:
        body["model"] = req.model
    if req.max_output_tokens is not None:
        body["max_tokens"] = req.max_output_tokens
    body.update(given_fields(req, ("temperature", "top_p", "parallel_tool_calls")))
    if req.tools:
        body["tools"] = _tools(req.tools)
    if req.tool_choice is not None:
        body["tool_choice"] = _tool_choice(req.tool_choice)
    effort = (req.reasoning or {}).get("effort")
    if effort == "none":
        body["thinking"] = {"type": "disabled"}
    elif effort is not None:
        body["reasoning_effort"] = effort
    fmt = (req.text or {}).get("format")
    if fmt and (rf := _response_format(fmt)) is not None:
        body["response_format"] = rf
    if stream:
        body["stream"], body["stream_options"] = True, {"include_usage": True}
    return body, conversation


# ---------------------------------------------------------------------------------------------------------
# Out: the output items, streamed or whole


def _new(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class Output:
    """The output items of one response, built piece by piece; each step returns the typed events it makes
    (a streamed response sends them, a whole one drops them). Items: reasoning (reasoning_text), message
    (output_text), function_call."""

    def __init__(self):
        self.items: list[dict] = []
        self.open: dict | None = None
        self.seq = 0
        self.finish: str | None = None

    def event(self, kind: str, **data) -> dict:
        ev = {"type": kind, "sequence_number": self.seq, **data}
        self.seq += 1
        return ev

    def _where(self) -> dict:
        return {"item_id": self.open["id"], "output_index": len(self.items) - 1}

    def _start(self, item: dict, part: dict | None) -> list[dict]:
        out = self.close()
        self.items.append(item)
        self.open = item
        out.append(self.event("response.output_item.added", output_index=len(self.items) - 1,
                              item={**item, "content": [] if "content" in item else None} if part else item))
        if part is not None:
            out.append(self.event("response.content_part.added", **self._where(), content_index=0, part=dict(part)))
        return out

    def reasoning(self, text: str) -> list[dict]:
        out = []
        if self.open is None or self.open["type"] != "reasoning":
            part = {"type": "reasoning_text", "text": ""}
            out += self._start({"id": _new("rs"), "type": "reasoning", "summary": [], "content": [part],
                                "status": "in_progress"}, part)
        self.open["content"][0]["text"] += text
        return out + [self.event("response.reasoning_text.delta", **self._where(), content_index=0, delta=text)]

    def text(self, text: str) -> list[dict]:
        out = []
        if self.open is None or self.open["type"] != "message":
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            out += self._start({"id": _new("msg"), "type": "message", "role": "assistant", "status": "in_progress",
                                "content": [part]}, part)
        self.open["content"][0]["text"] += text
        return out + [self.event("response.output_text.delta", **self._where(), content_index=0, delta=text,
                                 logprobs=[])]

    def call(self, call_id: str, name: str) -> list[dict]:
        return self._start({"id": _new("fc"), "type": "function_call", "call_id": call_id, "name": name,
                            "arguments": "", "status": "in_progress"}, None)

    def arguments(self, fragment: str) -> list[dict]:
        self.open["arguments"] += fragment
        return [self.event("response.function_call_arguments.delta", **self._where(), delta=fragment)]

    def close(self) -> list[dict]:
        item, self.open = self.open, None
        if item is None:
            return []
        where = {"item_id": item["id"], "output_index": len(self.items) - 1}   # the open item is the last
        # a message cut by max_output_tokens is "incomplete"; everything else that ended is complete
        item["status"] = "incomplete" if item["type"] == "message" and self.finish == "length" else "completed"
        out = []
        if item["type"] == "reasoning":
            part = item["content"][0]
            out += [self.event("response.reasoning_text.done", **where, content_index=0, text=part["text"]),
                    self.event("response.content_part.done", **where, content_index=0, part=part)]
        elif item["type"] == "message":
            part = item["content"][0]
            out += [self.event("response.output_text.done", **where, content_index=0, text=part["text"], logprobs=[]),
                    self.event("response.content_part.done", **where, content_index=0, part=part)]
        else:
            out.append(self.event("response.function_call_arguments.done", **where, name=item["name"],
                                  arguments=item["arguments"]))
        return out + [self.event("response.output_item.done", output_index=where["output_index"], item=item)]

    def feed_chunk(self, chunk: dict) -> list[dict]:
        """Events for one chat stream chunk (a dict)."""
        return replay_chunk(chunk, self)

    def feed_message(self, message: dict, finish: str | None) -> None:
        """A whole chat message (non-streamed), through the same steps."""
        self.finish = finish
        if message.get("reasoning_content") is not None:
            self.reasoning(message["reasoning_content"])
        if message.get("content") or not message.get("tool_calls"):
            self.text(message.get("content") or "")
        for call in message.get("tool_calls") or []:
            self.call(call["id"], call["function"]["name"])
            self.arguments(call["function"]["arguments"])
        self.close()

    def reply(self) -> dict:
        """The assistant turn these items add to the conversation (what previous_response_id continues)."""
        text = "".join(i["content"][0]["text"] for i in self.items if i["type"] == "message")
        calls = [{"id": i["call_id"], "type": "function", "function": {"name": i["name"], "arguments": i["arguments"]}}
                 for i in self.items if i["type"] == "function_call"]
        reasoning = "".join(i["content"][0]["text"] for i in self.items if i["type"] == "reasoning")
        return {"role": "assistant", "content": text if text or not calls else None,
                **({"tool_calls": calls} if calls else {}),
                # the replay rule: reasoning behind tool calls stays in the history (the chat route drops it
                # from the prompt otherwise)
                **({"reasoning_content": reasoning} if calls and reasoning else {})}


def usage(chat_usage: dict | None) -> dict | None:
    if chat_usage is None:
        return None
    details = chat_usage.get("completion_tokens_details") or {}
    return {"input_tokens": chat_usage["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": chat_usage.get("prompt_cache_hit_tokens", 0),
                                     "cache_write_tokens": 0},
            "output_tokens": chat_usage["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": details.get("reasoning_tokens", 0)},
            "total_tokens": chat_usage["prompt_tokens"] + chat_usage["completion_tokens"]}


def response_object(rid: str, created: float, req: ResponsesRequest, model: str, stored: bool,
                    output: Output | None = None, chat_usage: dict | None = None) -> dict:
    """The Response object: in progress without `output`, else completed (or incomplete when the output
    ran into max_output_tokens or the context)."""
    done = output is not None
    incomplete = done and output.finish == "length"
    fmt = (req.text or {}).get("format") or {"type": "text"}
    return {
        "id": rid, "object": "response", "created_at": created,
        "status": ("incomplete" if incomplete else "completed") if done else "in_progress",
        "completed_at": time.time() if done and not incomplete else None,
        "error": None, "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "instructions": req.instructions, "max_output_tokens": req.max_output_tokens, "model": model,
        "output": output.items if done else [], "parallel_tool_calls": req.parallel_tool_calls is not False,
        "previous_response_id": req.previous_response_id,
        "reasoning": {"effort": (req.reasoning or {}).get("effort"), "summary": None},
        "store": stored, "temperature": req.temperature, "top_p": req.top_p, "text": {"format": fmt},
        "tool_choice": req.tool_choice if req.tool_choice is not None else "auto", "tools": req.tools or [],
        "truncation": req.truncation or "disabled", "usage": usage(chat_usage) if done else None,
        "user": req.user, "metadata": req.metadata or {},
    }


def _sse(ev: dict) -> str:
    return f"event: {ev['type']}\ndata: {json.dumps(ev, ensure_ascii=False)}\n\n"


# ---------------------------------------------------------------------------------------------------------
# The routes


def responses_router(chat: ChatService, store: Store | None) -> APIRouter:
    """POST /responses, GET and DELETE /responses/{id}; the app mounts it with and without /v1."""
    router = APIRouter()

    async def save(caller, rid: str, body: dict, conversation: list[dict], output: Output) -> bool:
        """Store the response; False instead of a 413 when the key's storage quota cannot hold it. Generated
        output is never thrown away: a full quota is refused before anything runs (`room`), and an answer
        that turns out too big to keep is still returned, with store false."""
        history = json.dumps(conversation + [output.reply()], ensure_ascii=False)
        try:
            await asyncio.to_thread(store.put_response, caller.key_id, rid, json.dumps(body, ensure_ascii=False),
                                    history)
            return True
        except NanoseekError as exc:
            if to_api_error(exc).status != 413:
                raise
            logging.getLogger(__name__).warning("response not stored: %s", exc)
            return False

    def room(caller) -> None:
        """413 before generating when the key's storage is already full (nothing is run or billed)."""
        cap = store.limits.stored_bytes_per_owner
        if cap is not None and store.stored_bytes(caller.key_id) >= cap:
            raise ApiError(413, f"This key's stored data is at its quota of {cap} bytes; delete stored responses "
                                "or conversations, or send store: false.", code="storage_quota_exceeded")

    def load_history(caller, response_id: str) -> list[dict]:
        if store is None:
            raise ApiError.not_found(f"No response found with id '{response_id}'.", param="previous_response_id")
        try:
            return json.loads(store.get_response(caller.key_id, response_id)[1])
        except NanoseekError as e:
            raise ApiError.not_found(str(e), param="previous_response_id") from None

    @router.post("/responses", openapi_extra=json_body(ResponsesRequest))
    async def create(request: Request):
        caller = await chat.gate.caller(request)
        req = ResponsesRequest.parse(await request.body())
        sm = chat.pick(req.model)
        history = (await asyncio.to_thread(load_history, caller, req.previous_response_id)
                   if req.previous_response_id else [])
        body, conversation = chat_body(req, history, stream=bool(req.stream))
        chat_req = ChatCompletionRequest.parse(body)
        stored = req.stored and store is not None
        if stored:
            await asyncio.to_thread(room, caller)
        run = ChatRun()
        response = await chat.run(caller, chat_req, sm, request, run)
        rid, created, name = _new("resp"), time.time(), req.model or sm.name
        if isinstance(response, StreamingResponse):
            return sse(_stream(response.body_iterator, rid, created, req, name, stored, conversation, caller, save))
        if response.status_code != 200:     # the client left (499): nobody reads this
            return response
        completion = json.loads(response.body)
        output = Output()
        choice = completion["choices"][0]
        output.feed_message(choice["message"], choice["finish_reason"])
        obj = response_object(rid, created, req, name, stored, output, completion["usage"])
        if stored and not await save(caller, rid, obj, conversation, output):
            obj["store"] = False
        return JSONResponse(obj)

    @router.get("/responses/{response_id}")
    async def retrieve(response_id: str, request: Request):
        caller = await chat.gate.caller(request)
        if store is None:
            raise ApiError.not_found(f"No response found with id '{response_id}'.")
        body, _ = await asyncio.to_thread(store.get_response, caller.key_id, response_id)
        return JSONResponse(json.loads(body))

    @router.delete("/responses/{response_id}")
    async def delete(response_id: str, request: Request):
        caller = await chat.gate.caller(request)
        if store is None:
            raise ApiError.not_found(f"No response found with id '{response_id}'.")
        await asyncio.to_thread(store.delete_response, caller.key_id, response_id)
        return {"id": response_id, "object": "response", "deleted": True}

    return router


async def _stream(chat_events, rid, created, req, name, stored, conversation, caller, keep):
    """Run the chat stream (its keep-alives, billing and cancellation) and send its content as typed events.
    Closing this generator closes the chat one, whose `finally` cancels the engine and bills what ran."""
    output = Output()
    chat_usage = None
    try:
        start = response_object(rid, created, req, name, stored)
        yield _sse(output.event("response.created", response=start))
        yield _sse(output.event("response.in_progress", response=start))
        async for raw in chat_events:
            if raw == SSE_KEEPALIVE:
                yield raw
                continue
            if raw == SSE_DONE:
                for ev in output.close():
                    yield _sse(ev)
                final = response_object(rid, created, req, name, stored, output, chat_usage)
                if stored and not await keep(caller, rid, final, conversation, output):
                    final["store"] = False    # too big for the quota: the answer stands, unstored
                kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
                yield _sse(output.event(kind, response=final))
                continue
            payload = json.loads(raw.removeprefix("data: "))
            if "error" in payload and "choices" not in payload:
                err = payload["error"]
                yield _sse(output.event("error", code=err.get("code"), message=err.get("message", ""),
                                        param=err.get("param")))
                continue
            if payload.get("usage") is not None:
                chat_usage = payload["usage"]
            for ev in output.feed_chunk(payload):
                yield _sse(ev)
    finally:
        await chat_events.aclose()

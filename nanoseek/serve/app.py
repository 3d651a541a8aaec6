"""The HTTP server: FastAPI routes over running Schedulers (DeepSeek/OpenAI-compatible API).

Owns the routes, authentication (Bearer keys from the Store), rate limits and budgets, the usage ledger
writes, and turning engine output into response bodies and SSE streams. The contract itself (what a body
may say, every response shape) is serve/schemas.py; error bodies are serve/errors.py; the thread↔asyncio
hand-off is serve/bridge.py; Prometheus metrics are serve/metrics.py. Every route is served both with and
without the `/v1` prefix. Generating routes read their body themselves (so that a bad key is a 401 before a
bad body is a 400); the OpenAPI spec still publishes each body's schema (`_publish_request_bodies`).

The engine runs on each Scheduler's own thread; handlers only submit, await deltas and do cheap
bookkeeping. SQLite calls go to a worker thread so a slow disk never stalls the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass, field

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from tokenizers import decoders
from transformers.convert_slow_tokenizer import bytes_to_unicode

from nanoseek.chat import CLOSE_TAG, OPEN_TAG, Prompt, ReasoningSplitter, render_prompt, split_reasoning
from nanoseek.engine.scheduler import Scheduler
from nanoseek.errors import NanoseekError
from nanoseek.serve.bridge import ClientGone, Job
from nanoseek.serve.errors import ApiError, error_response
from nanoseek.serve.guard import Guard, GuardConfig
from nanoseek.serve.limits import RateLimiter
from nanoseek.serve.metrics import ServerMetrics
from nanoseek.serve.schemas import (SSE_DONE, SSE_KEEPALIVE, ChatChoice, ChatChunkChoice, ChatCompletion,
                                    ChatCompletionChunk, ChatCompletionRequest, ChatDelta, ChatLogprobs,
                                    ChatMessage, Completion, CompletionChoice, CompletionLogprobs,
                                    CompletionRequest, DetokenizeRequest, DetokenizeResponse, ModelCard, ModelList,
                                    TokenizeRequest, TokenizeResponse, TokenLogprob, TopLogprob, Usage,
                                    choice_params, new_id, sse_event, to_sampling_params)
from nanoseek.serve.store import KeyRecord, PriceTable, Store
from nanoseek.serve.web import web_router

log = logging.getLogger(__name__)


@dataclass
class ServedModel:
    """One model as the server exposes it. `reasoning`: an R1-style model whose `<think>` block goes to
    reasoning_content. `context` is the longest prompt + output it serves (the scheduler's cache length)."""

    name: str
    tokenizer: object
    scheduler: Scheduler
    context: int
    reasoning: bool = False
    prices: PriceTable = field(default_factory=PriceTable)
    root: str | None = None          # what the weights were loaded from (vLLM's tokenizer hint)
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass
class _Caller:
    key: KeyRecord | None


def create_app(models: dict[str, ServedModel], store: Store | None, *, require_auth: bool,
               mirror_reasoning: bool = False, keepalive_s: float = 10.0, poll_s: float = 0.5,
               guard: GuardConfig | None = None, docs: bool = False) -> FastAPI:
    """The app. Schedulers must already be running; the caller owns starting and stopping them.
    guard: the body limit and the Host check (serve/guard.py; None: the defaults). An open loopback server
    sets loopback_only, so a web page on another origin cannot reach it through DNS rebinding and read the
    local user's conversations. docs: serve /docs and /redoc (their pages load scripts from a CDN;
    /openapi.json is always served).
    keepalive_s: silence after which a waiting stream gets a `: keep-alive` comment; poll_s: how often an
    idle request checks for a disconnected client or a failed engine step."""
    if not models:
        raise ValueError("serve at least one model")
    if require_auth and store is None:
        raise ValueError("require_auth needs a store holding the keys")
    app = FastAPI(title="nanoseek", description="DeepSeek/OpenAI-compatible API served by nanoseek.",
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None)
    limiter = RateLimiter()
    metrics = ServerMetrics({n: m.scheduler.stats for n, m in models.items()})
    app.state.metrics = metrics
    default_model = next(iter(models))
    _register_error_handlers(app)
    _publish_request_bodies(app)

    # -- helpers that need the app's state ----------------------------------------------------------------

    async def authenticate(request: Request) -> _Caller:
        if store is None:
            return _Caller(None)
        if not require_auth and not await asyncio.to_thread(store.any_keys):
            return _Caller(None)      # an open server: no keys were ever created and it listens on loopback
        header = request.headers.get("authorization", "")
        scheme, _, secret = header.partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            raise ApiError.authentication("Authentication failed: send the API key as 'Authorization: Bearer KEY'.")
        key = await asyncio.to_thread(store.authenticate, secret.strip())
        if key is None:
            raise ApiError.authentication()
        return _Caller(key)

    async def check_budget(caller: _Caller) -> None:
        if caller.key is None or caller.key.budget_usd is None:
            return
        remaining = await asyncio.to_thread(store.remaining_usd, caller.key.id)
        if remaining is not None and remaining <= 0:
            raise ApiError.insufficient_balance(f"Insufficient balance: key {caller.key.prefix}… has spent its "
                                                f"budget of ${caller.key.budget_usd:.2f}.")

    def rate_limit(caller: _Caller, tokens: int) -> None:
        if caller.key is None:
            return
        wait = limiter.check(caller.key.id, tokens, rpm=caller.key.rpm, tpm=caller.key.tpm)
        if wait is not None:
            raise ApiError.rate_limited(wait)

    def pick(name: str | None) -> ServedModel:
        if name is None:
            return models[default_model]
        if name not in models:
            raise ApiError.model_not_found(name)
        return models[name]

    def record(caller: _Caller, sm: ServedModel, prompt_tokens: int, job: Job, started: float,
               reasoning_tokens: int = 0, choices_per_prompt: int = 1) -> None:
        """One ledger row per request that reached the engine, cancelled ones included (the compute was
        spent). Fire-and-forget on a worker thread: it may run from a cancelled stream's `finally`."""
        completion = sum(job.generated)
        if store is None:
            if caller.key is not None:
                limiter.charge(caller.key.id, completion)
            return
        finish = ",".join(sorted({f for f in job.finish if f})) or None
        key_id = caller.key.id if caller.key else None
        latency = time.monotonic() - started

        def write():
            try:
                # A dropped stream's choices end at the scheduler's next step; their prefix-cache hits are
                # known only then (the wait is nil for every request that ran to its end).
                for h in job.handles:
                    try:
                        h.result(timeout=10)
                    except Exception:
                        pass
                # Bill what the engine generated, not what the client read: a slow reader that hangs up
                # leaves tokens in the queue that were computed all the same.
                done = [h.completion for h in job.handles if h.completion is not None]
                generated = sum(len(c.token_ids) + (c.stop_token is not None) for c in done)
                total = max(completion, generated)
                if caller.key is not None:
                    limiter.charge(caller.key.id, total)
                hit = _hits(job, prompt_tokens, choices_per_prompt)
                miss = prompt_tokens - hit
                store.record_usage(key_id, sm.name, hit, miss, total, min(reasoning_tokens, total),
                                   latency, finish, sm.prices.cost(hit, miss, total))
            except Exception:
                log.exception("could not record usage")
        try:
            asyncio.get_running_loop().run_in_executor(None, write)
        except RuntimeError:      # a stream closed outside the event loop (garbage-collected): write here
            write()

    async def read_body(request: Request, model_cls):
        return model_cls.parse_json(await request.body())

    async def admit(request: Request, model_cls):
        """What every generating route does first: who is calling, what they asked, which model, and
        whether their budget still allows it — in that order, so a bad key is a 401 before any 400."""
        caller = await authenticate(request)
        req = await read_body(request, model_cls)
        sm = pick(req.model)
        await check_budget(caller)
        return caller, req, sm

    # -- routes ---------------------------------------------------------------------------------------------

    router = APIRouter()

    @router.get("/health")
    async def health():
        return {"status": "ok", "models": {n: m.scheduler.stats()["running"] for n, m in models.items()}}

    @router.get("/metrics", response_class=Response,
                responses={200: {"content": {"text/plain": {}}, "description": "Prometheus exposition."}})
    async def prometheus(request: Request):
        # Open like /health (as in vLLM, SGLang, llama.cpp): aggregate load figures, no prompts or keys.
        # Rendered off the event loop: stats() takes each scheduler's lock.
        body, content_type = await asyncio.to_thread(metrics.render, request.headers.get("accept"))
        return Response(body, media_type=content_type)

    @router.get("/models", response_model=ModelList)
    async def list_models(request: Request):
        await authenticate(request)
        return ModelList(data=[ModelCard(id=n, created=m.created, root=m.root or n, max_model_len=m.context)
                               for n, m in models.items()])

    @router.get("/user/balance")
    async def balance(request: Request):
        caller = await authenticate(request)
        body = None if caller.key is None else await asyncio.to_thread(store.balance, caller.key.id)
        if body is None:   # no key or no budget: DeepSeek's shape, saying "unlimited" as best it can
            body = {"is_available": True, "balance_infos": []}
        return body

    @router.post("/tokenize", response_model=TokenizeResponse, openapi_extra=_json_body(TokenizeRequest))
    async def tokenize(request: Request):
        await authenticate(request)
        req = await read_body(request, TokenizeRequest)
        sm = pick(req.model)
        tok = sm.tokenizer
        if req.prompt is not None:
            ids = tok.encode(req.prompt, add_special_tokens=req.add_special_tokens is not False)
        else:
            chat = ChatCompletionRequest.parse({"messages": [m.model_dump(exclude_none=True) for m in req.messages]})
            ids = render_prompt(tok, chat.template_messages(), add_generation_prompt=req.add_generation_prompt).ids
        strs = tok.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=sm.context, tokens=list(ids), token_strs=strs)

    @router.post("/detokenize", response_model=DetokenizeResponse, openapi_extra=_json_body(DetokenizeRequest))
    async def detokenize(request: Request):
        await authenticate(request)
        req = await read_body(request, DetokenizeRequest)
        sm = pick(req.model)
        vocab = len(sm.tokenizer)
        if any(t < 0 or t >= vocab for t in req.tokens):
            raise ApiError.bad_request(f"Invalid 'tokens': ids must be in [0, {vocab}).", param="tokens")
        return DetokenizeResponse(prompt=sm.tokenizer.decode(req.tokens))

    @router.post("/chat/completions", openapi_extra=_json_body(ChatCompletionRequest))
    async def chat_completions(request: Request):
        caller, req, sm = await admit(request, ChatCompletionRequest)
        prompt = _chat_prompt(sm, req)
        params = to_sampling_params(req, prompt_tokens=len(prompt.ids), max_model_len=sm.context)
        n = req.n or 1
        rate_limit(caller, len(prompt.ids))
        started = time.monotonic()
        job = Job(sm.scheduler, [prompt.ids] * n, choice_params(params, n), request, poll_s,
                  metrics.timer(sm.name, n))
        name = req.model or sm.name
        split = sm.reasoning or prompt.starts_in_reasoning
        mirror = mirror_reasoning if req.mirror_reasoning is None else req.mirror_reasoning
        if req.stream:
            return _sse(_chat_stream(job, sm, name, prompt, split, mirror, req.include_usage, keepalive_s,
                                     lambda r: record(caller, sm, len(prompt.ids), job, started, r, n)))
        try:
            async for _ in job.events():
                pass
        except ClientGone:
            record(caller, sm, len(prompt.ids), job, started, choices_per_prompt=n)
            return JSONResponse({}, status_code=499)   # nobody is listening; the status is for the log
        except BaseException:
            job.cancel()
            record(caller, sm, len(prompt.ids), job, started, choices_per_prompt=n)
            raise
        choices, reasoning_tokens = [], 0
        for i, h in enumerate(job.handles):
            out = h.completion
            reasoning, content = split_reasoning(out.text, prompt.starts_in_reasoning) if split else (None, out.text)
            if reasoning:
                reasoning_tokens += len(sm.tokenizer.encode(reasoning, add_special_tokens=False))
            lps = (ChatLogprobs(content=_chat_logprobs(sm.tokenizer, zip(out.token_ids, out.logprobs)))
                   if out.logprobs is not None else None)
            choices.append(ChatChoice(index=i, message=ChatMessage.of(content, reasoning, mirror), logprobs=lps,
                                      finish_reason=_finish(out.finish_reason)))
        usage = _usage(len(prompt.ids), sum(job.generated), reasoning_tokens, _hits(job, len(prompt.ids), n))
        record(caller, sm, len(prompt.ids), job, started, reasoning_tokens, n)
        return JSONResponse(ChatCompletion(model=name, choices=choices, usage=usage).model_dump(mode="json"))

    @router.post("/completions", openapi_extra=_json_body(CompletionRequest))
    async def completions(request: Request):
        caller, req, sm = await admit(request, CompletionRequest)
        vocab = len(sm.tokenizer)
        prompts = []
        for i, p in enumerate(req.prompts):
            ids = sm.tokenizer.encode(p) if isinstance(p, str) else list(p)
            if not ids:
                raise ApiError.bad_request(f"Invalid 'prompt[{i}]': it encodes to no tokens.", param="prompt")
            if max(ids) >= vocab:
                raise ApiError.bad_request(f"Invalid 'prompt': token ids must be below {vocab}.", param="prompt")
            prompts.append(ids)
        n = req.n or 1
        if len(prompts) * n > sm.scheduler.max_queue:
            # A 503 ("retry shortly") would be a lie: the queue can never take this request whole.
            raise ApiError.bad_request(f"Invalid 'prompt': {len(prompts)} prompts × n={n} ask for "
                                       f"{len(prompts) * n} completions at once; this server queues at most "
                                       f"{sm.scheduler.max_queue}.", param="prompt")
        per_prompt = [choice_params(to_sampling_params(req, prompt_tokens=len(ids), max_model_len=sm.context), n)
                      for ids in prompts]
        prompt_tokens = sum(len(ids) for ids in prompts)
        rate_limit(caller, prompt_tokens)
        started = time.monotonic()
        all_ids = [ids for ids in prompts for _ in range(n)]   # choice index = prompt_index * n + i
        job = Job(sm.scheduler, all_ids, [p for ps in per_prompt for p in ps], request, poll_s,
                  metrics.timer(sm.name, len(all_ids)))
        # echo: the prompt as sent (a string as is, token ids as text without special tokens like BOS)
        texts = [p if isinstance(p, str) else sm.tokenizer.decode(p, skip_special_tokens=True) for p in req.prompts]
        echoes = [texts[k // n] if req.echo else "" for k in range(len(all_ids))]
        name = req.model or sm.name
        if req.stream:
            return _sse(_completion_stream(job, sm, name, echoes, prompt_tokens, n, req.include_usage,
                                           keepalive_s, lambda: record(caller, sm, prompt_tokens, job, started,
                                                                       choices_per_prompt=n)))
        try:
            async for _ in job.events():
                pass
        except ClientGone:
            record(caller, sm, prompt_tokens, job, started, choices_per_prompt=n)
            return JSONResponse({}, status_code=499)
        except BaseException:
            job.cancel()
            record(caller, sm, prompt_tokens, job, started, choices_per_prompt=n)
            raise
        choices = []
        for i, h in enumerate(job.handles):
            out = h.completion
            lps = (_completion_logprobs(sm.tokenizer, zip(out.token_ids, out.logprobs))[0]
                   if out.logprobs is not None else None)
            choices.append(CompletionChoice(index=i, text=echoes[i] + out.text, logprobs=lps,
                                            finish_reason=_finish(out.finish_reason)))
        record(caller, sm, prompt_tokens, job, started, choices_per_prompt=n)
        usage = _usage(prompt_tokens, sum(job.generated), cached_tokens=_hits(job, prompt_tokens, n))
        body = Completion(model=name, choices=choices, usage=usage)
        return JSONResponse(body.model_dump(mode="json"))

    app.include_router(router, prefix="/v1")
    app.include_router(router)
    web = web_router(models, store, require_auth=require_auth)   # the chat web app at /
    app.include_router(web)

    async def is_open() -> bool:     # authenticate's rule: no key is asked for
        return not require_auth and (store is None or not await asyncio.to_thread(store.any_keys))

    app.add_middleware(Guard, config=guard or GuardConfig(), web_owner=web.owner, is_open=is_open)
    return app


# ---------------------------------------------------------------------------------------------------------
# Errors


def _register_error_handlers(app: FastAPI) -> None:
    """Every failure leaves as an OpenAI error body (serve/errors.py); only real server faults are 500,
    and those are logged with their traceback since the body says nothing about them."""

    async def handle(request: Request, exc: Exception):
        status, headers, body = error_response(exc)
        if status >= 500 and not isinstance(exc, ApiError):
            log.error("error handling %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse(body, status_code=status, headers=headers)

    for exc_type in (ApiError, RequestValidationError, NanoseekError, StarletteHTTPException, Exception):
        app.add_exception_handler(exc_type, handle)


# ---------------------------------------------------------------------------------------------------------
# Prompts and responses


def _chat_prompt(sm: ServedModel, req: ChatCompletionRequest) -> Prompt:
    """The prompt to run. With chat prefix completion it ends with the given start of the reply, and the
    response holds only the continuation (as DeepSeek returns it)."""
    messages = req.template_messages()
    if not req.continues_final_message:
        return render_prompt(sm.tokenizer, messages, thinking=req.thinking_enabled)
    # Prefix completion: render the conversation before the prefix with a generation prompt, then append the
    # prefix as the start of the reply, so the model continues it instead of starting a new turn.
    base = render_prompt(sm.tokenizer, messages[:-1], thinking=req.thinking_enabled)
    prefix, reasoning = messages[-1]["content"], req.prefix_reasoning
    text, in_reasoning = base.text, base.starts_in_reasoning
    if reasoning is not None:
        text += ("" if in_reasoning else OPEN_TAG + "\n") + reasoning
        in_reasoning = True
    if prefix:
        if in_reasoning:
            text += "\n" + CLOSE_TAG + "\n\n"
            in_reasoning = False
        text += prefix
    template = getattr(sm.tokenizer, "chat_template", None)
    ids = sm.tokenizer.encode(text, add_special_tokens=not template)
    return Prompt(list(ids), text, in_reasoning)


def _finish(reason: str | None) -> str:
    # "cancelled" happens only when the server stops under a request, or the client is gone; the client (if
    # any) sees the output so far as a normal end.
    return reason if reason in ("stop", "length") else "stop"


def _usage(prompt_tokens: int, completion_tokens: int, reasoning_tokens: int = 0, cached_tokens: int = 0) -> Usage:
    return Usage.of(prompt_tokens, completion_tokens, cached_tokens=cached_tokens,
                    reasoning_tokens=min(reasoning_tokens, completion_tokens))


def _hits(job: Job, prompt_tokens: int, choices_per_prompt: int) -> int:
    """Prompt tokens served from the prefix cache, counted like prompt_tokens: each prompt once (see
    Job.cached_tokens). Clamped so usage stays consistent whatever the engine reports."""
    return min(sum(job.cached_tokens(choices_per_prompt)), prompt_tokens)


_BYTE_OF_CHAR = {c: b for b, c in bytes_to_unicode().items()}   # byte-level BPE's printable stand-ins
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")                # SentencePiece's byte-fallback pieces


def _token_bytes(tok, token_id: int, text: str) -> bytes:
    """The bytes a token stands for. Decoding a lone token loses them when it holds part of a multi-byte
    character (it decodes to U+FFFD); OpenAI's `bytes` field exists so clients can rebuild such characters."""
    piece = tok.convert_ids_to_tokens(token_id)
    if isinstance(piece, str):
        m = _BYTE_PIECE.fullmatch(piece)
        if m:
            return bytes([int(m[1], 16)])
        decoder = getattr(getattr(tok, "backend_tokenizer", None), "decoder", None)
        if isinstance(decoder, decoders.ByteLevel) and all(c in _BYTE_OF_CHAR for c in piece):
            return bytes(_BYTE_OF_CHAR[c] for c in piece)
    return text.encode()


def _token_str(tok, token_id: int) -> tuple[str, list[int]]:
    """A token as logprobs show it, and its bytes. Part of a multi-byte character is written
    "bytes:\\xNN…", as OpenAI does: decoded alone it would be U+FFFD, and distinct tokens would collide."""
    text = tok.decode([token_id], clean_up_tokenization_spaces=False)
    raw = _token_bytes(tok, token_id, text)
    try:
        raw.decode()
    except UnicodeDecodeError:
        text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
    return text, list(raw)


def _chat_logprobs(tok, pairs) -> list[TokenLogprob]:
    """OpenAI's chat logprobs.content from (token id, engine logprob row) pairs."""
    rows = []
    for token_id, lp in pairs:
        s, raw = _token_str(tok, token_id)
        top = [TopLogprob(token=t_s, logprob=v, bytes=t_raw)
               for (t_s, t_raw), v in ((_token_str(tok, t), v) for t, v in lp["top"])]
        rows.append(TokenLogprob(token=s, logprob=lp["logprob"], bytes=raw, top_logprobs=top))
    return rows


def _completion_logprobs(tok, pairs, offset: int = 0) -> tuple[CompletionLogprobs, int]:
    """Legacy logprobs from (token id, engine logprob row) pairs; text offsets start at `offset` (a stream
    continues them chunk to chunk). Returns them and the offset after the last token."""
    lps = CompletionLogprobs()
    for token_id, lp in pairs:
        s, raw = _token_str(tok, token_id)
        lps.tokens.append(s)
        lps.token_logprobs.append(lp["logprob"])
        lps.top_logprobs.append({_token_str(tok, t)[0]: v for t, v in lp["top"]} or None)
        lps.text_offset.append(offset)
        offset += len(bytes(raw).decode(errors="replace"))
    return lps, offset


class _StreamLogprobs:
    """Which logprob rows a stream still owes, per choice. Rows travel on the delta that sampled their token
    when the engine attaches them (`Delta.logprobs`); whatever is still unsent when a choice finishes comes
    from its Completion, so a stream always ends with exactly the rows a non-streamed request returns."""

    def __init__(self, job: Job, wanted: bool):
        self.job, self.wanted = job, wanted
        self.sent = [0] * len(job.handles)

    async def take(self, i: int, d) -> list[tuple[int, dict]]:
        if not self.wanted:
            return []
        if d.finish_reason is None:
            pairs = list(zip(d.token_ids, getattr(d, "logprobs", None) or []))
        else:
            out = await self.job.completion(i)
            pairs = list(zip(out.token_ids, out.logprobs or []))[self.sent[i]:] if out is not None else []
        self.sent[i] += len(pairs)
        return pairs


# ---------------------------------------------------------------------------------------------------------
# OpenAPI


def _json_body(cls) -> dict:
    """openapi_extra for a route that reads its own body: its schema, published by _publish_request_bodies."""
    ref = {"$ref": f"#/components/schemas/{cls.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def _publish_request_bodies(app: FastAPI) -> None:
    """Add the request models' JSON schemas (and their nested models) to the spec's components, where the
    routes' `_json_body` references point."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            spec = build()
            schemas = spec.setdefault("components", {}).setdefault("schemas", {})
            for cls in (ChatCompletionRequest, CompletionRequest, TokenizeRequest, DetokenizeRequest):
                schema = cls.model_json_schema(ref_template="#/components/schemas/{model}")
                schemas.update(schema.pop("$defs", {}))
                schemas[cls.__name__] = schema
        return app.openapi_schema

    app.openapi = openapi


# ---------------------------------------------------------------------------------------------------------
# Streams


def _sse(gen) -> StreamingResponse:
    # no-cache / no buffering: proxies must pass each event through as it is written.
    return StreamingResponse(gen, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _pump(job: Job, keepalive_s: float):
    """job.events() plus keep-alive comments: yields (i, delta) or the string SSE_KEEPALIVE."""
    quiet_since = time.monotonic()
    async for ev in job.events():
        if ev is not None:
            quiet_since = time.monotonic()
            yield ev
        elif job.queued and time.monotonic() - quiet_since >= keepalive_s:
            quiet_since = time.monotonic()
            yield SSE_KEEPALIVE


def _stream_error(exc: BaseException) -> str:
    _, _, body = error_response(exc)
    if body["error"]["type"] == "server_error":
        log.error("stream failed", exc_info=exc)
    return sse_event(body)


async def _chat_stream(job: Job, sm: ServedModel, name: str, prompt: Prompt, split: bool, mirror: bool,
                       include_usage: bool, keepalive_s: float, on_end):
    rid, created = new_id("chatcmpl"), int(time.time())
    n = len(job.handles)
    splitters = [ReasoningSplitter(start_in_reasoning=prompt.starts_in_reasoning) if split else None
                 for _ in range(n)]
    reasoning_text = [""] * n

    logprobs = _StreamLogprobs(job, job.handles[0].params.logprobs is not None)

    def chunk(i: int, delta: ChatDelta, finish: str | None = None, lps=None) -> str:
        return sse_event(ChatCompletionChunk(id=rid, created=created, model=name, choices=[
            ChatChunkChoice(index=i, delta=delta, finish_reason=finish,
                            logprobs=ChatLogprobs(content=_chat_logprobs(sm.tokenizer, lps)) if lps else None)]))

    reasoning_tokens = 0
    spoke = [False] * n
    try:
        async for ev in _pump(job, keepalive_s):
            if isinstance(ev, str):
                yield ev
                continue
            i, d = ev
            if not spoke[i]:
                # The role chunk goes out with the choice's first token, not on arrival: benchmark clients
                # (vllm bench serve) take the first chunk with `choices` as the first token.
                spoke[i] = True
                yield chunk(i, ChatDelta.of(role=True, content=""))
            sp = splitters[i]
            r, c = sp.feed(d.text) if sp else ("", d.text)
            if d.finish_reason is not None and sp:
                r2, c2 = sp.flush()
                r, c = r + r2, c + c2
            reasoning_text[i] += r
            lps = await logprobs.take(i, d)
            if r or c or lps:
                # a token whose text is held back (a partial character, a possible stop string) still sends
                # its logprob, with empty content, as OpenAI does
                yield chunk(i, ChatDelta.of(reasoning=r or None, content=c if c or not r else None,
                                            mirror=mirror), lps=lps)
            if d.finish_reason is not None:
                yield chunk(i, ChatDelta(), _finish(d.finish_reason))
        reasoning_tokens = sum(len(sm.tokenizer.encode(t, add_special_tokens=False)) for t in reasoning_text if t)
        if include_usage:
            yield sse_event(ChatCompletionChunk.usage_chunk(
                id=rid, created=created, model=name,
                usage=_usage(len(prompt.ids), sum(job.generated), reasoning_tokens,
                             _hits(job, len(prompt.ids), n))))
        yield SSE_DONE
    except ClientGone:
        pass
    except Exception as exc:     # mid-stream: the status line is gone, so the error travels as an event
        yield _stream_error(exc)
    finally:
        job.cancel()             # no-op when finished; frees the rows when the client dropped the stream
        on_end(reasoning_tokens)


async def _completion_stream(job: Job, sm: ServedModel, name: str, echoes: list[str], prompt_tokens: int,
                             choices_per_prompt: int, include_usage: bool, keepalive_s: float, on_end):
    rid, created = new_id("cmpl"), int(time.time())
    logprobs = _StreamLogprobs(job, job.handles[0].params.logprobs is not None)
    offsets = [0] * len(echoes)   # echo and logprobs exclude each other: offsets start at the output

    def chunk(i: int, text: str, finish: str | None = None, lps=None) -> str:
        lp = None
        if lps:
            lp, offsets[i] = _completion_logprobs(sm.tokenizer, lps, offsets[i])
        return sse_event(Completion(id=rid, created=created, model=name, choices=[
            CompletionChoice(index=i, text=text, logprobs=lp, finish_reason=finish)]))

    try:
        for i, echo in enumerate(echoes):
            if echo:
                yield chunk(i, echo)
        async for ev in _pump(job, keepalive_s):
            if isinstance(ev, str):
                yield ev
                continue
            i, d = ev
            lps = await logprobs.take(i, d)
            if d.text or d.finish_reason is not None or lps:
                yield chunk(i, d.text, _finish(d.finish_reason) if d.finish_reason is not None else None, lps)
        if include_usage:
            usage = _usage(prompt_tokens, sum(job.generated),
                           cached_tokens=_hits(job, prompt_tokens, choices_per_prompt))
            yield sse_event(Completion.usage_chunk(id=rid, created=created, model=name, usage=usage))
        yield SSE_DONE
    except ClientGone:
        pass
    except Exception as exc:
        yield _stream_error(exc)
    finally:
        job.cancel()
        on_end()

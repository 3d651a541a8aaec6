"""The HTTP server: FastAPI routes over running Schedulers (DeepSeek/OpenAI-compatible API).

Owns the routes, authentication (Bearer keys from the Store), rate limits and budgets, the usage ledger
writes, and turning engine output into response bodies and SSE streams. The contract itself (what a body
may say, every response shape) is serve/schemas.py; error bodies are serve/errors.py; the thread↔asyncio
hand-off is serve/bridge.py. Every route is served both with and without the `/v1` prefix.

The engine runs on each Scheduler's own thread; handlers only submit, await deltas and do cheap
bookkeeping. SQLite calls go to a worker thread so a slow disk never stalls the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanoseek.chat import CLOSE_TAG, OPEN_TAG, Prompt, ReasoningSplitter, render_prompt, split_reasoning
from nanoseek.engine.scheduler import Scheduler
from nanoseek.errors import NanoseekError
from nanoseek.serve.bridge import ClientGone, Job
from nanoseek.serve.errors import ApiError, error_response
from nanoseek.serve.limits import RateLimiter
from nanoseek.serve.schemas import (SSE_DONE, SSE_KEEPALIVE, ChatChoice, ChatChunkChoice, ChatCompletion,
                                    ChatCompletionChunk, ChatCompletionRequest, ChatDelta, ChatLogprobs,
                                    ChatMessage, Completion, CompletionChoice, CompletionLogprobs,
                                    CompletionRequest, DetokenizeRequest, DetokenizeResponse, ModelCard, ModelList,
                                    TokenizeRequest, TokenizeResponse, TokenLogprob, TopLogprob, Usage,
                                    choice_params, new_id, sse_event, to_sampling_params)
from nanoseek.serve.store import KeyRecord, PriceTable, Store

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
               mirror_reasoning: bool = False, keepalive_s: float = 10.0, poll_s: float = 0.5) -> FastAPI:
    """The app. Schedulers must already be running; the caller owns starting and stopping them.
    keepalive_s: silence after which a waiting stream gets a `: keep-alive` comment; poll_s: how often an
    idle request checks for a disconnected client or a failed engine step."""
    if not models:
        raise ValueError("serve at least one model")
    if require_auth and store is None:
        raise ValueError("require_auth needs a store holding the keys")
    app = FastAPI(title="nanoseek", description="DeepSeek/OpenAI-compatible API served by nanoseek.")
    limiter = RateLimiter()
    default_model = next(iter(models))
    _register_error_handlers(app)

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
               reasoning_tokens: int = 0) -> None:
        """One ledger row per request that reached the engine, cancelled ones included (the compute was
        spent). Fire-and-forget on a worker thread: it may run from a cancelled stream's `finally`."""
        completion = sum(job.generated)
        if caller.key is not None:
            limiter.charge(caller.key.id, completion)
        if store is None:
            return
        # No prefix cache exists yet, so every prompt token is a cache miss and hits are always 0.
        hit, miss = 0, prompt_tokens
        finish = ",".join(sorted({f for f in job.finish if f})) or None
        cost = sm.prices.cost(hit, miss, completion)
        key_id = caller.key.id if caller.key else None

        def write():
            try:
                store.record_usage(key_id, sm.name, hit, miss, completion, min(reasoning_tokens, completion),
                                   time.monotonic() - started, finish, cost)
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

    @router.post("/tokenize", response_model=TokenizeResponse)
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

    @router.post("/detokenize", response_model=DetokenizeResponse)
    async def detokenize(request: Request):
        await authenticate(request)
        req = await read_body(request, DetokenizeRequest)
        sm = pick(req.model)
        vocab = len(sm.tokenizer)
        if any(t < 0 or t >= vocab for t in req.tokens):
            raise ApiError.bad_request(f"Invalid 'tokens': ids must be in [0, {vocab}).", param="tokens")
        return DetokenizeResponse(prompt=sm.tokenizer.decode(req.tokens))

    @router.post("/chat/completions")
    async def chat_completions(request: Request):
        caller, req, sm = await admit(request, ChatCompletionRequest)
        if req.stream and req.logprobs:
            raise ApiError.unsupported("logprobs", "logprobs are returned only with stream: false")
        prompt = _chat_prompt(sm, req)
        params = to_sampling_params(req, prompt_tokens=len(prompt.ids), max_model_len=sm.context)
        n = req.n or 1
        rate_limit(caller, len(prompt.ids))
        started = time.monotonic()
        job = Job(sm.scheduler, [prompt.ids] * n, choice_params(params, n), request, poll_s)
        name = req.model or sm.name
        split = sm.reasoning or prompt.starts_in_reasoning
        mirror = mirror_reasoning if req.mirror_reasoning is None else req.mirror_reasoning
        if req.stream:
            return _sse(_chat_stream(job, sm, name, prompt, split, mirror, req.include_usage, keepalive_s,
                                     lambda r: record(caller, sm, len(prompt.ids), job, started, r)))
        try:
            async for _ in job.events():
                pass
        except ClientGone:
            record(caller, sm, len(prompt.ids), job, started)
            return JSONResponse({}, status_code=499)   # nobody is listening; the status is for the log
        except BaseException:
            job.cancel()
            record(caller, sm, len(prompt.ids), job, started)
            raise
        choices, reasoning_tokens = [], 0
        for i, h in enumerate(job.handles):
            out = h.completion
            reasoning, content = split_reasoning(out.text, prompt.starts_in_reasoning) if split else (None, out.text)
            if reasoning:
                reasoning_tokens += len(sm.tokenizer.encode(reasoning, add_special_tokens=False))
            lps = ChatLogprobs(content=_chat_logprobs(sm.tokenizer, out)) if out.logprobs is not None else None
            choices.append(ChatChoice(index=i, message=ChatMessage.of(content, reasoning, mirror), logprobs=lps,
                                      finish_reason=_finish(out.finish_reason)))
        usage = _usage(len(prompt.ids), sum(job.generated), reasoning_tokens)
        record(caller, sm, len(prompt.ids), job, started, reasoning_tokens)
        return JSONResponse(ChatCompletion(model=name, choices=choices, usage=usage).model_dump(mode="json"))

    @router.post("/completions")
    async def completions(request: Request):
        caller, req, sm = await admit(request, CompletionRequest)
        if req.stream and req.logprobs is not None:
            raise ApiError.unsupported("logprobs", "logprobs are returned only with stream: false")
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
        per_prompt = [choice_params(to_sampling_params(req, prompt_tokens=len(ids), max_model_len=sm.context), n)
                      for ids in prompts]
        prompt_tokens = sum(len(ids) for ids in prompts)
        rate_limit(caller, prompt_tokens)
        started = time.monotonic()
        all_ids = [ids for ids in prompts for _ in range(n)]   # choice index = prompt_index * n + i
        job = Job(sm.scheduler, all_ids, [p for ps in per_prompt for p in ps], request, poll_s)
        # echo: the prompt as sent (a string as is, token ids as text without special tokens like BOS)
        texts = [p if isinstance(p, str) else sm.tokenizer.decode(p, skip_special_tokens=True) for p in req.prompts]
        echoes = [texts[k // n] if req.echo else "" for k in range(len(all_ids))]
        name = req.model or sm.name
        if req.stream:
            return _sse(_completion_stream(job, name, echoes, prompt_tokens, req.include_usage, keepalive_s,
                                           lambda: record(caller, sm, prompt_tokens, job, started)))
        try:
            async for _ in job.events():
                pass
        except ClientGone:
            record(caller, sm, prompt_tokens, job, started)
            return JSONResponse({}, status_code=499)
        except BaseException:
            job.cancel()
            record(caller, sm, prompt_tokens, job, started)
            raise
        choices = []
        for i, h in enumerate(job.handles):
            out = h.completion
            lps = _completion_logprobs(sm.tokenizer, out) if out.logprobs is not None else None
            choices.append(CompletionChoice(index=i, text=echoes[i] + out.text, logprobs=lps,
                                            finish_reason=_finish(out.finish_reason)))
        record(caller, sm, prompt_tokens, job, started)
        body = Completion(model=name, choices=choices, usage=_usage(prompt_tokens, sum(job.generated)))
        return JSONResponse(body.model_dump(mode="json"))

    app.include_router(router, prefix="/v1")
    app.include_router(router)
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


def _usage(prompt_tokens: int, completion_tokens: int, reasoning_tokens: int = 0) -> Usage:
    # cached_tokens = 0: no prefix cache yet, so every prompt token is a cache miss.
    return Usage.of(prompt_tokens, completion_tokens, cached_tokens=0,
                    reasoning_tokens=min(reasoning_tokens, completion_tokens))


def _token_str(tok, token_id: int) -> str:
    return tok.decode([token_id], clean_up_tokenization_spaces=False)


def _chat_logprobs(tok, out) -> list[TokenLogprob]:
    rows = []
    for token_id, lp in zip(out.token_ids, out.logprobs):
        s = _token_str(tok, token_id)
        top = [TopLogprob(token=_token_str(tok, t), logprob=v, bytes=list(_token_str(tok, t).encode()))
               for t, v in lp["top"]]
        rows.append(TokenLogprob(token=s, logprob=lp["logprob"], bytes=list(s.encode()), top_logprobs=top))
    return rows


def _completion_logprobs(tok, out) -> CompletionLogprobs:
    lps, offset = CompletionLogprobs(), 0
    for token_id, lp in zip(out.token_ids, out.logprobs):
        s = _token_str(tok, token_id)
        lps.tokens.append(s)
        lps.token_logprobs.append(lp["logprob"])
        lps.top_logprobs.append({_token_str(tok, t): v for t, v in lp["top"]} or None)
        lps.text_offset.append(offset)
        offset += len(s)
    return lps


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

    def chunk(i: int, delta: ChatDelta, finish: str | None = None) -> str:
        return sse_event(ChatCompletionChunk(id=rid, created=created, model=name, choices=[
            ChatChunkChoice(index=i, delta=delta, finish_reason=finish)]))

    reasoning_tokens = 0
    try:
        for i in range(n):
            yield chunk(i, ChatDelta.of(role=True, content=""))
        async for ev in _pump(job, keepalive_s):
            if isinstance(ev, str):
                yield ev
                continue
            i, d = ev
            sp = splitters[i]
            r, c = sp.feed(d.text) if sp else ("", d.text)
            if d.finish_reason is not None and sp:
                r2, c2 = sp.flush()
                r, c = r + r2, c + c2
            reasoning_text[i] += r
            if r or c:
                yield chunk(i, ChatDelta.of(reasoning=r or None, content=c or None, mirror=mirror))
            if d.finish_reason is not None:
                yield chunk(i, ChatDelta(), _finish(d.finish_reason))
        reasoning_tokens = sum(len(sm.tokenizer.encode(t, add_special_tokens=False)) for t in reasoning_text if t)
        if include_usage:
            yield sse_event(ChatCompletionChunk.usage_chunk(
                id=rid, created=created, model=name,
                usage=_usage(len(prompt.ids), sum(job.generated), reasoning_tokens)))
        yield SSE_DONE
    except ClientGone:
        pass
    except Exception as exc:     # mid-stream: the status line is gone, so the error travels as an event
        yield _stream_error(exc)
    finally:
        job.cancel()             # no-op when finished; frees the rows when the client dropped the stream
        on_end(reasoning_tokens)


async def _completion_stream(job: Job, name: str, echoes: list[str], prompt_tokens: int, include_usage: bool,
                             keepalive_s: float, on_end):
    rid, created = new_id("cmpl"), int(time.time())

    def chunk(i: int, text: str, finish: str | None = None) -> str:
        return sse_event(Completion(id=rid, created=created, model=name,
                                    choices=[CompletionChoice(index=i, text=text, finish_reason=finish)]))

    try:
        for i, echo in enumerate(echoes):
            if echo:
                yield chunk(i, echo)
        async for ev in _pump(job, keepalive_s):
            if isinstance(ev, str):
                yield ev
                continue
            i, d = ev
            if d.text or d.finish_reason is not None:
                yield chunk(i, d.text, _finish(d.finish_reason) if d.finish_reason is not None else None)
        if include_usage:
            yield sse_event(Completion.usage_chunk(id=rid, created=created, model=name,
                                                   usage=_usage(prompt_tokens, sum(job.generated))))
        yield SSE_DONE
    except ClientGone:
        pass
    except Exception as exc:
        yield _stream_error(exc)
    finally:
        job.cancel()
        on_end()

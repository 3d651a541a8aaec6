"""The API routes: DeepSeek/OpenAI chat and legacy completions, models, balance, tokenize, health, metrics.

Each generating route runs the same steps: who is calling (serve/auth.py), what they asked (the body, parsed
by serve/schemas.py after the key is checked, so a bad key is a 401 before a bad body is a 400), the prompt
(rendered and tokenized on a worker thread, after a size bound that needs no tokenizer), the reservation of
its worst-case cost, then the engine (serve/bridge.py) and the response body or stream (serve/streams.py).
The chat route's run is also the `ChatService` that the Anthropic Messages and Responses routes
(serve/anthropic.py, serve/responses.py) translate onto, so those steps exist once.

The event loop only parses, awaits and copies: CPU work that grows with the request (templates, tokenizing,
detokenizing logprobs) runs on worker threads, and input is bounded before it, so one huge prompt cannot
freeze every other stream (issue 13, finding 3).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from nanoseek.chat import CLOSE_TAG, OPEN_TAG, Prompt, render_prompt
from nanoseek.errors import BadInputError
from nanoseek.fim import FIM_SPELLINGS, fim_prompt
from nanoseek.fim import detect as detect_fim
from nanoseek.serve.auth import Caller, Gate, Ticket
from nanoseek.serve.bridge import ClientGone, Job
from nanoseek.serve.errors import ApiError, from_nanoseek
from nanoseek.serve.metrics import ServerMetrics
from nanoseek.serve.schemas import (ChatChoice, ChatCompletion, ChatCompletionRequest, ChatLogprobs, ChatMessage,
                                    Completion, CompletionChoice, CompletionRequest, DetokenizeRequest,
                                    DetokenizeResponse, ModelCard, ModelList, TokenizeRequest, TokenizeResponse,
                                    choice_params, to_sampling_params)
from nanoseek.serve.streams import (api_finish, chat_logprobs, chat_stream, completion_logprobs, completion_stream,
                                    dead_end, hits, sse, usage)
from nanoseek.serve.structured import ChatPlan, plan_chat, read_reply


@dataclass(frozen=True)
class RouteSettings:
    """How the routes behave. `isolate_prefix_cache`: each key's prompts hit only its own cached prefixes."""

    mirror_reasoning: bool = False
    keepalive_s: float = 10.0     # silence after which a queued stream gets a `: keep-alive` comment
    poll_s: float = 0.5           # how often an idle request checks for a gone client or a failed engine step
    isolate_prefix_cache: bool = True


@dataclass
class ChatRun:
    """What one chat request ran as, for the API dialects that translate it (serve/anthropic.py,
    serve/responses.py): its prompt, and its engine job (whose handles hold each choice's Completion)."""

    prompt: Prompt | None = None
    job: Job | None = None


@dataclass(frozen=True)
class ChatService:
    """The chat pipeline as the other API dialects reuse it: the same auth Gate, model choice, and
    `run(caller, req, sm, request, run=None)` — reservation, engine, billing, body or SSE stream — as
    POST /chat/completions, so no dialect has its own copy of any of them."""

    gate: Gate
    pick: Callable
    run: Callable
    models: dict           # name → ServedModel, for the dialects' own model lists


class _Bill:
    """A request's Ticket seen through its Job: progress while it runs, the usage row at its end."""

    def __init__(self, ticket: Ticket, job: Job, choices_per_prompt: int):
        self.ticket, self.job, self.n = ticket, job, choices_per_prompt

    def progress(self) -> None:
        self.ticket.progress(sum(self.job.generated))

    def _hits(self) -> int:
        return hits(self.job, self.ticket.prompt_tokens, self.n)

    def _finish(self) -> str | None:
        return ",".join(sorted({f for f in self.job.finish if f})) or None

    async def done(self, reasoning_tokens: int = 0) -> None:
        await self.ticket.settle(sum(self.job.generated), self._hits(), reasoning_tokens, self._finish())

    def dropped(self, reasoning_tokens: int = 0) -> None:
        """Bill a request that ended early (client gone, error). Runs on a worker thread: it waits for the
        engine's last step, then bills what the engine generated, not what the client read."""
        job = self.job

        def generated() -> int:
            for h in job.handles:
                try:
                    h.result(timeout=10)
                except Exception:
                    pass
            done = [h.completion for h in job.handles if h.completion is not None]
            return max(sum(job.generated), sum(len(c.token_ids) + (c.stop_token is not None) for c in done))
        self.ticket.settle_later(generated, self._hits, reasoning_tokens, self._finish)


def api_router(models: dict, gate: Gate, metrics: ServerMetrics, settings: RouteSettings) -> APIRouter:
    """The routes over `models` (name → ServedModel); served at the root, under /v1 and under /beta."""
    default_model = next(iter(models))
    router = APIRouter()

    def pick(name: str | None):
        if name is None:
            return models[default_model]
        if name not in models:
            raise ApiError.model_not_found(name)
        return models[name]

    async def read(request: Request, model_cls):
        """Who is calling, then what they asked and of which model: in that order (401 before 400)."""
        caller = await gate.caller(request)
        req = model_cls.parse_json(await request.body())
        return caller, req, pick(req.model)

    async def run_job(sm, caller: Caller, request: Request, prompts: list[list[int]], params, n: int,
                      explicit: bool, prompt_tokens: int, constraints: list | None = None):
        """Reserve, then submit. Returns (job, bill); a submit that fails releases the reservation. One
        reservation covers the largest max_tokens for every choice (prompts of different lengths have
        different room left): the worst case of the lot."""
        widest = max(p.max_tokens for p in params)
        ticket = await gate.admit(caller, sm.name, sm.prices, prompt_tokens, widest, len(params), explicit)
        if ticket.granted < widest:
            params = [replace(p, max_tokens=min(p.max_tokens, ticket.granted), stop=list(p.stop)) for p in params]
        salt = caller.cache_salt(settings.isolate_prefix_cache)
        try:
            job = Job(sm.scheduler, prompts, params, request, settings.poll_s, metrics.timer(sm.name, len(params)),
                      cache_salt=salt, constraints=constraints)
        except BaseException:
            ticket.release()
            raise
        return job, _Bill(ticket, job, n)

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

    def card(name: str) -> ModelCard:
        m = models[name]
        return ModelCard(id=name, created=m.created, root=m.root or name, max_model_len=m.context)

    @router.get("/models", response_model=ModelList)
    async def list_models(request: Request):
        await gate.caller(request)
        return ModelList(data=[card(n) for n in models])

    @router.get("/models/{model_id:path}", response_model=ModelCard)
    async def get_model(model_id: str, request: Request):
        await gate.caller(request)
        pick(model_id)   # 404 for a model not served
        return card(model_id)

    @router.get("/user/balance")
    async def balance(request: Request):
        caller = await gate.caller(request)
        if gate.store is None:   # no ledger at all: DeepSeek's shape, saying "unlimited" as best it can
            return {"is_available": True, "balance_infos": []}
        return await asyncio.to_thread(gate.store.balance, caller.key_id)

    @router.post("/tokenize", response_model=TokenizeResponse, openapi_extra=json_body(TokenizeRequest))
    async def tokenize(request: Request):
        caller, req, sm = await read(request, TokenizeRequest)
        # It runs the model's tokenizer on the caller's text, so it obeys the caller's limits like generation.
        await gate.check_funds(caller)
        gate.count_request(caller)
        if req.prompt is not None:
            sm.check_text_fits(len(req.prompt.encode(errors="surrogatepass")), "prompt")
        else:
            sm.check_text_fits(sum(_message_bytes(m.model_dump()) for m in req.messages), "messages")

        def work():
            tok = sm.tokenizer
            if req.prompt is not None:
                ids = tok.encode(req.prompt, add_special_tokens=req.add_special_tokens is not False)
            else:
                chat = ChatCompletionRequest.parse({"messages": [m.model_dump(exclude_none=True)
                                                                 for m in req.messages]})
                ids = render_prompt(tok, chat.template_messages(),
                                    add_generation_prompt=req.add_generation_prompt).ids
            strs = tok.convert_ids_to_tokens(ids) if req.return_token_strs else None
            return TokenizeResponse(count=len(ids), max_model_len=sm.context, tokens=list(ids), token_strs=strs)
        return await asyncio.to_thread(work)

    @router.post("/detokenize", response_model=DetokenizeResponse, openapi_extra=json_body(DetokenizeRequest))
    async def detokenize(request: Request):
        caller, req, sm = await read(request, DetokenizeRequest)
        gate.count_request(caller)
        vocab = len(sm.tokenizer)
        if any(t < 0 or t >= vocab for t in req.tokens):
            raise ApiError.bad_request(f"Invalid 'tokens': ids must be in [0, {vocab}).", param="tokens")
        return DetokenizeResponse(prompt=await asyncio.to_thread(sm.tokenizer.decode, req.tokens))

    @router.post("/chat/completions", openapi_extra=json_body(ChatCompletionRequest))
    async def chat_completions(request: Request):
        caller, req, sm = await read(request, ChatCompletionRequest)
        return await run_chat(caller, req, sm, request)

    async def run_chat(caller: Caller, req: ChatCompletionRequest, sm, request: Request, run: ChatRun | None = None):
        """A chat request of an authenticated caller, start to end: the JSON response or the SSE stream.
        `run`, if given, is told the prompt and the job (the other API dialects read them)."""
        plan = await chat_plan(sm, req)
        prompt = plan.prompt
        # A grammar-held answer without max_tokens may take all the room left: a `length` cut means the JSON
        # is incomplete, so it should come only from the context itself.
        params = to_sampling_params(req, prompt_tokens=len(prompt.ids), max_model_len=sm.context,
                                    default_max_tokens=sm.context if plan.constrained else None)
        n = req.n or 1
        job, bill = await run_job(sm, caller, request, [prompt.ids] * n, choice_params(params, n), n,
                                  req.requested_max_tokens is not None, len(prompt.ids), plan.constraints(n))
        if run is not None:
            run.prompt, run.job = prompt, job
        name = req.model or sm.name
        mirror = settings.mirror_reasoning if req.mirror_reasoning is None else req.mirror_reasoning
        if req.stream:
            return sse(chat_stream(job, sm.tokenizer, name, prompt, plan.split, mirror, req.include_usage,
                                   settings.keepalive_s, bill, plan=plan))
        if (gone := await _run_to_end(job, bill)) is not None:
            return gone

        def body():
            choices, reasoning_tokens = [], 0
            for i, h in enumerate(job.handles):
                out = h.completion
                if out.finish_reason == "error":
                    raise dead_end(out.error)
                reply = read_reply(plan, out.text, out.finish_reason,
                                   lambda: sm.tokenizer.decode(out.token_ids, skip_special_tokens=False))
                if reply.reasoning:
                    reasoning_tokens += len(sm.tokenizer.encode(reply.reasoning, add_special_tokens=False))
                lps = (ChatLogprobs(content=chat_logprobs(sm.tokenizer, zip(out.token_ids, out.logprobs)))
                       if out.logprobs is not None else None)
                message = ChatMessage.of(reply.content, reply.reasoning, mirror, reply.tool_calls)
                choices.append(ChatChoice(index=i, message=message, logprobs=lps, finish_reason=reply.finish_reason))
            return choices, reasoning_tokens
        try:
            choices, reasoning_tokens = await asyncio.to_thread(body)
        except BaseException:
            await bill.done()
            raise
        await bill.done(reasoning_tokens)
        totals = usage(len(prompt.ids), sum(job.generated), reasoning_tokens, hits(job, len(prompt.ids), n))
        return JSONResponse(ChatCompletion(model=name, choices=choices, usage=totals).model_dump(mode="json"))

    @router.post("/completions", openapi_extra=json_body(CompletionRequest))
    async def completions(request: Request):
        caller, req, sm = await read(request, CompletionRequest)
        sm.check_text_fits(max((len(p.encode(errors="surrogatepass")) for p in req.prompts if isinstance(p, str)),
                               default=0), "prompt")
        vocab = len(sm.tokenizer)
        fim = None
        if req.suffix:
            fim = detect_fim(sm.tokenizer)
            if fim is None:
                known = ", ".join(f"{t.name} ({t.begin}{t.hole}{t.end})" for t in FIM_SPELLINGS)
                raise ApiError.bad_request(f"Invalid 'suffix': model '{sm.name}' has no fill-in-the-middle tokens "
                                           f"in its vocabulary (known: {known}).", param="suffix",
                                           code="fim_not_supported")

        def encode():
            out = []
            for i, p in enumerate(req.prompts):
                if fim is not None:   # the text to fill lies between the prompt and the suffix
                    p = fim_prompt(fim, p, req.suffix)
                ids = sm.tokenizer.encode(p) if isinstance(p, str) else list(p)
                if not ids:
                    raise ApiError.bad_request(f"Invalid 'prompt[{i}]': it encodes to no tokens.", param="prompt")
                if max(ids) >= vocab:
                    raise ApiError.bad_request(f"Invalid 'prompt': token ids must be below {vocab}.", param="prompt")
                out.append(ids)
            return out
        n = req.n or 1
        if len(req.prompts) * n > sm.scheduler.max_queue:
            # A 503 ("retry shortly") would be a lie: the queue can never take this request whole.
            raise ApiError.bad_request(f"Invalid 'prompt': {len(req.prompts)} prompts × n={n} ask for "
                                       f"{len(req.prompts) * n} completions at once; this server queues at most "
                                       f"{sm.scheduler.max_queue}.", param="prompt")
        prompts = await asyncio.to_thread(encode)
        per_prompt = [choice_params(to_sampling_params(req, prompt_tokens=len(ids), max_model_len=sm.context), n)
                      for ids in prompts]
        prompt_tokens = sum(len(ids) for ids in prompts)
        all_ids = [ids for ids in prompts for _ in range(n)]   # choice index = prompt_index * n + i
        params = [p for ps in per_prompt for p in ps]
        job, bill = await run_job(sm, caller, request, all_ids, params, n, req.requested_max_tokens is not None,
                                  prompt_tokens)
        # echo: the prompt as sent (a string as is, token ids as text without special tokens like BOS)
        texts = [p if isinstance(p, str) else sm.tokenizer.decode(p, skip_special_tokens=True) for p in req.prompts]
        echoes = [texts[k // n] if req.echo else "" for k in range(len(all_ids))]
        name = req.model or sm.name
        if req.stream:
            return sse(completion_stream(job, sm.tokenizer, name, echoes, prompt_tokens, n, req.include_usage,
                                         settings.keepalive_s, bill))
        if (gone := await _run_to_end(job, bill)) is not None:
            return gone

        scored = None
        if req.echo and req.logprobs is not None:   # prompt log-probs: what a distillation teacher serves
            scored = await asyncio.to_thread(lambda: [prompt_logprob_rows(sm, ids, req.logprobs) for ids in prompts])
        as_ids = bool(req.return_tokens_as_token_ids)

        def body():
            choices = []
            for i, h in enumerate(job.handles):
                out = h.completion
                pairs = list(zip(out.token_ids, out.logprobs)) if out.logprobs is not None else None
                if scored is not None:
                    pairs = scored[i // n] + (pairs or [])
                lps = completion_logprobs(sm.tokenizer, pairs, 0, as_ids)[0] if pairs is not None else None
                choices.append(CompletionChoice(index=i, text=echoes[i] + out.text, logprobs=lps,
                                                finish_reason=api_finish(out.finish_reason)))
            return choices
        choices = await asyncio.to_thread(body)
        await bill.done()
        totals = usage(prompt_tokens, sum(job.generated), cached_tokens=hits(job, prompt_tokens, n))
        return JSONResponse(Completion(model=name, choices=choices, usage=totals).model_dump(mode="json"))

    router.chat_service = ChatService(gate, pick, run_chat, models)
    return router


@torch.no_grad()
def prompt_logprob_rows(sm, ids: list[int], k: int) -> list[tuple[int, dict | None]]:
    """(token, logprob row) for every prompt token: the first has none; token j's row is the model's
    distribution after tokens < j: its log-prob and the k most likely tokens (in the engine's row format).

    One full forward without a cache, on a worker thread beside the decode loop: it reads the weights only
    and touches no KV cache, so it cannot disturb the rows the loop is running (the per-forward statistics
    MoE layers keep are not used by serving). Its compute is the prompt's prefill."""
    model = sm.scheduler.model
    device = next(model.parameters()).device
    out = model(torch.tensor([ids], device=device))
    logits = out[0] if isinstance(out, tuple) else out
    vocab = len(sm.tokenizer)   # padded rows of the embedding table are no tokens
    lp = torch.log_softmax(logits[0, :-1].float(), dim=-1)[:, :vocab]
    chosen = lp.gather(-1, torch.tensor(ids[1:], device=lp.device)[:, None])[:, 0].tolist()
    top_v, top_i = lp.topk(min(k, vocab), dim=-1) if k else (lp[:, :0], lp[:, :0].long())
    rows: list[tuple[int, dict | None]] = [(ids[0], None)]
    for j in range(len(ids) - 1):
        rows.append((ids[j + 1], {"logprob": chosen[j], "top": list(zip(top_i[j].tolist(), top_v[j].tolist()))}))
    return rows


async def _run_to_end(job: Job, bill: _Bill) -> JSONResponse | None:
    """Wait for a non-streamed job, noting its progress as a stream does (a server killed under it bills what
    was generated). None when it finished; a 499 for a client that left (billed all the same)."""
    try:
        async for ev in job.events():
            if ev is not None:
                bill.progress()
    except ClientGone:
        bill.dropped()
        return JSONResponse({}, status_code=499)   # nobody is listening; the status is for the log
    except BaseException:
        job.cancel()
        bill.dropped()
        raise
    return None


def _message_bytes(message: dict) -> int:
    """UTF-8 bytes of the text a chat message carries (content, text parts, a reasoning prefix): what the
    template will feed the tokenizer, less the template's own markup."""
    total = 0
    for key in ("content", "reasoning_content", "name"):
        value = message.get(key)
        if isinstance(value, str):
            total += len(value.encode(errors="surrogatepass"))
        elif isinstance(value, list):
            total += sum(len(str(part.get("text") or "").encode(errors="surrogatepass"))
                         for part in value if isinstance(part, dict))
    return total


async def chat_plan(sm, req: ChatCompletionRequest) -> ChatPlan:
    """What a chat request runs: its size bounded first (no tokenizer), then its prompt and grammar planned on a
    worker thread. Shared by the chat route and the prompts other dialects only count (Anthropic's
    count_tokens)."""
    sm.check_text_fits(sum(_message_bytes(m.model_dump()) for m in req.messages), "messages")
    return await asyncio.to_thread(_chat_plan, sm, req)


def _chat_plan(sm, req: ChatCompletionRequest) -> ChatPlan:
    """The prompt and grammar to run (serve/structured.py), the prompt rendered by `_chat_prompt`."""
    try:
        return plan_chat(sm, req, lambda: sm.grammar,
                         lambda messages, thinking, tools: _chat_prompt(sm, req, messages, thinking, tools))
    except BadInputError as e:
        raise from_nanoseek(e) from None


def _chat_prompt(sm, req: ChatCompletionRequest, messages: list[dict], thinking: bool | None,
                 tools: list[dict] | None) -> Prompt:
    """The prompt to run. With chat prefix completion it ends with the given start of the reply, and the
    response holds only the continuation (as DeepSeek returns it)."""
    if not req.continues_final_message:
        return render_prompt(sm.tokenizer, messages, thinking=thinking, tools=tools)
    # Prefix completion: render the conversation before the prefix with a generation prompt, then append the
    # prefix as the start of the reply, so the model continues it instead of starting a new turn.
    base = render_prompt(sm.tokenizer, messages[:-1], thinking=thinking, tools=tools)
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


def json_body(cls) -> dict:
    """openapi_extra for a route that reads its own body: its schema, published by the app (serve/app.py)."""
    ref = {"$ref": f"#/components/schemas/{cls.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}

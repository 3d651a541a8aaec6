"""The HTTP server: the DeepSeek/OpenAI-compatible API and the chat web app over running Schedulers.

Owns `ServedModel` (one model as the server exposes it) and `create_app`, which assembles the parts:
  * serve/auth.py — who is calling, budget and rate-limit reservations, the usage ledger (the one copy,
    shared with the web app);
  * serve/routes.py — the API routes (served at the root, under `/v1` and under DeepSeek's `/beta`),
    serve/streams.py — SSE and logprobs;
  * serve/anthropic.py — the Anthropic Messages API (at `/v1` and `/anthropic/v1`), serve/responses.py — the
    OpenAI Responses API: translations over the chat route's pipeline;
  * serve/web.py — the chat web app at `/`;
  * serve/errors.py — every failure as an OpenAI error body; serve/metrics.py — Prometheus;
  * serve/guard.py — the checks made before any route reads a body (size, Host, Origin, web-app auth).
The contract itself (what a body may say, every response shape) is serve/schemas.py; the thread↔asyncio
hand-off is serve/bridge.py. The engine runs on each Scheduler's own thread; handlers only submit, await
deltas and do cheap bookkeeping.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanoseek.engine.scheduler import Scheduler
from nanoseek.errors import NanoseekError
from nanoseek.serve.anthropic import CountTokensRequest, MessagesRequest, anthropic_models_router, anthropic_router
from nanoseek.serve.auth import Gate
from nanoseek.serve.errors import ApiError, dialect_of, error_response
from nanoseek.serve.guard import Guard, GuardConfig
from nanoseek.serve.metrics import ServerMetrics
from nanoseek.serve.responses import ResponsesRequest, responses_router
from nanoseek.serve.routes import RouteSettings, api_router
from nanoseek.serve.schemas import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from nanoseek.serve.store import PriceTable, Store
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
    # An upper bound on the UTF-8 bytes one token stands for: its vocabulary entry's own spelling, which is
    # never shorter than its text (byte-level BPE writes each byte as one or two UTF-8 bytes, SentencePiece
    # writes a space as the 3-byte '▁' and a raw byte as '<0xNN>'). Computed once here, at start-up, so the
    # request path only multiplies.
    max_token_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        pieces = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
        self.max_token_bytes = max(1, max(len(p.encode(errors="surrogatepass")) for p in pieces if isinstance(p, str)))

    @functools.cached_property
    def grammar(self):
        """The model's grammar compiler (engine/grammar.py), built on the first constrained request: wrapping
        the tokenizer for llguidance takes a second or two, once."""
        from nanoseek.engine.grammar import GrammarCompiler
        runner = self.scheduler.runner
        return GrammarCompiler(self.tokenizer, runner.vocab_size, runner.eos_token_ids)

    def check_text_fits(self, text_bytes: int, param: str) -> None:
        """A 400 for text that cannot fit the context even if every token were the longest one: decided from
        its size alone, before a tokenizer or template spends time on it (issue 13, finding 3)."""
        limit = self.context * self.max_token_bytes
        if text_bytes > limit:
            raise ApiError.bad_request(
                f"Invalid '{param}': {text_bytes} bytes of text cannot fit in this model's context of "
                f"{self.context} tokens (at most {self.max_token_bytes} bytes per token, {limit} bytes in all).",
                param=param, code="context_length_exceeded")


def create_app(models: dict[str, ServedModel], store: Store | None, *, require_auth: bool,
               mirror_reasoning: bool = False, keepalive_s: float = 10.0, poll_s: float = 0.5,
               guard: GuardConfig | None = None, docs: bool = False, isolate_prefix_cache: bool = True) -> FastAPI:
    """The app. Schedulers must already be running; the caller owns starting and stopping them.
    guard: the body limit and the Host check (serve/guard.py; None: the defaults). An open loopback server
    sets loopback_only, so a web page on another origin cannot reach it through DNS rebinding and read the
    local user's conversations. docs: serve /docs and /redoc (their pages load scripts from a CDN;
    /openapi.json is always served).
    keepalive_s: silence after which a waiting stream gets a `: keep-alive` comment; poll_s: how often an
    idle request checks for a disconnected client or a failed engine step. isolate_prefix_cache: a key's
    prompts reuse only its own cached prefixes (see Caller.cache_salt)."""
    if not models:
        raise ValueError("serve at least one model")
    gate = Gate(store, require_auth)
    app = FastAPI(title="nanoseek", description="DeepSeek/OpenAI-compatible API served by nanoseek.",
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None)
    metrics = ServerMetrics({n: m.scheduler.stats for n, m in models.items()})
    app.state.metrics = metrics
    app.state.gate = gate
    _register_error_handlers(app)
    _publish_request_bodies(app)
    router = api_router(models, gate, metrics, RouteSettings(mirror_reasoning, keepalive_s, poll_s,
                                                             isolate_prefix_cache))
    app.include_router(router, prefix="/v1")
    app.include_router(router, prefix="/beta")   # DeepSeek's beta base URL: FIM, prefix completion, strict tools
    app.include_router(router)
    # The other API dialects, each a translation over the chat route's pipeline (routes.ChatService)
    messages = anthropic_router(router.chat_service, store)
    app.include_router(messages, prefix="/v1")
    app.include_router(messages, prefix="/anthropic/v1")   # DeepSeek's base URL for the Anthropic SDK
    app.include_router(anthropic_models_router(router.chat_service), prefix="/anthropic/v1")
    responses = responses_router(router.chat_service, store)
    app.include_router(responses, prefix="/v1")
    app.include_router(responses)
    web = web_router(models, gate)   # the chat web app at /
    app.include_router(web)
    app.add_middleware(Guard, config=guard or GuardConfig(), web_owner=web.owner, is_open=gate.is_open)
    return app


def _register_error_handlers(app: FastAPI) -> None:
    """Every failure leaves as an OpenAI error body (serve/errors.py); only real server faults are 500,
    and those are logged with their traceback since the body says nothing about them."""

    async def handle(request: Request, exc: Exception):
        status, headers, body = error_response(exc, dialect_of(request.url.path))
        if status >= 500 and not isinstance(exc, ApiError):
            log.error("error handling %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse(body, status_code=status, headers=headers)

    for exc_type in (ApiError, RequestValidationError, NanoseekError, StarletteHTTPException, Exception):
        app.add_exception_handler(exc_type, handle)


def _publish_request_bodies(app: FastAPI) -> None:
    """Add the request models' JSON schemas (and their nested models) to the spec's components, where the
    routes' `json_body` references point (the generating routes read their own body, so that a bad key is a
    401 before a bad body is a 400)."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            spec = build()
            schemas = spec.setdefault("components", {}).setdefault("schemas", {})
            # All in one call: should two nested models ever share a name, pydantic then names them apart,
            # where one schema per model would let the last one stand for both.
            _, published = models_json_schema(
                [(cls, "validation") for cls in (ChatCompletionRequest, CompletionRequest, TokenizeRequest,
                                                 DetokenizeRequest, MessagesRequest, CountTokensRequest,
                                                 ResponsesRequest)],
                ref_template="#/components/schemas/{model}")
            schemas.update(published["$defs"])
        return app.openapi_schema

    app.openapi = openapi

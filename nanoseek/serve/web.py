"""The chat web app at `/`: its page and static files, and its conversation and render endpoints.

Owns:
  * GET / (the page) and GET /app/static/… (its own JS and CSS, plus Pygments' CSS generated at start-up).
  * /app/api/…: the signed-in caller's conversations (serve/conversations.py keeps them in the store), exports,
    the model facts the picker and cost display need, and POST /app/api/render (Markdown → safe HTML in
    serve/render.py's worker process, bounded and rate-limited per caller).

The page generates with the same public API as any client (/v1/chat/completions, /v1/models); nothing here
runs a model. Authentication is the API's own (serve/auth.py's Gate): a Bearer key when the server has keys,
else the local user. Everything works offline: no CDN, no external font, no third-party bundle.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from dataclasses import asdict
from pathlib import Path as FilePath
from typing import Literal

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from nanoseek.serve.auth import Gate
from nanoseek.serve.conversations import Conversation, Conversations, to_markdown
from nanoseek.serve.errors import ApiError
from nanoseek.serve.limits import Hold, RateLimiter
from nanoseek.serve.render import MAX_RENDER_CHARS, RenderError, RenderWorker, pygments_css
from nanoseek.serve.store import KeyRecord
from nanoseek.weights.registry import sampling_defaults

WEB_DIR = FilePath(__file__).with_name("web")
STATIC_DIR = WEB_DIR / "static"
MAX_MESSAGE_CHARS = 2_000_000
# Per caller and minute. The page renders each finished reply once (and a conversation's history when it is
# opened), so a person stays far below these; a script looping on worst-case input does not.
RENDER_RPM = 120
RENDER_CHARS_PM = 2_000_000

# The page may load only its own scripts and styles, talk only to this server, and be framed by nobody.
# A second line of defence behind the sanitizer: an injected inline handler or <script> would not run.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


# ---------------------------------------------------------------------------------------------------------
# Request bodies


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="after")
    def _encodable(self):
        # JSON may carry lone surrogates ("\ud800"), which SQLite and the sanitizer cannot store or parse.
        for name, value in self:
            texts = value if isinstance(value, list) else value.values() if isinstance(value, dict) else [value]
            for text in texts:
                if isinstance(text, str):
                    try:
                        text.encode("utf-8")
                    except UnicodeEncodeError:
                        raise ValueError(f"'{name}' is not valid Unicode text (lone surrogate)") from None
        return self


class ConversationSettings(_Body):
    title: str | None = Field(None, max_length=200)
    model: str | None = Field(None, max_length=200)
    system_prompt: str | None = Field(None, max_length=MAX_MESSAGE_CHARS)
    temperature: float | None = Field(None, ge=0, le=2)
    deepthink: bool | None = None


class NewMessage(_Body):
    role: Literal["user", "assistant"]
    content: str = Field(max_length=MAX_MESSAGE_CHARS)
    reasoning: str | None = Field(None, max_length=MAX_MESSAGE_CHARS)
    stats: dict[str, float | int | str | bool | None] | None = None

    @field_validator("stats")
    @classmethod
    def _small(cls, v):
        if v is None:
            return v
        if any(isinstance(x, float) and not math.isfinite(x) for x in v.values()):
            raise ValueError("stats numbers must be finite")
        if len(v) > 32 or len(json.dumps(v)) > 4096:
            raise ValueError("stats must be at most 32 fields and 4 KB")
        return v


class RenderRequest(_Body):
    texts: list[str]


# ---------------------------------------------------------------------------------------------------------
# Router


def web_router(models: dict, gate: Gate, renderer: RenderWorker | None = None,
               render_limits: RateLimiter | None = None) -> APIRouter:
    """The app's routes. `models` are the app's ServedModels (for reasoning flags and prices); conversations
    live in the gate's store, so without a store the page works but cannot keep conversations. `renderer`
    (default: a RenderWorker started on first use) and `render_limits` (per caller: RENDER_RPM calls and
    RENDER_CHARS_PM characters a minute) bound the render endpoint."""
    router = APIRouter()
    store = gate.store
    renderer = renderer or RenderWorker()
    render_limits = render_limits or RateLimiter()
    conversations = Conversations(store) if store is not None else None
    static = {p.name: p for p in STATIC_DIR.iterdir() if p.is_file()}   # a fixed allowlist: no path tricks
    # The page samples with each model's recommended settings (generation_config.json, else the registry's),
    # not the API's OpenAI defaults, unless the conversation sets a temperature: at 1.0 a small model rambles.
    sampling = {name: asdict(sampling_defaults(m.root or name)) for name, m in models.items()}

    async def owner(request: Request) -> KeyRecord | None:
        """The API's rule (Gate.caller). The app's guard (serve/app.py) runs this before the body is read
        and leaves the answer in the request state, so a bad key gets 401 before a bad body gets 400."""
        known = getattr(request.state, "web_owner", _UNSET)
        if known is not _UNSET:
            return known
        return (await gate.caller(request)).key

    def convs() -> Conversations:
        if conversations is None:
            raise ApiError(501, "This server runs without a data directory, so it cannot keep conversations.",
                           code="unsupported")
        return conversations

    def oid(key: KeyRecord | None) -> int | None:
        return key.id if key is not None else None

    # -- the page

    @router.get("/", include_in_schema=False)
    def index():
        return FileResponse(WEB_DIR / "index.html", media_type="text/html",
                            headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache",
                                     "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})

    @router.get("/app/static/pygments.css", include_in_schema=False)
    def code_css():
        return Response(pygments_css(), media_type="text/css")

    @router.get("/app/static/{name}", include_in_schema=False)
    def static_file(name: str):
        if name not in static:
            raise ApiError.not_found(f"no static file {name!r}")
        return FileResponse(static[name], headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})

    # -- app endpoints

    @router.get("/app/api/config")
    def config(key: KeyRecord | None = Depends(owner)):
        return {"models": [{"id": name, "reasoning": m.reasoning, "context": m.context, "prices": asdict(m.prices),
                            "sampling": sampling[name]} for name, m in models.items()],
                "key": None if key is None else {"name": key.name, "prefix": key.prefix},
                "conversations": conversations is not None}

    @router.get("/app/api/conversations")
    def list_conversations(q: str | None = None, key: KeyRecord | None = Depends(owner)):
        return {"data": [c.to_dict(with_messages=False) for c in convs().find(oid(key), q)]}

    @router.post("/app/api/conversations", status_code=201)
    def create_conversation(body: ConversationSettings | None = None, key: KeyRecord | None = Depends(owner)):
        settings = body.model_dump(exclude_none=True) if body else {}
        return convs().create(oid(key), **settings).to_dict()

    @router.get("/app/api/conversations/{conv_id}")
    def get_conversation(conv_id: str, key: KeyRecord | None = Depends(owner)):
        return convs().get(oid(key), conv_id).to_dict()

    @router.patch("/app/api/conversations/{conv_id}")
    def update_conversation(conv_id: str, body: ConversationSettings, key: KeyRecord | None = Depends(owner)):
        # Only the fields sent change; an explicit null resets model/temperature to the server default.
        settings = {k: getattr(body, k) for k in body.model_fields_set}
        return convs().update(oid(key), conv_id, **settings).to_dict()

    @router.delete("/app/api/conversations/{conv_id}", status_code=204)
    def delete_conversation(conv_id: str, key: KeyRecord | None = Depends(owner)):
        convs().delete(oid(key), conv_id)
        return Response(status_code=204)

    @router.post("/app/api/conversations/{conv_id}/messages", status_code=201)
    def add_message(conv_id: str, body: NewMessage, key: KeyRecord | None = Depends(owner)):
        m = convs().append(oid(key), conv_id, body.role, body.content, reasoning=body.reasoning, stats=body.stats)
        return asdict(m)

    @router.delete("/app/api/conversations/{conv_id}/messages/{message_id}")
    def truncate(conv_id: str, message_id: int = Path(ge=1, le=2**63 - 1),   # SQLite's INTEGER range
                 key: KeyRecord | None = Depends(owner)):
        """Delete a message and all after it: how regenerate and edit-and-resend rewind a conversation."""
        return {"deleted": convs().truncate(oid(key), conv_id, message_id)}

    @router.get("/app/api/conversations/{conv_id}/export")
    def export(conv_id: str, format: Literal["markdown", "json"] = "markdown",
               key: KeyRecord | None = Depends(owner)):
        conv = convs().get(oid(key), conv_id)
        name = _filename(conv)
        if format == "json":
            return JSONResponse(conv.to_dict(), headers={"Content-Disposition": f'attachment; filename="{name}.json"'})
        return Response(to_markdown(conv), media_type="text/markdown; charset=utf-8",
                        headers={"Content-Disposition": f'attachment; filename="{name}.md"'})

    @router.post("/app/api/render")
    async def render(body: RenderRequest, key: KeyRecord | None = Depends(owner)):
        chars = sum(len(t) for t in body.texts)
        if chars > MAX_RENDER_CHARS:
            raise ApiError.bad_request(f"Invalid 'texts': more than {MAX_RENDER_CHARS} characters in one call.",
                                       param="texts")
        got = render_limits.reserve(oid(key), chars, 0, rpm=RENDER_RPM, tpm=RENDER_CHARS_PM)
        if not isinstance(got, Hold):
            raise ApiError.rate_limited(got)
        try:
            return {"html": await asyncio.to_thread(renderer.render, body.texts)}
        except RenderError as e:
            raise ApiError(422, f"Cannot render these texts: {e}.", param="texts", code="render_failed") from None

    router.owner = owner
    return router


_UNSET = object()


def _filename(conv: Conversation) -> str:
    """An ASCII file name from the title (safe inside a quoted Content-Disposition value)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", conv.title).strip("-.")[:60]
    return stem or conv.id

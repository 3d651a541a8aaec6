"""The chat web app at `/`: its page and static files, its conversation endpoints, and Markdown rendering.

Owns:
  * GET / (the page) and GET /app/static/… (its own JS and CSS, plus Pygments' CSS generated at start-up).
  * /app/api/…: the signed-in caller's conversations (serve/conversations.py stores them), exports, the
    model facts the picker and cost display need, and POST /app/api/render.
  * `MarkdownRenderer`: model output → safe HTML, on the server, with markdown-it-py (CommonMark + tables +
    strikethrough), Pygments (code), latex2mathml (math, as MathML the browser draws itself) and nh3
    (Ammonia) as the last word on which tags and attributes survive.

The page generates with the same public API as any client (/v1/chat/completions, /v1/models); nothing here
runs a model. Authentication is the API's: a Bearer key when the server has keys, else the local user.
Everything works offline: no CDN, no external font, no third-party bundle.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import html
import json
import math
import re
from dataclasses import asdict
from pathlib import Path as FilePath
from typing import Literal

import nh3
from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from latex2mathml.converter import convert as latex_to_mathml
from markdown_it import MarkdownIt
from mdit_py_plugins.dollarmath import dollarmath_plugin
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import get_lexer_by_name
from pygments.util import ClassNotFound

from nanoseek.serve.conversations import Conversation, Conversations, to_markdown
from nanoseek.serve.errors import ApiError
from nanoseek.serve.store import KeyRecord, Store

WEB_DIR = FilePath(__file__).with_name("web")
STATIC_DIR = WEB_DIR / "static"
MAX_RENDER_CHARS = 400_000        # per render call: a long reply is ~100 KB; this only stops abuse
MAX_MESSAGE_CHARS = 2_000_000
LIGHT_CODE_STYLE, DARK_CODE_STYLE = "default", "github-dark"

# The page may load only its own scripts and styles, talk only to this server, and be framed by nobody.
# A second line of defence behind the sanitizer: an injected inline handler or <script> would not run.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


# ---------------------------------------------------------------------------------------------------------
# Markdown → safe HTML

# MathML elements and the presentation attributes latex2mathml writes (mathcolor/style are left out: output
# must not restyle the page).
_MATHML = {
    "math": {"display", "xmlns"}, "mrow": set(), "mi": {"mathvariant"}, "mn": set(), "mtext": set(),
    "ms": set(), "mspace": {"width"}, "mo": {"stretchy", "fence", "separator", "form", "lspace", "rspace",
                                              "largeop", "movablelimits", "accent", "minsize", "maxsize"},
    "mfrac": {"linethickness"}, "msqrt": set(), "mroot": set(), "msub": set(), "msup": set(),
    "msubsup": set(), "munder": {"accentunder"}, "mover": {"accent"}, "munderover": set(),
    "mtable": {"columnalign", "rowalign", "columnspacing", "rowspacing", "columnlines", "rowlines", "frame"},
    "mtr": set(), "mtd": {"columnalign", "columnspan", "rowspan"}, "mstyle": {"displaystyle", "scriptlevel"},
    "menclose": {"notation"}, "mpadded": {"width", "height", "depth", "lspace", "voffset"}, "mphantom": set(),
    "merror": set(), "semantics": set(), "annotation": {"encoding"},
}
# Markdown's own output, minus <img>: a model-written image URL would be fetched the moment the reply shows,
# which is how prompt-injected text leaks a conversation; images are rendered as links instead.
_TAGS = {"p", "br", "hr", "h1", "h2", "h3", "h4", "h5", "h6", "strong", "em", "s", "del", "code", "pre",
         "blockquote", "ul", "ol", "li", "a", "table", "thead", "tbody", "tr", "th", "td", "span", "div"}
_ATTRIBUTES = {"a": {"href", "title"}, "code": {"class"}, "span": {"class"}, "div": {"class"},
               "ol": {"start"}, "th": {"class"}, "td": {"class"}, **_MATHML}

# \( … \) inline, \[ … \] display: the delimiters DeepSeek models write. The inline form of \[ … \] catches
# display math that starts mid-paragraph, which a block rule cannot. Our own rules rather than texmath's
# regexes: a lazy regex rescans to the end of the text for every unclosed opener, so a reply of many "\("
# cost quadratic time (8k openers: 2 s); here each text's closers are indexed once and found by bisection.


def _closer(env: dict, src: str, close: str, start: int) -> int:
    """Position of the first `close` at or after `start` in `src`, or -1 (index cached per text in env)."""
    cache = env.setdefault("math_closers", {})
    hit = cache.get(close)
    if hit is None or hit[0] is not src:
        positions, i = [], src.find(close)
        while i >= 0:
            positions.append(i)
            i = src.find(close, i + len(close))
        hit = cache[close] = (src, positions)
    positions = hit[1]
    k = bisect.bisect_left(positions, start)
    return positions[k] if k < len(positions) else -1


def _inline_math(name: str, open_: str, close: str):
    def rule(state, silent: bool) -> bool:
        pos, src = state.pos, state.src
        if not src.startswith(open_, pos):
            return False
        end = _closer(state.env, src, close, pos + len(open_))
        if end <= pos + len(open_):   # unclosed, or nothing inside
            return False
        if not silent:
            token = state.push(name, "math", 0)
            token.content, token.markup = src[pos + len(open_):end], open_
        state.pos = end + len(close)
        return True
    return rule


def _block_math(name: str, open_: str, close: str):
    def rule(state, begin_line: int, end_line: int, silent: bool) -> bool:
        begin = state.bMarks[begin_line] + state.tShift[begin_line]
        if not state.src.startswith(open_, begin):
            return False
        end = _closer(state.env, state.src, close, begin + len(open_))
        if end <= begin + len(open_):
            return False
        last = end + len(close) - 1
        line = bisect.bisect_left(state.eMarks, last, begin_line, end_line)   # the line holding the closer
        if line >= end_line or last < state.bMarks[line]:
            return False   # the closer lies outside this block
        if not silent:
            token = state.push(name, "math", 0)
            token.block, token.content, token.markup = True, state.src[begin + len(open_):end], open_
        state.line = line + 1
        return True
    return rule


def _math(tex: str, display: bool) -> str:
    try:
        return latex_to_mathml(tex.strip(), display="block" if display else "inline")
    except Exception:   # latex2mathml raises many kinds on bad TeX; the reader gets the source instead
        return f'<code class="math-error">{html.escape(tex)}</code>'


def _highlight(code: str, lang: str, _attrs) -> str:
    """Pygments spans for a fenced block with a known language; "" lets markdown-it escape it plainly."""
    if not lang:
        return ""
    try:
        lexer = get_lexer_by_name(lang.split()[0])
    except ClassNotFound:
        return ""
    return highlight(code, lexer, HtmlFormatter(nowrap=True))


class MarkdownRenderer:
    """Model output → HTML that is safe to put in the page with innerHTML.

    Raw HTML in the text is never interpreted (markdown-it `html: False` escapes it, so `<script>` shows as
    text), markdown-it refuses javascript:/data: links, and nh3 then removes any tag or attribute outside the
    allowlist above, whatever a renderer bug might have let through.
    """

    def __init__(self) -> None:
        md = MarkdownIt("commonmark", {"html": False, "highlight": _highlight}).enable(["table", "strikethrough"])
        # Pandoc's rules for $: no space inside the delimiters and no digit after the closing one, so
        # "it costs $5 and $6" stays text.
        dollarmath_plugin(md, double_inline=True, allow_space=False, allow_digits=False, allow_labels=False,
                          renderer=lambda tex, opts: _math(tex, opts["display_mode"]))
        md.inline.ruler.before("escape", "math_paren", _inline_math("math_paren", "\\(", "\\)"))
        md.inline.ruler.before("escape", "math_bracket_inline", _inline_math("math_bracket_inline", "\\[", "\\]"))
        md.block.ruler.before("fence", "math_bracket_block", _block_math("math_bracket_block", "\\[", "\\]"))
        md.add_render_rule("math_paren", lambda self, t, i, o, e: _span_math(t[i].content, False))
        md.add_render_rule("math_bracket_inline", lambda self, t, i, o, e: _span_math(t[i].content, True))
        md.add_render_rule("math_bracket_block",
                           lambda self, t, i, o, e: f'<div class="math block">{_math(t[i].content, True)}</div>\n')
        md.add_render_rule("image", _image_as_link)
        md.core.ruler.push("align_classes", _align_classes)
        self.md = md

    def render(self, text: str) -> str:
        return sanitize(self.md.render(text))


def _span_math(tex: str, display: bool) -> str:
    return f'<span class="math {"display" if display else "inline"}">{_math(tex, display)}</span>'


def _align_classes(state) -> None:
    """Table alignment as a class: the page's CSP refuses style attributes, and the sanitizer drops them."""
    for tok in state.tokens:
        style = tok.attrGet("style") if tok.type in ("th_open", "td_open") else None
        if style:
            del tok.attrs["style"]
            tok.attrSet("class", "align-" + style.removeprefix("text-align:"))


def _image_as_link(self, tokens, idx, options, env) -> str:
    tok = tokens[idx]
    alt = self.renderInlineAsText(tok.children or [], options, env) or tok.attrGet("src")
    return f'<a href="{html.escape(tok.attrGet("src") or "", quote=True)}">[image: {html.escape(alt)}]</a>'


def sanitize(fragment: str) -> str:
    """Keep only the allowlisted tags/attributes; links get rel=noopener and open in a new tab."""
    return nh3.clean(fragment, tags=_TAGS | set(_MATHML), attributes=_ATTRIBUTES,
                     url_schemes={"http", "https", "mailto"}, link_rel="noopener noreferrer nofollow",
                     set_tag_attribute_values={"a": {"target": "_blank"}}, strip_comments=True)


@functools.cache
def pygments_css() -> str:
    """Code colours for both themes, generated from Pygments' styles instead of a copied stylesheet."""
    light = HtmlFormatter(style=LIGHT_CODE_STYLE).get_style_defs(".md pre")
    dark = HtmlFormatter(style=DARK_CODE_STYLE).get_style_defs(':root[data-theme="dark"] .md pre')
    return f"/* generated from Pygments styles {LIGHT_CODE_STYLE!r} and {DARK_CODE_STYLE!r} */\n{light}\n{dark}\n"


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


def web_router(models: dict, store: Store | None, *, require_auth: bool) -> APIRouter:
    """The app's routes. `models` are the app's ServedModels (for reasoning flags and prices); conversations
    live in `store`'s database, so without a store the page works but cannot keep conversations."""
    router = APIRouter()
    renderer = MarkdownRenderer()
    conversations = Conversations(store) if store is not None else None
    static = {p.name: p for p in STATIC_DIR.iterdir() if p.is_file()}   # a fixed allowlist: no path tricks

    async def owner(request: Request) -> KeyRecord | None:
        """The same rule as the API: no keys (and auth not required) → the local user; else a live key.
        The app's guard (serve/app.py) runs this before the body is read and leaves the answer in the
        request state, so a bad key gets 401 before a bad body gets 400."""
        known = getattr(request.state, "web_owner", _UNSET)
        if known is not _UNSET:
            return known
        if store is None:
            return None
        if not require_auth and not await asyncio.to_thread(store.any_keys):
            return None
        scheme, _, secret = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            raise ApiError.authentication("Authentication failed: send the API key as 'Authorization: Bearer KEY'.")
        key = await asyncio.to_thread(store.authenticate, secret.strip())
        if key is None:
            raise ApiError.authentication()
        return key

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
        return {"models": [{"id": name, "reasoning": m.reasoning, "context": m.context, "prices": asdict(m.prices)}
                           for name, m in models.items()],
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
    def render(body: RenderRequest, _key: KeyRecord | None = Depends(owner)):
        if sum(len(t) for t in body.texts) > MAX_RENDER_CHARS:
            raise ApiError.bad_request(f"Invalid 'texts': more than {MAX_RENDER_CHARS} characters in one call.",
                                       param="texts")
        return {"html": [renderer.render(t) for t in body.texts]}

    router.owner = owner
    return router


_UNSET = object()


def _filename(conv: Conversation) -> str:
    """An ASCII file name from the title (safe inside a quoted Content-Disposition value)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", conv.title).strip("-.")[:60]
    return stem or conv.id

"""Model output → safe HTML, and the worker process that does it for the chat web app.

Owns `MarkdownRenderer` (markdown-it-py for CommonMark + tables + strikethrough, Pygments for code,
latex2mathml for math as MathML the browser draws itself, nh3/Ammonia as the last word on which tags and
attributes survive) and `RenderWorker`, which runs it in a separate, low-priority process.

Why a process: rendering is pure Python, so on a thread it holds the GIL that the engine's loop needs
between its kernels; four worst-case renders in parallel dropped a running stream from 31.8 to 0.2 tok/s
(issue 13, finding 5). A child process at a lower CPU priority cannot take the GIL, each call has a time
limit after which the child is killed (and restarted on the next call), and both input and output are
bounded. This module imports nothing heavy, so the child starts in a fraction of a second.
"""

from __future__ import annotations

import bisect
import functools
import html
import json
import os
import select
import subprocess
import sys
import threading
import time

import nh3
from latex2mathml.converter import convert as latex_to_mathml
from markdown_it import MarkdownIt
from mdit_py_plugins.dollarmath import dollarmath_plugin
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import get_lexer_by_name
from pygments.util import ClassNotFound

LIGHT_CODE_STYLE, DARK_CODE_STYLE = "default", "github-dark"
MAX_RENDER_CHARS = 400_000        # per render call: a long reply is ~100 KB; this only stops abuse
MAX_RENDER_OUTPUT = 4_000_000     # bytes of HTML per call: math expands ~30x, so this caps the worst case
RENDER_TIMEOUT_S = 5.0            # a call taking longer kills the worker


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
# The worker process


class RenderError(Exception):
    """A render call was refused or failed: its message is safe to show the client."""


class RenderWorker:
    """One child process (`python -m nanoseek.serve.render`) that renders batches of texts, one call at a
    time, over JSON lines on its stdin/stdout. Blocking: call it from a worker thread. Thread-safe."""

    def __init__(self, timeout_s: float = RENDER_TIMEOUT_S, max_output: int = MAX_RENDER_OUTPUT,
                 nice: int = 10):
        self.timeout_s, self.max_output, self.nice = timeout_s, max_output, nice
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def render(self, texts: list[str]) -> list[str]:
        line = (json.dumps({"texts": texts, "max_output": self.max_output}) + "\n").encode()
        with self._lock:
            proc = self._start()
            try:
                proc.stdin.write(line)
                proc.stdin.flush()
                answer = self._read_line(proc)
            except (OSError, RenderError):
                self._kill()
                raise
        if "error" in answer:
            raise RenderError(answer["error"])
        return answer["html"]

    def _start(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen([sys.executable, "-m", "nanoseek.serve.render", str(self.nice)],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        return self._proc

    def _read_line(self, proc: subprocess.Popen) -> dict:
        deadline = time.monotonic() + self.timeout_s
        fd, chunks = proc.stdout.fileno(), []
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise RenderError(f"rendering took longer than {self.timeout_s:g} s")
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise RenderError("the render worker stopped")
            chunks.append(chunk)
            if chunk.endswith(b"\n"):
                return json.loads(b"".join(chunks))

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def close(self) -> None:
        with self._lock:
            self._kill()


def _serve(nice: int) -> None:
    """The child's loop: one JSON request per line in, one JSON answer per line out."""
    try:
        os.nice(nice)        # generation comes first: the renderer takes what CPU the engine leaves
    except OSError:
        pass
    renderer = MarkdownRenderer()
    for line in sys.stdin.buffer:
        req = json.loads(line)
        out, size = [], 0
        try:
            for text in req["texts"]:
                out.append(renderer.render(text))
                size += len(out[-1])
                if size > req["max_output"]:
                    raise RenderError(f"the rendered HTML is larger than {req['max_output']} bytes")
            answer = {"html": out}
        except RenderError as e:
            answer = {"error": str(e)}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    _serve(int(sys.argv[1]) if len(sys.argv) > 1 else 10)

"""Tool calls as text: nanoseek's generic tool format, its grammar, and the parsers for it and native formats.

Owns the one definition of how a model sees tools and writes calls when its chat template has no tool
support of its own (SmolLM2's ChatML, nanoseek's own training template). The server, `tokenizer train`'s
template and tool-using RL episodes all use it.

The generic format (the Hermes/Qwen2.5 convention, so Qwen templates' native format is the same text):
  * The tools are described in the system message: `TOOLS_HEADER`, then one JSON object per line
    `{"type": "function", "function": {"name", "description", "parameters"}}` between `<tools>` and
    `</tools>`, then `TOOLS_FOOTER`.
  * A call is written as
        <tool_call>
        {"name": "get_weather", "arguments": {"city": "Paris"}}
        </tool_call>
    one block per call, blocks separated by a newline; nothing follows the last block. `<tool_call>` is
    the marker that switches the grammar on under tool_choice "auto": a string no ordinary answer starts.
  * A tool's result comes back as a user turn holding `<tool_response>\\n…\\n</tool_response>` blocks, one
    per result, in call order (consecutive tool messages share one turn), so any template can render it.

Native formats parsed when a template writes them itself: DeepSeek-V3's tool tokens
(`<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```<｜tool▁call▁end｜>…`)
and Qwen's `<tool_call>` (identical to the generic one).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from nanoseek.engine.grammar import json_rule, lark_string

OPEN, CLOSE = "<tool_call>", "</tool_call>"
RESPONSE_OPEN, RESPONSE_CLOSE = "<tool_response>", "</tool_response>"
TOOLS_HEADER = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_FOOTER = ("</tools>\n\nFor each function call, return a json object with function name and arguments "
                "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')
CALL_PREFIX = '{"name": '      # how every generic call body starts
ARGS_KEY = ', "arguments": '
# The canonical head of a call body (what the grammar makes): the name as a JSON string in group 1, then
# the arguments' text, which parse_body and CallStream keep exactly as generated.
CALL_HEAD = re.compile(re.escape(CALL_PREFIX) + r'("(?:[^"\\]|\\.)*")' + re.escape(ARGS_KEY))

DS_CALLS_BEGIN, DS_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
DS_CALL_BEGIN, DS_CALL_END, DS_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"


@dataclass(frozen=True)
class Function:
    """One callable function as the request declares it."""

    name: str
    description: str | None = None
    parameters: dict = field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool = False

    def spec(self) -> dict:
        f = {"name": self.name}
        if self.description:
            f["description"] = self.description
        f["parameters"] = self.parameters
        return {"type": "function", "function": f}


@dataclass
class ParsedCall:
    name: str
    arguments: str                      # a JSON object as text (OpenAI's function.arguments)
    id: str = field(default_factory=lambda: new_call_id())


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


# ---------------------------------------------------------------------------------------------------------
# Rendering


def tools_text(functions: Sequence[Function]) -> str:
    """The tool section of the system message (generic format)."""
    lines = [json.dumps(f.spec(), ensure_ascii=False) for f in functions]
    return TOOLS_HEADER + "\n" + "\n".join(lines) + "\n" + TOOLS_FOOTER


def format_call(name: str, arguments: str) -> str:
    """One call block as the model writes it. `arguments` is the JSON text (re-serialised compactly when it
    parses, so history looks like what the grammar makes the model write)."""
    try:
        args = json.dumps(json.loads(arguments), ensure_ascii=False)
    except (TypeError, ValueError):
        args = arguments
    return f"{OPEN}\n{CALL_PREFIX}{json.dumps(name, ensure_ascii=False)}{ARGS_KEY}{args}}}\n{CLOSE}"


def render_generic(messages: Sequence[dict], functions: Sequence[Function]) -> list[dict]:
    """Messages in the generic format, for a template that knows nothing of tools: the tool section joins
    the system message (one is added if there is none), assistant tool_calls become call blocks in the
    content, and tool results become user turns of `<tool_response>` blocks. Content null becomes text."""
    out: list[dict] = []
    msgs = list(messages)
    if functions:
        section = tools_text(functions)
        if msgs and msgs[0].get("role") == "system":
            first = dict(msgs[0])
            first["content"] = (_text(first.get("content")) + "\n\n" + section).lstrip("\n")
            msgs[0] = first
        else:
            msgs.insert(0, {"role": "system", "content": section})
    for m in msgs:
        role = m.get("role")
        if role == "tool":
            block = f"{RESPONSE_OPEN}\n{_text(m.get('content'))}\n{RESPONSE_CLOSE}"
            if out and out[-1].get("_tool_turn"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_turn": True})
            continue
        # tool_calls stays (templates without tool support ignore it; chat.render_prompt reads it for the
        # reasoning replay rule) while the calls themselves become text in the content.
        d = {k: v for k, v in m.items() if k != "tool_call_id"}
        d["content"] = _text(m.get("content"))
        if role == "assistant" and m.get("tool_calls"):
            blocks = [format_call(c["function"]["name"], c["function"]["arguments"]) for c in m["tool_calls"]]
            d["content"] = "\n".join(([d["content"]] if d["content"] else []) + blocks)
        out.append(d)
    for d in out:
        d.pop("_tool_turn", None)
    return out


def _text(content) -> str:
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content)


# ---------------------------------------------------------------------------------------------------------
# Grammar


def call_grammar(functions: Sequence[Function], *, forced: bool, parallel: bool = True,
                 lenient: bool = True) -> str:
    """Lark text for the calls. forced=True: the output is call blocks only, starting with `<tool_call>`
    (tool_choice required / named); False: it is what follows a `<tool_call>` the model chose to write
    (tool_choice auto; the marker itself is the constraint's trigger). parallel: more than one block may
    follow. Each function's arguments follow its parameters schema."""
    alts = []
    for i, f in enumerate(functions):
        head = lark_string(CALL_PREFIX + json.dumps(f.name, ensure_ascii=False) + ARGS_KEY)
        alts.append(f"fn{i}: {head} {json_rule(_object_schema(f.parameters))} \"}}\"")
    names = " | ".join(f"fn{i}" for i in range(len(functions)))
    block_tail = f'"\\n" body "\\n" {lark_string(CLOSE)}'
    more = f' ("\\n" {lark_string(OPEN)} {block_tail})*' if parallel else ""
    first = (lark_string(OPEN) + " " if forced else "") + block_tail
    return "\n".join([f"start: {first}{more}", f"body: {names}", *alts])


def _object_schema(parameters: dict | None) -> dict:
    schema = dict(parameters or {})
    schema.setdefault("type", "object")
    return schema


# ---------------------------------------------------------------------------------------------------------
# Parsing


def parse_calls(text: str, *, native: str | None = None) -> tuple[str, list[ParsedCall], bool]:
    """(content, calls, cut) of a finished output. Content is the text before the first call (stripped).
    `cut`: the output ends inside a call block (a max_tokens cut): that call is dropped, never half-parsed.
    A block whose body is not a call stays in the content. native="deepseek" parses DeepSeek-V3's tokens
    (the text must be decoded with special tokens kept)."""
    if native == "deepseek" and DS_CALLS_BEGIN in text:
        return _parse_deepseek(text)
    start = text.find(OPEN)
    if start < 0:
        return text, [], False
    content, rest = text[:start], text[start:]
    calls: list[ParsedCall] = []
    cut = False
    while rest:
        rest = rest.lstrip()
        if not rest.startswith(OPEN):
            content += rest if not calls else ""
            break
        end = rest.find(CLOSE)
        if end < 0:
            cut = True
            break
        body = rest[len(OPEN):end].strip()
        call = parse_body(body)
        if call is None:
            return text, [], False   # not our format after all: keep the text as the answer
        calls.append(call)
        rest = rest[end + len(CLOSE):]
    return content.strip(), calls, cut


def parse_body(body: str) -> ParsedCall | None:
    """A call from one block's body. The canonical layout (what the grammar makes) keeps the arguments'
    text exactly as generated, so a stream's argument fragments add up to the same string; any other valid
    layout gets its arguments re-serialised."""
    m = CALL_HEAD.match(body)
    if m and body.endswith("}"):
        args = body[m.end():-1]
        try:
            json.loads(args)
            return ParsedCall(json.loads(m[1]), args)
        except ValueError:
            pass
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return ParsedCall(obj["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))


def _parse_deepseek(text: str) -> tuple[str, list[ParsedCall], bool]:
    content, _, rest = text.partition(DS_CALLS_BEGIN)
    calls, cut = [], DS_CALLS_END not in rest
    for block in rest.split(DS_CALL_BEGIN)[1:]:
        if DS_CALL_END not in block:
            cut = True
            break
        inner = block.split(DS_CALL_END)[0]
        _, _, after = inner.partition(DS_SEP)
        name, _, args = after.partition("\n")
        args = args.strip().removeprefix("```json").removesuffix("```").strip()
        try:
            args = json.dumps(json.loads(args), ensure_ascii=False)
        except ValueError:
            pass
        calls.append(ParsedCall(name.strip(), args))
    return content.strip(), calls, cut


class CallStream:
    """Streaming `parse_calls` (generic format): feed(text) → events, finish() → events. Events are
    ("content", text) or ("call", index, id, name, arguments_fragment) with id and name set only on a call's
    first event. Text that could be the start of `<tool_call>` is held back; argument fragments are released
    as they arrive in the canonical layout, holding back only what could be the block's closing `}` and
    `</tool_call>`, so the fragments join to exactly `parse_calls`' arguments."""

    HOLD = len("}\n" + CLOSE) + 4

    def __init__(self):
        self.buf = ""
        self.in_call = False
        self.seen_call = False
        self.index = -1
        self.sent_head = False
        self.sent_args = ""                 # argument text of the open call released so far
        self.closed = 0                     # calls whose block was closed
        self.id = ""
        self.events: list[tuple] = []

    def feed(self, text: str) -> list[tuple]:
        self.buf += text
        self.events = []
        self._run(final=False)
        return self.events

    def finish(self) -> list[tuple]:
        self.events = []
        self._run(final=True)
        return self.events

    def _run(self, final: bool) -> None:
        while True:
            if not self.in_call:
                at = self.buf.find(OPEN)
                if at < 0:
                    keep = 0 if final else _partial_suffix(self.buf, OPEN)
                    out = self.buf[:len(self.buf) - keep]
                    self.buf = self.buf[len(self.buf) - keep:]
                    if out and not self.seen_call:
                        self.events.append(("content", out))
                    return
                if at and not self.seen_call:
                    self.events.append(("content", self.buf[:at]))
                self.buf = self.buf[at + len(OPEN):]
                self.in_call, self.seen_call = True, True
                self.index += 1
                self.sent_head, self.sent_args, self.id = False, "", new_call_id()
            end = self.buf.find(CLOSE)
            body = (self.buf if end < 0 else self.buf[:end]).lstrip("\n")
            if end < 0:
                if final:
                    return            # cut inside a call: nothing more of it is released
                self._partial(body)
                return
            call = parse_body(body.strip())
            if call is not None:
                args = call.arguments
                if not self.sent_head:
                    self.events.append(("call", self.index, self.id, call.name, args))
                elif args.startswith(self.sent_args) and len(args) > len(self.sent_args):
                    self.events.append(("call", self.index, None, None, args[len(self.sent_args):]))
                self.sent_head = True
                self.closed += 1
            self.buf = self.buf[end + len(CLOSE):]
            self.in_call = False

    def _partial(self, body: str) -> None:
        m = CALL_HEAD.match(body)
        if m is None:
            return
        if not self.sent_head:
            self.events.append(("call", self.index, self.id, json.loads(m[1]), ""))
            self.sent_head = True
        args = body[m.end():]
        upto = len(args) - self.HOLD
        if upto > len(self.sent_args):
            self.events.append(("call", self.index, None, None, args[len(self.sent_args):upto]))
            self.sent_args = args[:upto]


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0

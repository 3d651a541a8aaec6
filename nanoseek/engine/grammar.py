"""Grammar-constrained decoding: the `request.Constraint` the decode loop applies per row, backed by llguidance.

Owns:
  * `Grammar`: what to enforce (an llguidance grammar, built by `json_schema`, `any_json_object` or
    `lark`) plus the text markers that must appear before it starts (`triggers`), an optional reasoning
    budget and whether the output may open with a `<think>` block.
  * `GrammarCompiler`: one per tokenizer (wrapping it for llguidance costs ~1-2 s, so it is built once and
    kept by whoever serves the model); `check` turns an unenforceable grammar into a BadInputError naming
    the keywords and their JSON paths; `constraint` makes a fresh per-request `GrammarConstraint`.
  * `GrammarConstraint`: allowed() / advance() / rollback() over an llguidance matcher.

Why llguidance: a dependency-free abi3 CPU wheel, JSON Schema (with $defs/$ref, minLength, minimum, pattern,
enum, anyOf …) and Lark grammars in one engine, masks in tens of microseconds, and `rollback(n)` for
speculative decoding; it is the engine inside llama.cpp, vLLM and SGLang. xgrammar pulls torch/triton/tvm,
outlines-core has no CFG.

The grammar stays off while the model reasons: the constraint watches the text of the tokens it is told
about and switches on only after each trigger (e.g. `</think>`, then `<tool_call>` for a tool call the model
chose to make) has appeared; text after the last trigger in the same token is fed to the matcher. When the
reasoning budget runs out before `</think>`, the constraint forces the tokens of the closing tag, which is how
`reasoning_effort` ends a long think without a second decode loop.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from nanoseek.errors import BadInputError

OPEN_THINK, CLOSE_THINK = "<think>", "</think>"
FORCED_CLOSE = "\n" + CLOSE_THINK + "\n\n"   # what a spent reasoning budget appends (forced up to the tag)

# JSON the way models write it: one space after ':' and ',', no free whitespace (a small model left free to
# emit whitespace inside an object can loop on it until max_tokens).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class Grammar:
    """What a row must generate. `grammar`: Lark text for llguidance, with a `start` rule, as `json_schema`,
    `any_json_object` and `lark` return it (None: no grammar, only the reasoning budget). `triggers`: markers that must appear in the output, in order, before the grammar starts
    (the grammar then constrains what follows the last one). `reasoning`: "open" — the output starts inside
    a think block; "maybe" — it may open one with `<think>`; None — no reasoning. `reasoning_budget`: most
    tokens of reasoning before the block is closed by force (None: no limit)."""

    grammar: str | None
    triggers: tuple[str, ...] = ()
    reasoning: str | None = None
    reasoning_budget: int | None = None


def json_schema(schema: dict) -> str:
    """Lark text for one JSON value valid against `schema` (compact separators, no free whitespace)."""
    return "start: " + json_rule(schema)


def any_json_object() -> str:
    """Lark text for one JSON object (OpenAI's json_object mode)."""
    return json_schema({"type": "object"})


def json_rule(schema: dict) -> str:
    """A Lark expression (`%json {...}`) for one value of `schema`, for use inside a larger Lark grammar."""
    s = copy.deepcopy(schema) if isinstance(schema, dict) else {}
    s["x-guidance"] = {**JSON_OPTIONS, **(s.get("x-guidance") or {})}
    return "%json " + json.dumps(s)


def lark(text: str) -> str:
    """Lark text as a grammar (it may embed `%json {schema}` rules); the identity, for symmetry."""
    return text


def after_reasoning(text: str) -> str:
    """The grammar preceded by a little optional whitespace: models write blank lines after `</think>` (a
    bound, so that a small model cannot loop on blank lines)."""
    body = re.sub(r"(?m)^start:", "grammar_start:", text)
    return "start: LEAD_WS? grammar_start\nLEAD_WS: /[ \\t\\r\\n]{1,4}/\n" + body


def compile_lark(text: str) -> str:
    """llguidance's grammar string for Lark text."""
    import llguidance
    return llguidance.LLMatcher.grammar_from_lark(text)


def lark_string(s: str) -> str:
    """A Lark string literal matching `s` exactly."""
    return json.dumps(s)


class GrammarCompiler:
    """llguidance's view of one tokenizer. `vocab_size`: the logits' width (may exceed the tokenizer's,
    padded rows are never allowed); `eos_ids`: the tokens that end a row, allowed once the grammar is
    complete."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: Sequence[int]):
        import llguidance.hf
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_ids = [int(e) for e in eos_ids]
        self.ll = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=self.eos_ids or None)
        self._forced_close = [int(t) for t in self.ll.tokenize_str(FORCED_CLOSE)]
        close = self.ll.tokenize_str(CLOSE_THINK)
        self._close_token = int(close[0]) if len(close) == 1 else None   # one token in R1/Qwen3 vocabularies

    def check(self, grammar: str, schema: dict | None = None, where: str = "") -> None:
        """BadInputError if llguidance cannot enforce `grammar`. With the schema it came from, the message
        names each unsupported keyword and its JSON path (`where` prefixes the path, e.g. the parameter)."""
        import llguidance
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(compile_lark(grammar), self.ll)
        if not is_error:
            return
        text = "; ".join(messages)
        keys = []
        for found in re.findall(r"Unimplemented keys: \[([^\]]*)\]", text):
            keys += [k.strip().strip('"') for k in found.split(",") if k.strip()]
        if keys and schema is not None:
            paths = [f"{where}{p}" for p in keyword_paths(schema, set(keys))]
            raise BadInputError(f"the JSON schema uses keywords that constrained decoding cannot enforce: "
                                f"{', '.join(paths) or ', '.join(keys)}")
        raise BadInputError(f"the grammar cannot be enforced: {text}")

    def constraint(self, spec: Grammar, device: torch.device | str = "cpu") -> GrammarConstraint:
        return GrammarConstraint(self, spec, device)


def keyword_paths(schema, keys: set[str], path: str = "") -> list[str]:
    """JSON paths (like `.properties.a.not`) of schema keywords named in `keys`: keys of schema objects, not
    property names (which live under properties/$defs/definitions/patternProperties)."""
    out: list[str] = []
    if isinstance(schema, list):
        for i, item in enumerate(schema):
            out += keyword_paths(item, keys, f"{path}[{i}]")
        return out
    if not isinstance(schema, dict):
        return out
    for k, v in schema.items():
        here = f"{path}.{k}"
        if k in keys:
            out.append(here)
        if k in ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas"):
            if isinstance(v, dict):
                for name, sub in v.items():
                    out += keyword_paths(sub, keys, f"{here}.{name}")
        elif k not in ("enum", "const", "default", "examples", "required", "x-guidance"):
            out += keyword_paths(v, keys, here)
    return out


@dataclass
class _Step:
    """What one advanced token did, so rollback can undo it: the stage before it, how many tokens it fed
    the matcher, and the reasoning tokens it counted."""

    stage: int
    fed: int
    text_len: int
    reasoning: int
    forced: int


@dataclass
class GrammarConstraint:
    """One row's constraint (see the module docstring). Stages: 0..len(triggers)-1 wait for the triggers
    (reasoning close first when the output reasons); len(triggers) runs the grammar."""

    compiler: GrammarCompiler
    spec: Grammar
    device: torch.device | str = "cpu"
    matcher: object = None
    text: bytes = b""
    stage: int = 0
    reasoning_tokens: int = 0
    forced: int = 0                      # tokens of FORCED_CLOSE already forced
    steps: list[_Step] = field(default_factory=list)

    def __post_init__(self):
        triggers = list(self.spec.triggers)
        if self.spec.reasoning is not None:
            triggers.insert(0, CLOSE_THINK)
        self.triggers = [t.encode() for t in triggers]
        self._maybe_reasoning = self.spec.reasoning == "maybe"
        self._bits = torch.zeros((1, (self.compiler.vocab_size + 31) // 32), dtype=torch.int32)
        self._shifts = torch.arange(32, dtype=torch.int32)
        text = self.spec.grammar
        if text is not None and self.spec.reasoning is not None and not self.spec.triggers:
            text = after_reasoning(text)   # the grammar starts right after the reasoning block
        self._compiled = compile_lark(text) if text is not None else None
        if not self.triggers:
            self._start(b"")

    @property
    def active(self) -> bool:
        return self.matcher is not None

    @property
    def reasoning_open(self) -> bool:
        return self.spec.reasoning is not None and self.stage == 0

    # -- Constraint -----------------------------------------------------------------------------------

    def allowed(self) -> torch.Tensor | None:
        budget = self.spec.reasoning_budget
        if self.reasoning_open and budget is not None and (self.forced or self.reasoning_tokens >= budget):
            if self.forced < len(self.compiler._forced_close):
                return self._only(self.compiler._forced_close[self.forced])
        if self.matcher is None:
            if self.forced and not self.reasoning_open and self.compiler._close_token is not None:
                # A block closed by force: the model, cut off mid-thought, tends to close it again; a second
                # `</think>` would land in the answer.
                m = torch.ones(self.compiler.vocab_size, dtype=torch.bool)
                m[self.compiler._close_token] = False
                return m.to(self.device)
            return None
        if self.matcher.is_error():
            return torch.zeros(self.compiler.vocab_size, dtype=torch.bool, device=self.device)
        # llguidance writes the bitmask straight into our preallocated int32 buffer (llguidance.torch does
        # the same, but importing it pulls torch.compile in for a kernel we don't use).
        self.matcher.unsafe_compute_mask_ptr(self._bits.data_ptr(), self._bits.numel() * 4)
        bits = (self._bits[0].unsqueeze(-1) >> self._shifts) & 1
        return bits.view(-1)[:self.compiler.vocab_size].bool().to(self.device, non_blocking=True)

    def advance(self, token: int) -> None:
        step = _Step(self.stage, 0, len(self.text), self.reasoning_tokens, self.forced)
        self.steps.append(step)
        if self.matcher is not None:
            self.matcher.consume_token(int(token))
            step.fed = 1
            return
        if self.reasoning_open:
            self.reasoning_tokens += 1
            if self.forced or (self.spec.reasoning_budget is not None
                               and self.reasoning_tokens > self.spec.reasoning_budget):
                self.forced += 1
        start = len(self.text)
        self.text += self.compiler.ll.decode_bytes([int(token)])
        if self._maybe_reasoning and self.stage == 0:
            stripped = self.text.lstrip()
            if stripped.startswith(OPEN_THINK.encode()):
                self._maybe_reasoning = False      # it opened a think block: wait for its close as usual
            elif OPEN_THINK.encode().startswith(stripped):
                return                             # whitespace or a partial "<think": not decided yet
            else:                                  # no reasoning after all: skip the close trigger
                self._maybe_reasoning = False
                self.stage = 1
                start = 0
                if self.stage == len(self.triggers):
                    step.fed = self._start(self.text)
                    return
        self._scan(step, start)

    def rollback(self, n: int) -> None:
        if n <= 0:
            return
        undone = self.steps[-n:]
        del self.steps[-n:]
        first = undone[0]
        fed = sum(s.fed for s in undone)
        if first.stage == len(self.triggers) and self.matcher is not None:
            self.matcher.rollback(fed)   # every undone token was fed to a running grammar
        else:
            self.matcher = None          # the undone tokens include the one that started it
        self.stage, self.text = first.stage, self.text[:first.text_len]
        self.reasoning_tokens, self.forced = first.reasoning, first.forced
        if self.stage == 0 and self.spec.reasoning == "maybe":
            self._maybe_reasoning = not self.text.lstrip().startswith(OPEN_THINK.encode())

    # -- internals ----------------------------------------------------------------------------------

    def _scan(self, step: _Step, start: int) -> None:
        """Look for the current trigger in the text the last token could have completed."""
        while self.stage < len(self.triggers):
            trig = self.triggers[self.stage]
            at = self.text.find(trig, max(0, start - len(trig) + 1))
            if at < 0:
                return
            self.stage += 1
            start = at + len(trig)
            if self.stage == len(self.triggers):
                step.fed = self._start(self.text[start:])

    def _start(self, leftover: bytes) -> int:
        """Switch the grammar on; feed it the text that followed the last trigger in the same token. Returns
        the number of tokens fed."""
        if self.spec.grammar is None:
            self.matcher = None
            self.stage = len(self.triggers)
            return 0
        import llguidance
        self.matcher = llguidance.LLMatcher(self.compiler.ll, self._compiled)
        if not leftover:
            return 0
        ids = self.compiler.ll.tokenize_bytes(leftover)
        self.matcher.consume_tokens(ids)   # an invalid leftover leaves the matcher in error: a dead end
        return len(ids)

    def _only(self, token: int) -> torch.Tensor:
        m = torch.zeros(self.compiler.vocab_size, dtype=torch.bool)
        m[token] = True
        return m.to(self.device)

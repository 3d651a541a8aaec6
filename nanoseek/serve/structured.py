"""Tools, response_format and thinking for one chat request: the prompt to render, the grammar to enforce, and
the reply's fields read back out of the generated text.

Owns `plan_chat` (ChatCompletionRequest → `ChatPlan`: the rendered prompt, the per-choice constraint factory,
the tool format in use, the default max_tokens) and `read_reply` (a finished Completion → content, reasoning,
tool calls, finish reason). Both work on the OpenAI chat request shape only, so the Anthropic Messages and
Responses routes, which translate onto it, reuse them unchanged; the chat route (serve/routes.py) and its
stream (serve/streams.py) just call them.

Rules (documented in the README's API section):
  * response_format json_object: one JSON object; json_schema: a value valid against the schema. Strict or
    not, the schema is enforced; a keyword the grammar engine cannot enforce is a 400 naming it and its
    JSON path.
  * tools: described to the model through its template when the template renders `tools`, else through
    nanoseek's generic format (nanoseek/toolcall.py). tool_choice required / named forces call blocks by
    grammar from the first token; auto leaves the model free until it writes `<tool_call>`, after which the
    grammar holds it to a valid call of a declared function; none neither forces nor parses calls.
  * Thinking: `thinking` switches reasoning (default: on for reasoning models, the template's choice
    otherwise); reasoning_effort none turns it off, the others cap it at REASONING_BUDGETS tokens, after
    which the block is closed by force and the answer follows. The grammar starts after the block closes.
  * A grammar-constrained request without max_tokens may use all the context left, so that a `length` cut
    (the client's sign of incomplete JSON) only comes from the context itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from nanoseek.chat import Prompt, split_reasoning
from nanoseek.engine.grammar import Grammar, GrammarCompiler, any_json_object, json_schema, lark
from nanoseek.errors import BadInputError
from nanoseek.serve.errors import ApiError
from nanoseek.serve.schemas import (REASONING_BUDGETS, ChatCompletionRequest, NamedToolChoice, ToolCall,
                                    ToolCallFunction)
from nanoseek.serve.streams import api_finish
from nanoseek.toolcall import (DS_CALLS_BEGIN, OPEN, Function, ParsedCall, call_grammar, parse_calls,
                               render_generic)


@dataclass
class ChatPlan:
    """What the route needs to run a chat request with its tools / format / thinking settings."""

    prompt: Prompt
    make_constraint: Callable[[], object] | None = None     # one fresh constraint per choice
    functions: list[Function] = field(default_factory=list)
    parse_tools: bool = False          # read tool calls out of the output
    native: str | None = None          # "deepseek": the template writes DeepSeek-V3 tool tokens
    constrained: bool = False          # a grammar holds the answer (for the default max_tokens)
    split: bool = False                # the output may hold a reasoning block

    def constraints(self, n: int) -> list | None:
        return None if self.make_constraint is None else [self.make_constraint() for _ in range(n)]


def thinking_switch(req: ChatCompletionRequest, reasoning_model: bool) -> bool | None:
    """render_prompt's `thinking`: the request's `thinking`, else off for reasoning_effort "none" on a reasoning
    model, else the template's own default (None): a reasoning model's template opens the block, which is
    the per-model default (on for reasoning models, off for the others)."""
    if req.thinking is not None:
        return req.thinking.type == "enabled"
    if req.reasoning_effort == "none" and reasoning_model:
        return False
    return None


def plan_chat(sm, req: ChatCompletionRequest, compiler: Callable[[], GrammarCompiler],
              render: Callable[[list[dict], bool | None, list[dict] | None], Prompt]) -> ChatPlan:
    """Render the prompt and build the grammar for `req` on served model `sm` (its tokenizer, `reasoning`).
    `compiler()` returns the model's GrammarCompiler (built on first use); `render(messages, thinking,
    tools)` renders the prompt (the chat route's renderer, which also does prefix completion).
    Raises ApiError 400 for a schema the grammar cannot enforce."""
    compiler = _guarded(compiler)
    template = getattr(sm.tokenizer, "chat_template", None) or ""
    functions = [Function(t.function.name, t.function.description,
                          t.function.parameters or {"type": "object", "properties": {}}, bool(t.function.strict))
                 for t in req.tools or []]
    choice = req.tool_choice if req.tool_choice is not None else ("auto" if functions else "none")
    native_tools = bool(functions) and "tools" in template
    native = "deepseek" if native_tools and DS_CALLS_BEGIN in template else None
    messages = req.template_messages()
    if functions and not native_tools or (not functions and _has_tool_turns(messages) and "tool" not in template):
        messages = render_generic(messages, functions)
    thinking = thinking_switch(req, sm.reasoning)
    tools_arg = [f.spec() for f in functions] if native_tools else None
    prompt = render(messages, thinking, tools_arg)
    split = bool(sm.reasoning or prompt.starts_in_reasoning)
    reasoning = "open" if prompt.starts_in_reasoning else ("maybe" if sm.reasoning else None)
    budget = REASONING_BUDGETS.get(req.reasoning_effort or "max") if reasoning else None

    grammar, triggers, constrained, schema, where = None, (), False, None, ""
    rf = req.response_format
    if functions and choice != "none" and native is None:
        forced = choice == "required" or isinstance(choice, NamedToolChoice)
        pool = ([f for f in functions if f.name == choice.function.name]
                if isinstance(choice, NamedToolChoice) else functions)
        parallel = req.parallel_tool_calls is not False and not isinstance(choice, NamedToolChoice)
        pool = [_enforceable(f, i, compiler) for i, f in enumerate(pool)]
        grammar = lark(call_grammar(pool, forced=forced, parallel=parallel))
        triggers = () if forced else (OPEN,)
        constrained = forced
    elif rf is not None and rf.type == "json_object":
        grammar, constrained = any_json_object(), True
    elif rf is not None and rf.type == "json_schema":
        schema, where = rf.json_schema.schema_, "response_format.json_schema.schema"
        grammar, constrained = json_schema(schema), True
    if grammar is not None:
        _check(compiler(), grammar, schema, where)
    if grammar is None and budget is None:
        make = None
    else:
        spec = Grammar(grammar, triggers, reasoning, budget)
        device = getattr(sm.scheduler, "runner", None)
        device = getattr(device, "device", "cpu")

        def make():
            return compiler().constraint(spec, device)
    return ChatPlan(prompt, make, functions, parse_tools=bool(functions) and choice != "none", native=native,
                    constrained=constrained, split=split)


def _guarded(compiler: Callable[[], GrammarCompiler]) -> Callable[[], GrammarCompiler]:
    """The compiler, or a 400 when llguidance cannot wrap this model's tokenizer (it needs a fast one)."""
    def get() -> GrammarCompiler:
        try:
            return compiler()
        except ApiError:
            raise
        except Exception as e:
            raise ApiError(400, f"Constrained decoding (tools, response_format, reasoning_effort) is not "
                                f"available for this model's tokenizer: {e}", code="unsupported_tokenizer") from None
    return get


def _has_tool_turns(messages: list[dict]) -> bool:
    return any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)


def _enforceable(f: Function, i: int, compiler) -> Function:
    """A function whose parameters the grammar can enforce: a strict one must be (400 otherwise); a
    non-strict one falls back to any JSON object for its arguments."""
    try:
        compiler().check(json_schema(f.parameters), f.parameters, f"tools[{i}].function.parameters")
        return f
    except BadInputError as e:
        if f.strict:
            raise ApiError.bad_request(f"Invalid 'tools[{i}].function.parameters': {e}",
                                       param=f"tools[{i}].function.parameters") from None
        return Function(f.name, f.description, {"type": "object"}, False)


def _check(compiler: GrammarCompiler, grammar: str, schema: dict | None, where: str) -> None:
    try:
        compiler.check(grammar, schema, where)
    except BadInputError as e:
        raise ApiError.bad_request(f"Invalid '{where or 'tools'}': {e}", param=where or "tools") from None


@dataclass
class Reply:
    content: str | None
    reasoning: str | None
    tool_calls: list[ToolCall]
    finish_reason: str


def read_reply(plan: ChatPlan, text: str, finish: str, raw_text: Callable[[], str] | None = None) -> Reply:
    """The reply's fields from a finished output. `finish` is the engine's reason ("stop", "length", …);
    calls turn "stop" into "tool_calls"; a call cut by max_tokens is dropped and the reason stays "length".
    `raw_text()` gives the output with special tokens (native DeepSeek tool tokens are special)."""
    reasoning, content = split_reasoning(text, plan.prompt.starts_in_reasoning) if plan.split else (None, text)
    calls: list[ParsedCall] = []
    if plan.parse_tools:
        source = content
        if plan.native == "deepseek" and raw_text is not None:
            source = split_reasoning(raw_text(), plan.prompt.starts_in_reasoning)[1] if plan.split else raw_text()
        parsed, calls, _cut = parse_calls(source, native=plan.native)
        if calls or _cut:
            content = parsed or None
    reason = api_finish(finish)
    if calls and reason == "stop":
        reason = "tool_calls"
    return Reply(content, reasoning, [ToolCall(id=c.id, type="function",
                                               function=ToolCallFunction(name=c.name, arguments=c.arguments))
                                      for c in calls], reason)

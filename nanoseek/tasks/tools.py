"""Multi-turn tool episodes: tasks that give the model tools, and the conversation loop GRPO and eval share.

A `ToolTask` wraps any task (its problems, answer check and reward) and adds tools: `calculator` (arithmetic
on numbers, evaluated by walking the expression's syntax tree, no eval) and `python` (a separate limited
process: nanoseek/sandbox.py, which states the threat model: it guards against a model's mistakes, it is not
a boundary against an adversary).

An episode (`run_episodes`) is a conversation: model turn → tool calls parsed → tool results appended → model
turn … until a turn without calls (the answer) or `max_turns`. The tools are shown, calls parsed and results
rendered exactly as `nanoseek serve` does (nanoseek/toolcall.py: the generic `<tool_call>` format through
`render_generic` for templates without tool support, the template's own otherwise), so a model trained here
calls tools the same way when served. The reward comes at the end, from the task, on the last model turn.

The conversation is kept as one token sequence with a mask `own`: 1 on the tokens the model sampled (its turns,
each with the token that ended it), 0 on prompt and tool-result tokens. The loss covers only `own` tokens. The
text between turns is the chat template's (the difference between the conversation rendered with and without
the tool results), so the sequence is what the template would render, without re-tokenising the model's turns.

A sandbox violation (timeout, memory, output flood, refused import) ends the episode with reward 0 and a log
line; it never raises into training. A wrong call (unknown tool, arguments that are not JSON, an exception in
the code) is an ordinary tool result the model sees and can recover from.
"""

from __future__ import annotations

import ast
import json
import logging
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from nanoseek.chat import render_prompt
from nanoseek.engine.sampling import SamplingParams
from nanoseek.errors import BadInputError
from nanoseek.sandbox import SandboxLimits, SandboxResult, run_python
from nanoseek.tasks.base import GeneratedTask, Problem, RewardBreakdown, Task
from nanoseek.tasks.prompts import Template
from nanoseek.toolcall import DS_CALLS_BEGIN, Function, parse_calls, render_generic

log = logging.getLogger("nanoseek.tools")

CALCULATOR = Function("calculator", "Evaluate an arithmetic expression: numbers, + - * / // % ** and parentheses.",
                      {"type": "object", "properties": {"expression": {"type": "string"}},
                       "required": ["expression"]})
PYTHON = Function("python", "Run Python code (no files, processes or network; imports: math, fractions, "
                  "itertools and similar). The printed output, or the value of the last expression, comes back.",
                  {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]})

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_EXPRESSION = 200       # characters
MAX_EXPONENT = 100         # keeps 10**10**10 from eating the trainer's memory


def calculate(expression: str) -> str:
    """The calculator: the value of an arithmetic expression as text; raises ValueError on anything else."""
    if not isinstance(expression, str) or not expression.strip() or len(expression) > MAX_EXPRESSION:
        raise ValueError(f"expression must be 1 to {MAX_EXPRESSION} characters")

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](ev(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(b) > MAX_EXPONENT:
                raise ValueError(f"exponent above {MAX_EXPONENT}")
            return _BINARY[type(node.op)](a, b)
        raise ValueError("only numbers, + - * / // % ** and parentheses")

    try:
        value = ev(ast.parse(expression.strip(), mode="eval"))
    except SyntaxError as e:
        raise ValueError(f"not an expression ({e.msg})") from None
    except ZeroDivisionError:
        raise ValueError("division by zero") from None
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("result is not finite")
        return repr(int(value)) if value.is_integer() else repr(round(value, 10))
    return str(value)


@dataclass(frozen=True)
class Tool:
    function: Function
    run: Callable[[dict], SandboxResult]   # parsed arguments → result


def _calculator_tool(limits: SandboxLimits) -> Tool:
    def run(args: dict) -> SandboxResult:
        try:
            return SandboxResult(output=calculate(args.get("expression")))
        except ValueError as e:
            return SandboxResult(error=str(e))
    return Tool(CALCULATOR, run)


def _python_tool(limits: SandboxLimits) -> Tool:
    def run(args: dict) -> SandboxResult:
        code = args.get("code")
        if not isinstance(code, str):
            return SandboxResult(error="'code' must be a string")
        return run_python(code, limits)
    return Tool(PYTHON, run)


TOOLS = {"calculator": _calculator_tool, "python": _python_tool}


class ToolTask(Task):
    """`base`'s problems, check and reward, with tools and a turn limit. Prompts use the chat template."""

    def __init__(self, base: Task, tools: Sequence[str] = ("calculator",), max_turns: int = 4,
                 limits: SandboxLimits | None = None):
        unknown = [t for t in tools if t not in TOOLS]
        if unknown or not tools:
            raise BadInputError(f"unknown tools {unknown or tools}: choose from {', '.join(TOOLS)}")
        if max_turns < 1:
            raise BadInputError("max_turns must be ≥ 1")
        super().__init__(base.rewards)
        limits = limits or SandboxLimits()
        self.base, self.max_turns, self.limits = base, max_turns, limits
        self.tools = {name: TOOLS[name](limits) for name in tools}
        self.name = f"{base.name}+{'+'.join(tools)}"
        self.endless = isinstance(base, GeneratedTask)   # the train stream never ends (GRPO must not list it)

    @property
    def functions(self) -> list[Function]:
        return [t.function for t in self.tools.values()]

    def iter_problems(self, split: str = "test"):
        return self.base.iter_problems(split)

    def problems(self, split: str = "test", limit: int | None = None) -> list[Problem]:
        return self.base.problems(split, limit)

    def check(self, answer: str, problem: Problem) -> bool:
        return self.base.check(answer, problem)

    def extract_answer(self, completion: str, *, started_in_think: bool = False) -> str | None:
        return self.base.extract_answer(completion, started_in_think=started_in_think)

    def answer_key(self, answer: str) -> str:
        return self.base.answer_key(answer)

    def reward(self, completion: str, problem: Problem, *, started_in_think: bool = False,
               num_tokens: int | None = None) -> RewardBreakdown:
        return self.base.reward(completion, problem, started_in_think=started_in_think, num_tokens=num_tokens)

    def call(self, name: str, arguments: str) -> SandboxResult:
        """One parsed call → its result; never raises (a wrong call is a result the model reads)."""
        tool = self.tools.get(name)
        if tool is None:
            return SandboxResult(error=f"unknown tool {name!r}; available: {', '.join(self.tools)}")
        try:
            args = json.loads(arguments)
        except (TypeError, ValueError):
            return SandboxResult(error="arguments are not a JSON object")
        if not isinstance(args, dict):
            return SandboxResult(error="arguments are not a JSON object")
        try:
            return tool.run(args)
        except Exception as e:  # noqa: BLE001 -- a tool's own bug must not crash training either
            log.warning("tool %s failed: %s", name, e)
            return SandboxResult(error=f"tool failed: {e}")


def render_conversation(tokenizer, messages: list[dict], functions: Sequence[Function], *,
                        thinking: bool | None = None, add_generation_prompt: bool = True):
    """The conversation as `serve` renders a chat request with tools (serve/structured.plan_chat): the template's
    own tool support when it has one, else the generic format through render_generic."""
    template = getattr(tokenizer, "chat_template", None) or ""
    native = bool(functions) and "tools" in template
    msgs = messages if native else render_generic(messages, functions)
    return render_prompt(tokenizer, msgs, add_generation_prompt=add_generation_prompt,
                         thinking=thinking if add_generation_prompt else None,
                         tools=[f.spec() for f in functions] if native else None)


@dataclass
class Episode:
    problem: Problem
    messages: list[dict]
    ids: list[int]                    # the whole conversation's tokens
    own: list[int]                    # 1 where ids[i] was sampled by the model
    prompt_len: int                   # tokens of the first prompt
    starts_in_reasoning: bool = False  # the last turn's prompt opened a think block
    text: str = ""                    # the last model turn: what the reward scores
    turns: int = 0
    calls: int = 0
    finish_reason: str | None = None  # the last turn's; "violation" after a sandbox violation
    violation: str | None = None
    routing: list | None = None       # the last turn's routing record (covers the whole sequence but its end)
    done: bool = False
    results: list[dict] = field(default_factory=list)

    @property
    def own_tokens(self) -> int:
        return sum(self.own)

    def score(self, task: Task) -> RewardBreakdown:
        if self.violation is not None:
            return RewardBreakdown(0.0, 0.0, 0.0, 0.0, None)
        return task.reward(self.text, self.problem, started_in_think=self.starts_in_reasoning,
                           num_tokens=self.own_tokens)


def run_episodes(generate, tokenizer, task: ToolTask, problems: Sequence[Problem],
                 params: Sequence[SamplingParams], *, open_think: bool = False, record_routing: bool = False,
                 context: int | None = None) -> list[Episode]:
    """Play one episode per problem (repeat a problem for a group), all turns batched: `generate(prompts,
    params, record_routing=...)` is Engine.generate or a stand-in. Each turn of an episode samples with its
    params, the seed advanced per turn. Returns the episodes in order."""
    if not isinstance(task, ToolTask):
        raise BadInputError(f"task {task.name} gives no tools")
    from nanoseek.evaluate import completion_text

    functions = task.functions
    template = Template("chat", open_think)
    thinking = True if open_think else None
    native = "deepseek" if DS_CALLS_BEGIN in (getattr(tokenizer, "chat_template", None) or "") else None
    episodes = []
    for p in problems:
        messages = template.messages(p)
        prompt = render_conversation(tokenizer, messages, functions, thinking=thinking)
        episodes.append(Episode(p, messages, list(prompt.ids), [0] * len(prompt.ids), len(prompt.ids),
                                prompt.starts_in_reasoning))
    for turn in range(task.max_turns):
        live = [i for i, e in enumerate(episodes) if not e.done]
        if not live:
            break
        turn_params = [_turn_params(params[i], turn) for i in live]
        outs = generate([episodes[i].ids for i in live], turn_params, record_routing=record_routing)
        for i, out in zip(live, outs):
            e = episodes[i]
            sampled = out.sampled_ids
            e.ids += sampled
            e.own += [1] * len(sampled)
            e.turns += 1
            e.finish_reason = out.finish_reason
            e.routing = out.routing
            e.text = completion_text(tokenizer, out, template.stop)
            _, calls, _cut = parse_calls(e.text, native=native)
            if not calls or turn == task.max_turns - 1:
                e.done = True
                continue
            _tool_turn(e, calls, task, tokenizer, functions, thinking, out, context,
                       max(p.max_tokens for p in turn_params))
    return episodes


def _turn_params(p: SamplingParams, turn: int) -> SamplingParams:
    if turn == 0 or p.seed is None:
        return p
    return replace(p, seed=(p.seed * 1_000_003 + turn) % 2**63, stop=list(p.stop))


def _tool_turn(e: Episode, calls, task: ToolTask, tokenizer, functions, thinking, out,
               context: int | None, max_tokens: int) -> None:
    """Run the turn's calls and append the results the way the template renders them; or end the episode."""
    # The turn as text, as the template will render it back; the token that ended it (EOS) is the template's.
    content = tokenizer.decode(out.token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    ended = tokenizer.decode([out.stop_token], skip_special_tokens=False) if out.stop_token is not None else ""
    e.messages.append({"role": "assistant", "content": content})
    for call in calls:
        e.calls += 1
        r = task.call(call.name, call.arguments)
        e.results.append({"tool": call.name, **r.as_dict()})
        if r.violation is not None:
            log.warning("episode %s: sandbox violation (%s%s) in %s: reward 0", e.problem.id, r.violation,
                        f": {r.detail}" if r.detail else "", call.name)
            e.violation, e.finish_reason, e.done = r.violation, "violation", True
            return
        result = r.output if r.error is None else f"error: {r.error}"
        e.messages.append({"role": "tool", "content": result.rstrip("\n") or "(no output)"})
    # The text between the model's turn and the next generation prompt, as the template writes it.
    before = render_conversation(tokenizer, e.messages[:-len(calls)], functions, add_generation_prompt=False).text
    after = render_conversation(tokenizer, e.messages, functions, thinking=thinking)
    at = before.rfind(content)
    if at < 0 or not after.text.startswith(before):
        raise BadInputError("the chat template does not render a conversation as a prefix of its continuation, "
                            "so tool episodes cannot keep the model's own tokens; use a template that does")
    glue = before[at + len(content):]           # how the template closes the turn, e.g. "<|im_end|>\n"
    glue = glue.removeprefix(ended)                  # the token that ended the turn is already in the sequence
    extra = tokenizer.encode(glue + after.text[len(before):], add_special_tokens=False)
    if context is not None and len(e.ids) + len(extra) + max_tokens > context:
        e.done, e.finish_reason = True, "length"
        return
    e.ids += extra
    e.own += [0] * len(extra)
    e.starts_in_reasoning = after.starts_in_reasoning

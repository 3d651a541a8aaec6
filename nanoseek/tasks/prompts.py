"""Prompt templates: a Problem → prompt token ids, in one of three forms.

  * `chat`: the model's own chat template (nanoseek.chat.render_prompt), with a system message stating the
    response format. The prompt opens the think block (render_prompt's thinking=True) unless told not to.
  * `plain`: the problem's text as it is (no instruction, no think block), for models trained on a task's
    own format, e.g. a model pretrained with `nanoseek pretrain`.
  * `r1-zero`: DeepSeek-R1-Zero's plain-text template (DeepSeek-R1 Table 1) for base models, in the form
    Dr. GRPO/Oat train with: the paper's text, then "\\nUser: {q}\\nAssistant: <think>".

Both ask for `<think>…</think> <answer>…</answer>` and stop generation at `</answer>` (Oat does), which the
reward's format check (rewards.parse_response) expects back at the end; evaluate.py restores it.
"""

from __future__ import annotations

from dataclasses import dataclass

from nanoseek.chat import Prompt, render_prompt
from nanoseek.errors import BadInputError
from nanoseek.tasks.base import Problem
from nanoseek.tasks.rewards import ANSWER_CLOSE, THINK_OPEN

TEMPLATES = ("chat", "r1-zero", "plain")

FORMAT_INSTRUCTION = ("Think through the problem step by step inside <think> </think> tags, then give only the "
                      "final answer inside <answer> </answer> tags, i.e. <think> reasoning here </think> "
                      "<answer> answer here </answer>.")

R1_ZERO = ("A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
           "The assistant first thinks about the reasoning process in the mind and then provides the user with "
           "the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> "
           "</answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here "
           "</answer>.\nUser: {question}\nAssistant:")


@dataclass(frozen=True)
class Template:
    name: str = "chat"
    open_think: bool = True     # end the prompt with <think> so the completion starts reasoning
    stop: tuple[str, ...] = (ANSWER_CLOSE,)

    def __post_init__(self):
        if self.name not in TEMPLATES:
            raise BadInputError(f"unknown template {self.name!r} (choose from {', '.join(TEMPLATES)})")

    def messages(self, problem: Problem) -> list[dict]:
        """The chat form: the format instruction as the system message (unless the problem brings its own)."""
        if isinstance(problem.prompt, str):
            return [{"role": "system", "content": FORMAT_INSTRUCTION}, {"role": "user", "content": problem.prompt}]
        msgs = list(problem.prompt)
        if not msgs or msgs[0].get("role") != "system":
            msgs.insert(0, {"role": "system", "content": FORMAT_INSTRUCTION})
        return msgs

    def text(self, problem: Problem) -> str:
        """The r1-zero form (plain text)."""
        question = problem.prompt if isinstance(problem.prompt, str) else _last_user(problem)
        text = R1_ZERO.format(question=question)
        return text + " " + THINK_OPEN if self.open_think else text

    def render(self, tokenizer, problem: Problem) -> Prompt:
        if self.name == "chat":
            return render_prompt(tokenizer, self.messages(problem), thinking=True if self.open_think else None)
        if self.name == "plain":  # the problem's own text, nothing added: for models pretrained on a task's format
            text = problem.prompt if isinstance(problem.prompt, str) else _last_user(problem)
            return Prompt(list(tokenizer.encode(text)), text, False)
        text = self.text(problem)
        return Prompt(list(tokenizer.encode(text)), text, self.open_think)


def _last_user(problem: Problem) -> str:
    for m in reversed(problem.prompt):
        if m.get("role") == "user" and isinstance(m.get("content"), str):
            return m["content"]
    raise BadInputError(f"problem {problem.id}: the r1-zero template needs a user message with text")

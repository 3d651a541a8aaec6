"""Chat messages → prompt token ids, and model output → (reasoning, content), DeepSeek-R1 style.

Owns:
  * `render_prompt`: messages through the tokenizer's own chat template, with R1's conventions applied
    (reasoning dropped from assistant turns in the history; an optional forced `<think>` opening).
  * `ReasoningSplitter` (streaming) and `split_reasoning` (one-shot): separate the `<think>…</think>` block
    from the answer, as DeepSeek's API returns `reasoning_content` beside `content`.

The two splitters are written independently on purpose; the tests check they agree for every way of cutting
the text into deltas.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from nanoseek.errors import BadInputError

OPEN_TAG = "<think>"
CLOSE_TAG = "</think>"


# ---------------------------------------------------------------------------------------------------------
# Reasoning split


def split_reasoning(text: str, start_in_reasoning: bool = False, open_tag: str = OPEN_TAG,
                    close_tag: str = CLOSE_TAG) -> tuple[str | None, str]:
    """(reasoning, content) of a finished output. reasoning is None when the output has no reasoning block
    (no opening tag, and the prompt didn't open one); "" when the block was there but empty.

    An opening tag counts only at the very start (after whitespace, which is dropped). Leading newlines of
    the reasoning and of the content are stripped. Without a closing tag everything after the opening is
    reasoning (the model ran out of tokens while thinking).
    """
    stripped = text.lstrip()
    if stripped.startswith(open_tag):
        body = stripped[len(open_tag):]
    elif start_in_reasoning:
        body = text
    else:
        return None, text
    reasoning, closed, content = body.lstrip("\n").partition(close_tag)
    return reasoning, content.lstrip("\n") if closed else ""


class ReasoningSplitter:
    """Streaming `split_reasoning`: feed(delta) → (reasoning_delta, content_delta); flush() at the end.

    Holds back only what could still be a tag: the start of the output until it is clearly not `<think>`,
    and a tail that could begin `</think>`. `saw_reasoning` tells apart "no reasoning block" from an empty one
    (split_reasoning's None vs "").
    """

    def __init__(self, start_in_reasoning: bool = False, open_tag: str = OPEN_TAG, close_tag: str = CLOSE_TAG):
        self.open_tag, self.close_tag = open_tag, close_tag
        self.start_in_reasoning = start_in_reasoning
        self.saw_reasoning = start_in_reasoning
        self._mode = "start"          # start → reasoning → content, or start → content
        self._strip_newlines = False  # dropping "\n" right after an opening/closing tag
        self._held = ""

    def feed(self, delta: str) -> tuple[str, str]:
        buf, self._held = self._held + delta, ""
        if self._mode == "start":
            stripped = buf.lstrip()
            if stripped.startswith(self.open_tag):
                self._enter_reasoning()
                buf = stripped[len(self.open_tag):]
            elif self.open_tag.startswith(stripped):   # still maybe the opening tag (or only whitespace)
                self._held = buf
                return "", ""
            elif self.start_in_reasoning:
                self._enter_reasoning()
            else:
                self._mode = "content"
        if self._mode == "reasoning":
            return self._reasoning(buf)
        return "", self._content(buf)

    def flush(self) -> tuple[str, str]:
        buf, self._held = self._held, ""
        if self._mode == "start":
            # Only whitespace or a cut-off "<thi": it was never a tag.
            if not self.start_in_reasoning:
                self._mode = "content"
                return "", buf
            self._enter_reasoning()
        if self._mode == "reasoning":
            return self._lstrip_newlines(buf), ""
        return "", self._content(buf)

    def _enter_reasoning(self) -> None:
        self._mode, self._strip_newlines, self.saw_reasoning = "reasoning", True, True

    def _lstrip_newlines(self, text: str) -> str:
        if self._strip_newlines:
            text = text.lstrip("\n")
            self._strip_newlines = not text   # keep stripping until something else arrives
        return text

    def _reasoning(self, buf: str) -> tuple[str, str]:
        buf = self._lstrip_newlines(buf)
        before, closed, after = buf.partition(self.close_tag)
        if closed:
            self._mode, self._strip_newlines = "content", True
            return before, self._content(after)
        # Hold back the longest tail that is a proper prefix of the closing tag.
        for n in range(min(len(buf), len(self.close_tag) - 1), 0, -1):
            if self.close_tag.startswith(buf[-n:]):
                self._held = buf[-n:]
                return buf[:-n], ""
        return buf, ""

    def _content(self, buf: str) -> str:
        return self._lstrip_newlines(buf)


# ---------------------------------------------------------------------------------------------------------
# Prompt rendering


@dataclass
class Prompt:
    ids: list[int]
    text: str
    starts_in_reasoning: bool   # generation begins inside <think>: stream through ReasoningSplitter(True)


def render_prompt(tokenizer, messages: Sequence[dict], *, add_generation_prompt: bool = True,
                  thinking: bool | None = None, tools: list[dict] | None = None) -> Prompt:
    """Render messages with the tokenizer's chat template and tokenize the result.

    messages: {"role", "content"} dicts; content is a string, None, or a list of {"type": "text", "text"}
    parts (joined with no separator, as OpenAI concatenates text parts). Other keys pass through to the
    template, except `reasoning_content`, which is dropped: R1 keeps reasoning out of the history, so for
    assistant turns only the text after the last `</think>` is kept. The exception is DeepSeek's
    thinking-mode replay rule: an assistant turn that made tool calls (`tool_calls`) keeps its
    `reasoning_content`, written back as a `<think>` block before its content.

    tools: OpenAI tool specs for a template that renders tools itself (passed as `tools`); templates without
    tool support get them through nanoseek.toolcall.render_generic instead.

    thinking (only with add_generation_prompt): None leaves the template alone. True makes generation start
    with reasoning — appending "<think>\\n" unless the template already opened a think block. False closes
    a think block the template forced open (R1 does), so the model answers directly. Both are also passed to
    the template as `thinking` and `enable_thinking`, the switches DeepSeek-V3.1 and Qwen3 templates read.

    A tokenizer without a chat template (a base model) gets a plain transcript instead:
        "system: ...\\n\\nuser: ...\\n\\nassistant:" — turns separated by a blank line, the generation prompt
    ending right after "assistant:" (no trailing space, which most BPE vocabularies fold into the next word).
    That text is tokenized with the tokenizer's usual special tokens (e.g. BOS); a template's text is not,
    since templates write their own.
    """
    msgs = [_normalize(m, i) for i, m in enumerate(messages)]
    template = getattr(tokenizer, "chat_template", None)
    if template:
        switches = {} if thinking is None else {"thinking": thinking, "enable_thinking": thinking}
        if tools:
            switches["tools"] = tools
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             **switches)
    else:
        turns = [f"{m['role']}: {m['content']}" for m in msgs]
        if add_generation_prompt:
            turns.append("assistant:")
        text = "\n\n".join(turns)
    in_reasoning = add_generation_prompt and _ends_inside_think(text)
    if add_generation_prompt and thinking is True and not in_reasoning:
        text += OPEN_TAG + "\n"
        in_reasoning = True
    elif add_generation_prompt and thinking is False and in_reasoning:
        # An empty think block, "<think>\n\n</think>\n\n": the form R1/Qwen3 use for "no reasoning".
        text += ("\n" if text.endswith("\n") else "\n\n") + CLOSE_TAG + "\n\n"
        in_reasoning = False
    ids = tokenizer.encode(text, add_special_tokens=not template)
    return Prompt(list(ids), text, in_reasoning)


def _ends_inside_think(text: str) -> bool:
    """The prompt's last non-whitespace is an opening tag: the template forced reasoning (R1)."""
    return text.rstrip().endswith(OPEN_TAG)


def _normalize(message, index: int) -> dict:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise BadInputError(f"Invalid 'messages[{index}]': expected an object with a string 'role'.")
    content = message.get("content")
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise BadInputError(f"Invalid 'messages[{index}].content[{j}]': only text parts are supported, "
                                    f"got {kind!r}.")
            texts.append(part["text"])
        content = "".join(texts)
    elif content is None:
        content = ""
    elif not isinstance(content, str):
        raise BadInputError(f"Invalid type for 'messages[{index}].content': expected a string or an array of "
                            "text parts.")
    if message["role"] == "assistant" and CLOSE_TAG in content:
        content = content.rsplit(CLOSE_TAG, 1)[1].lstrip("\n")
    reasoning = message.get("reasoning_content")
    if message["role"] == "assistant" and message.get("tool_calls") and isinstance(reasoning, str) and reasoning:
        content = f"{OPEN_TAG}\n{reasoning}\n{CLOSE_TAG}\n\n{content}"
    out = {k: v for k, v in message.items() if k != "reasoning_content"}
    out["content"] = content
    return out

"""Fill-in-the-middle (FIM): the known FIM token spellings, the prefix-suffix-middle (PSM) layout, and the
pretraining transform (DeepSeek-V3 report §4.1).

Owns the one copy of the layout, used both ways:
  * serving (`POST /beta/completions`, `/completions` with `suffix`): `fim_prompt(tokens, prefix, suffix)` is
    the prompt whose continuation is the middle;
  * pretraining (`data prepare --fim-rate`): `fim_document(tokens, text, rng)` rewrites a document as
    `BEGIN prefix HOLE suffix END middle` (then EOS, added by the tokenizing step as for any document).

Known spellings (`FIM_SPELLINGS`): DeepSeek's `<｜fim▁begin｜>/<｜fim▁hole｜>/<｜fim▁end｜>`, Qwen2.5-Coder's
`<|fim_prefix|>/<|fim_suffix|>/<|fim_middle|>`, StarCoder's `<fim_prefix>/<fim_suffix>/<fim_middle>`. All
three put the prefix first, then the suffix, then generate the middle.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

DEFAULT_FIM_RATE = 0.1   # DeepSeek-V3: 10% of documents


@dataclass(frozen=True)
class FimTokens:
    """One FIM vocabulary: `begin` opens the prefix, `hole` marks where the middle goes (and opens the
    suffix), `end` closes the suffix; the middle follows."""

    name: str
    begin: str
    hole: str
    end: str


FIM_SPELLINGS = (
    FimTokens("deepseek", "<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),
    FimTokens("qwen", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
    FimTokens("starcoder", "<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
)


def detect(tokenizer) -> FimTokens | None:
    """The tokenizer's FIM tokens: the first known spelling whose three tokens are each one vocabulary entry."""
    vocab = tokenizer.get_vocab()
    for spelling in FIM_SPELLINGS:
        if all(t in vocab for t in (spelling.begin, spelling.hole, spelling.end)):
            return spelling
    return None


def fim_prompt(tokens: FimTokens, prefix: str, suffix: str) -> str:
    """The PSM prompt: the model's continuation is the middle."""
    return f"{tokens.begin}{prefix}{tokens.hole}{suffix}{tokens.end}"


def fim_document(tokens: FimTokens, text: str, rng: random.Random) -> str:
    """A document in PSM form, cut at two uniformly drawn character positions (as in DeepSeek-Coder/V3)."""
    a, b = sorted(rng.randint(0, len(text)) for _ in range(2))
    return fim_prompt(tokens, text[:a], text[b:]) + text[a:b]


def maybe_fim(tokens: FimTokens | None, text: str, index: int, rate: float, seed: int = 0) -> str:
    """Document `index` rewritten with probability `rate`, decided by (seed, index) alone: the same input
    prepares to the same shards whatever the worker count, and a rerun reproduces them."""
    if tokens is None or rate <= 0:
        return text
    rng = random.Random(f"fim:{seed}:{index}")
    if rng.random() >= rate:
        return text
    return fim_document(tokens, text, rng)

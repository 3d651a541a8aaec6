"""Incremental detokenization: turn a growing list of token ids into text deltas for streaming.

Byte-level BPE can split one character across tokens; decoding token by token would emit U+FFFD halves.
We decode a short window behind the newest tokens and only release text once it no longer ends in an
incomplete character (the approach vLLM and TGI use)."""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # start of the window we re-decode
        self.read = 0  # tokens whose text is already emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix:self.read])
        full = self._decode(self.ids[self.prefix:])
        if full.endswith("\ufffd") or len(full) <= len(prefix_text):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return full[len(prefix_text):]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        prefix_text = self._decode(self.ids[self.prefix:self.read])
        full = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return full[len(prefix_text):]

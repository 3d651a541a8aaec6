"""Row bookkeeping: which request holds which row of the batch cache, and the cache's size.

Layout. Live requests always occupy rows [0, n) of one cache: rows [0, d) are decoding, rows [d, n) are still
prefilling, so each decode step runs on the view `cache.rows(0, d)` with no gather and no copy. A new request
takes row n. When a decoding row i leaves, the last decoding row d-1 moves into i and the last prefilling row
into d-1; only positions already written are copied (the rest of a row is never read, since attention masks
keys by position). When a prompt is complete, its row is swapped with row d and d grows.

Size. Rows start few and short and grow by doubling, rows up to `max_batch` and positions up to `max_len`, so
memory follows what is running rather than max_batch × max_len; with nothing running they shrink back. Growth
and shrinking use only `Cache.select` and `Cache.resized`, which every cache kind implements.

`RowTable` works through the `Cache` interface only (copy_row, swap_rows, select, resized), so its arithmetic
is tested with a recording stand-in for the cache.
"""

from __future__ import annotations

import torch


def grow(have: int, need: int, cap: int) -> int:
    """`have` doubled until it reaches `need`, at most `cap`: sizes that grow by doubling copy each element
    O(1) times in all, however the need creeps up."""
    while have < need:
        have *= 2
    return min(have, cap)


class Slot:
    """A request holding a row. `filled` prompt tokens are in the cache; once it equals the prompt length the
    row decodes, feeding `next_token` at `state.pos` each step. `first_logits` keeps the prompt's last logits
    while the row lives, for twins that copy this row instead of recomputing the same prompt."""

    def __init__(self, handle, state, key):
        self.handle, self.state, self.key = handle, state, key
        self.row = -1
        self.filled = 0
        self.next_token: int | None = None
        self.first_logits: torch.Tensor | None = None

    @property
    def rid(self) -> int:
        return self.handle.id

    @property
    def decoding(self) -> bool:
        return self.filled == len(self.state.prompt)

    @property
    def length(self) -> int:
        """Cache positions of this row that hold data."""
        return self.state.pos if self.decoding else self.filled

    def cached_tokens(self) -> list[int]:
        """The tokens whose keys and values this row holds, position by position: the prompt so far, then
        every sampled token that was fed back (the last sampled one never is)."""
        prompt = self.state.prompt
        if not self.decoding:
            return prompt[:self.filled]
        return prompt + self.state.out.token_ids[:self.state.pos - len(prompt)]


class RowTable:
    """The slots in row order (decoding first) and the cache they live in."""

    def __init__(self, cache, max_batch: int, max_len: int):
        self.cache = cache
        self.max_batch, self.max_len = max_batch, max_len
        self.min_rows, self.min_positions = cache.batch, cache.max_len
        self.slots: list[Slot] = []
        self.decoding = 0      # d: slots [0, d) decode

    def __len__(self) -> int:
        return len(self.slots)

    def add(self, slot: Slot) -> None:
        """Give `slot` the next free row (growing the cache's rows if needed)."""
        n = len(self.slots) + 1
        if n > self.max_batch:
            raise RuntimeError("no free row")  # the policy admits only while rows are free
        if n > self.cache.batch:
            self._rows(grow(self.cache.batch, n, self.max_batch))
        slot.row = len(self.slots)
        self.slots.append(slot)

    def promote(self, slot: Slot) -> None:
        """A prefilling slot's prompt is complete: it joins the end of the decoding block."""
        d = self.decoding
        if slot.row != d:
            self._swap(slot.row, d)
        self.decoding += 1

    def free(self, i: int) -> Slot:
        """Remove row i keeping the layout: the last decoding row fills a decoding hole, then the last
        prefilling row fills the decoding block's new end; a prefilling hole takes the last row."""
        gone = self.slots[i]
        last = len(self.slots) - 1
        if i < self.decoding:
            d_last = self.decoding - 1
            if i != d_last:
                self._move(d_last, i)
            if last != d_last:
                self._move(last, d_last)
            self.decoding -= 1
        elif i != last:
            self._move(last, i)
        self.slots.pop()
        return gone

    def clear(self) -> None:
        self.slots.clear()
        self.decoding = 0

    def reserve(self, positions: int) -> None:
        """Make rows hold at least `positions` positions: grow by doubling (amortized copies), or, with nothing
        running (positions == 0), shrink rows and positions back to their initial size to give memory back."""
        have = self.cache.max_len
        if positions == 0 and not self.slots:
            if self.cache.batch > self.min_rows:
                self._rows(self.min_rows)
            if have > self.min_positions:
                self.cache = self.cache.resized(self.min_positions)
        elif positions > have:
            self.cache = self.cache.resized(grow(have, positions, self.max_len))

    def _rows(self, n: int) -> None:
        """Resize to n rows: the first min(n, batch) rows are kept; new rows are copies of row 0, which is
        harmless since a row's stale positions are never read."""
        keep = torch.arange(min(n, self.cache.batch))
        if n > self.cache.batch:
            keep = torch.cat([keep, keep.new_zeros(n - self.cache.batch)])
        self.cache = self.cache.select(keep.to(self.cache.device))

    def _move(self, src: int, dst: int) -> None:
        slot = self.slots[src]
        self.cache.copy_row(src, dst, slot.length)
        slot.row = dst
        self.slots[dst] = slot

    def _swap(self, a: int, b: int) -> None:
        sa, sb = self.slots[a], self.slots[b]
        self.cache.swap_rows(a, b, sa.length, sb.length)
        sa.row, sb.row = b, a
        self.slots[a], self.slots[b] = sb, sa

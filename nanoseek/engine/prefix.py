"""The prefix cache: KV of earlier requests kept in fixed-size blocks, found again by a hash of their tokens.

Chat traffic repeats itself: the same system prompt on every request, the whole conversation so far on every
turn. Recomputing that prefix is most of a long prompt's time to first token; reading its keys and values back
costs a memory copy. So every block of `block_size` tokens a request has in its cache row is kept in a pool,
under a hash that chains the block's tokens with the hash of the block before it (so a block is found only
after the same tokens at the same positions — exactly when its keys and values are the same).

Layout. Scheduling keeps one contiguous cache row per running request (engine/scheduler.py): attention reads a
row as one dense tensor, which on a CPU is faster than gathering pages every step. The pool is the paged part:
`num_blocks` blocks, each holding `block_size` positions of every layer's cache, filled from rows and copied back
into rows. Because blocks are copied, never shared with a running row, no block is pinned: eviction (least
recently used first) is always possible, and freeing a row never has to wait for anyone.

Eviction order matters for chains: a block is reachable only through its parents, so when a chain is used its
blocks are touched leaf first, root last — the root ends up most recent and a chain is evicted from its tail.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch

from nanoseek.models.cache import Cache


def block_hashes(tokens: Sequence[int], block_size: int, salt: bytes = b"") -> list[bytes]:
    """Chained digests of the full blocks of `tokens`: h_i = H(h_{i-1} ‖ tokens of block i), with h_{-1} = salt.
    A 128-bit digest, not Python's hash(): a collision would silently hand one prompt another prompt's keys and
    values. The salt is a namespace: prompts under different salts never share a block, which is how the
    server keeps one API key's cached prompts invisible to another's guesses (timing included)."""
    out, prev = [], salt
    arr = np.asarray(tokens[:len(tokens) // block_size * block_size], dtype=np.int64)
    for i in range(0, len(arr), block_size):
        prev = hashlib.blake2b(prev + arr[i:i + block_size].tobytes(), digest_size=16).digest()
        out.append(prev)
    return out


class PrefixCache:
    """A pool of `num_blocks` KV blocks shaped like `cache`'s layers, indexed by chained block hashes.

    `match` finds how much of a prompt is cached, `load` copies those blocks into a row, `store` copies a row's
    full blocks into the pool. Single-threaded: the scheduler's loop is the only caller. Counters: tokens
    queried and hit (for metrics), blocks used."""

    def __init__(self, cache: Cache, num_blocks: int, block_size: int = 16):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("a prefix cache needs at least one block of at least one token")
        self.block_size, self.num_blocks = block_size, num_blocks
        # One pool tensor per cache tensor: [num_blocks, *that tensor's per-row shape with block_size positions].
        self._pools = [[torch.zeros((num_blocks, *view.shape), dtype=view.dtype, device=view.device)
                        for view in layer.span(0, 0, block_size)] for layer in cache.layers]
        self._pos_dims = [layer.span_pos_dim for layer in cache.layers]
        self._blocks: OrderedDict[bytes, int] = OrderedDict()  # hash → pool index, least recent first
        self._free = list(range(num_blocks - 1, -1, -1))
        self.queried_tokens = 0
        self.hit_tokens = 0

    @property
    def blocks_used(self) -> int:
        return len(self._blocks)

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for pools in self._pools for p in pools)

    def match(self, prompt: Sequence[int], salt: bytes = b"", *, again: bool = False) -> tuple[int, list[int]]:
        """(cached tokens, their pool blocks) for the longest cached prefix of `prompt` stored under `salt`,
        leaving at least the last prompt token to compute (its logits start generation). `again`: a second
        look for a prompt already queried (and missed), counted as a hit only."""
        hashes = block_hashes(prompt[:len(prompt) - 1], self.block_size, salt)
        blocks = []
        for h in hashes:
            b = self._blocks.get(h)
            if b is None:
                break
            blocks.append(b)
        for h in reversed(hashes[:len(blocks)]):
            self._blocks.move_to_end(h)
        n = len(blocks) * self.block_size
        self.queried_tokens += 0 if again else len(prompt)
        self.hit_tokens += n
        return n, blocks

    def load(self, cache: Cache, row: int, blocks: list[int]) -> None:
        """Copy `blocks` into positions [0, len(blocks) * block_size) of cache row `row`."""
        if not blocks:
            return
        n = len(blocks) * self.block_size
        idx = torch.tensor(blocks, device=self._pools[0][0].device)
        for layer, pools, pd in zip(cache.layers, self._pools, self._pos_dims):
            for view, pool in zip(layer.span(row, 0, n), pools):
                view.copy_(pool.index_select(0, idx).movedim(0, pd).flatten(pd, pd + 1))

    def store(self, cache: Cache, row: int, tokens: Sequence[int], salt: bytes = b"") -> int:
        """Keep the full blocks of `tokens` (whose keys and values are at positions [0, len(tokens)) of cache
        row `row`) that the pool lacks, under `salt`. Returns how many blocks were written."""
        hashes = block_hashes(tokens, self.block_size, salt)
        new = [i for i, h in enumerate(hashes) if h not in self._blocks]
        new = new[:self.num_blocks]  # a chain longer than the whole pool keeps its head
        slots, chain = [], set(hashes)
        for _ in new:
            if not self._free:
                self._evict(protect=chain)
            if not self._free:
                break
            slots.append(self._free.pop())
        new = new[:len(slots)]
        if new:
            bs = self.block_size
            for first, count, slot0 in _runs(new, slots):
                for layer, pools, pd in zip(cache.layers, self._pools, self._pos_dims):
                    for view, pool in zip(layer.span(row, first * bs, count * bs), pools):
                        pool[slot0:slot0 + count].copy_(view.unflatten(pd, (count, bs)).movedim(pd, 0))
            for i, slot in zip(new, slots):
                self._blocks[hashes[i]] = slot
        for h in reversed(hashes):
            if h in self._blocks:
                self._blocks.move_to_end(h)
        return len(new)

    def _evict(self, protect: set[bytes]) -> None:
        """Free the least recently used block that is not part of the chain being stored."""
        for h in self._blocks:
            if h not in protect:
                self._free.append(self._blocks.pop(h))
                return

    def clear(self) -> None:
        self._free.extend(self._blocks.values())
        self._blocks.clear()


def _runs(blocks: list[int], slots: list[int]):
    """Group (block index, pool slot) pairs into runs where both advance by one, so each run is one copy per
    cache tensor: (first block, length, first slot)."""
    i = 0
    while i < len(blocks):
        j = i + 1
        while j < len(blocks) and blocks[j] == blocks[j - 1] + 1 and slots[j] == slots[j - 1] + 1:
            j += 1
        yield blocks[i], j - i, slots[i]
        i = j

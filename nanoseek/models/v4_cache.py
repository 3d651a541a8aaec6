"""DeepSeek-V4's cache kinds (V4 report §2.3): what one attention layer keeps per row between forward passes.

- `WindowLayer`: the local window. The last `sliding_window` keys (= values: V4 has one shared K=V head) in a
  ring, position p in slot p % W, with the position each slot holds (-1: empty) so that reads check it.
- `CompressorState`: one compressor's output and its pending window. `entries` [B, N, D] holds compressed
  entry w (tokens [w·m, (w+1)·m), CSA also the window before) at index w; `pend_*` keep the projected
  tokens (kv and gate logits, position bias added) of the last R positions in a ring, R = m for HCA and 2m
  for CSA, whose overlapping windows also read the previous window. An entry is written when its window's
  last token arrives. CSA layers hold two: the attention's entries and the indexer's (the index keys).
- `CompressedLayer`: a window plus the compressor state(s) of a CSA / HCA layer.

None of this is a span of positions: the ring slots and the entries do not sit at a token's position, so
the row operations the engine uses (`rows`, `select`, `resized`, `copy_row`, `swap_rows`) move whole rows,
which `Cache` delegates to these kinds. Two consequences:
- `rewindable = False`: dropping a row's last positions would need tokens the ring already overwrote and
  entries' pending windows from before they closed (speculative decoding must not draft on these models).
- `prefix_cacheable = False`: prefix-cache blocks of 16 positions do not align with compression windows,
  and a window's state is not a function of a block's tokens alone; `span` refuses with that reason.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from nanoseek.errors import UnsupportedError


class _Rows:
    """Row operations over every tensor field (and nested state) of a batch-first dataclass."""

    rewindable: ClassVar[bool] = False
    prefix_cacheable: ClassVar[bool] = False
    span_pos_dim: ClassVar[int] = 0

    def _map(self, fn):
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = fn(v) if isinstance(v, torch.Tensor) else v._map(fn) if isinstance(v, _Rows) else v
        return dataclasses.replace(self, **out)

    def tensors(self) -> list[torch.Tensor]:
        out = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out += [v] if isinstance(v, torch.Tensor) else v.tensors() if isinstance(v, _Rows) else []
        return out

    @property
    def batch(self) -> int:
        return self.tensors()[0].shape[0]

    def rows(self, start: int, n: int):
        return self._map(lambda t: t[start:start + n])

    def select(self, keep: torch.Tensor):
        return self._map(lambda t: t.index_select(0, keep))

    def copy_row(self, src: int, dst: int, length: int = 0) -> None:
        for t in self.tensors():
            t[dst] = t[src]

    def swap_rows(self, a: int, b: int, len_a: int = 0, len_b: int = 0) -> None:
        for t in self.tensors():
            saved = t[a].clone()
            t[a] = t[b]
            t[b] = saved

    def span(self, row: int, start: int, n: int) -> list[torch.Tensor]:
        raise UnsupportedError("the prefix cache cannot hold DeepSeek-V4 caches: prefix blocks do not align "
                               "with compression windows (turn it off, e.g. serve --prefix-cache-tokens 0)")


@dataclass
class WindowLayer(_Rows):
    kv: torch.Tensor   # [B, W, D]
    pos: torch.Tensor  # [B, W] int64, -1 where empty

    @classmethod
    def empty(cls, batch: int, window: int, dim: int, dtype, device) -> WindowLayer:
        return cls(torch.zeros(batch, window, dim, dtype=dtype, device=device),
                   torch.full((batch, window), -1, dtype=torch.long, device=device))

    def resized(self, length: int) -> WindowLayer:
        return self  # the window does not grow with the context

    def write(self, pos: torch.Tensor, kv: torch.Tensor) -> None:
        """Store kv [B, T, D] of positions pos [B, T] (only the last W can survive)."""
        w = self.kv.shape[1]
        pos, kv = pos[:, -w:], kv[:, -w:]
        rows = torch.arange(pos.shape[0], device=pos.device)[:, None]
        self.kv[rows, pos % w] = kv
        self.pos[rows, pos % w] = pos


@dataclass
class CompressorState(_Rows):
    pend_kv: torch.Tensor    # [B, R, C] projected tokens of the last R positions, slot p % R
    pend_gate: torch.Tensor  # [B, R, C] their gate logits (position bias included)
    pend_pos: torch.Tensor   # [B, R] int64, -1 where empty
    entries: torch.Tensor    # [B, N, D] compressed entry w at index w
    rate: int

    @classmethod
    def empty(cls, batch: int, ring: int, width: int, dim: int, rate: int, max_len: int, dtype, device
              ) -> CompressorState:
        z = {"dtype": dtype, "device": device}
        return cls(torch.zeros(batch, ring, width, **z), torch.zeros(batch, ring, width, **z),
                   torch.full((batch, ring), -1, dtype=torch.long, device=device),
                   torch.zeros(batch, max_len // rate + 1, dim, **z), rate)

    def resized(self, length: int) -> CompressorState:
        n = length // self.rate + 1
        entries = self.entries.new_zeros(self.entries.shape[0], n, self.entries.shape[2])
        keep = min(n, self.entries.shape[1])
        entries[:, :keep] = self.entries[:, :keep]
        return dataclasses.replace(self, entries=entries)

    def write_pending(self, pos: torch.Tensor, kv: torch.Tensor, gate: torch.Tensor) -> None:
        r = self.pend_kv.shape[1]
        pos, kv, gate = pos[:, -r:], kv[:, -r:], gate[:, -r:]
        rows = torch.arange(pos.shape[0], device=pos.device)[:, None]
        self.pend_kv[rows, pos % r] = kv
        self.pend_gate[rows, pos % r] = gate
        self.pend_pos[rows, pos % r] = pos


@dataclass
class CompressedLayer(_Rows):
    window: WindowLayer
    comp: CompressorState
    index: CompressorState | None = None  # CSA's index keys

    def resized(self, length: int) -> CompressedLayer:
        return dataclasses.replace(self, comp=self.comp.resized(length),
                                   index=None if self.index is None else self.index.resized(length))

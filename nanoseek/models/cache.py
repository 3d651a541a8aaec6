"""What a forward pass reads and writes besides the weights: per-layer caches and token positions.

Owns the cache kinds (`KVLayer`: full K/V for GQA models; `LatentLayer`: MLA's compressed latent;
`IndexedLatentLayer`: that latent plus DSA's index keys), the
`Cache` that holds one per layer, and `Positions`, which says where a forward pass's tokens sit and which
cached keys each one reads. The models build and fill these; the engine (batching, prefix reuse) only
moves rows and spans around through the `CacheLayer` interface, so it never depends on what a kind stores.
These types live with the models, which must import nothing above them (engine, serve, train).

A cache holds `batch` rows of `max_len` positions. Row b holds one sequence; position p is the token at
absolute position p. Rows can be narrowed (`rows`) so one sequence prefills into its row of a batch cache
without copying. Stale entries past a row's length are never read: attention masks keys by position.

Adding a kind (a new attention's cache): a dataclass of tensors, batch first, that implements `CacheLayer`
plus its own `write`, created by that attention's `new_cache`. `Cache` and the engine then handle it.
A kind that stores one entry per position subclasses `PositionRows`, which moves rows by their `span`s;
a kind whose state is not a span of positions (DeepSeek-V4's windows and compressed entries, v4_cache.py)
moves whole rows itself and says `prefix_cacheable = False`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch


class CacheLayer(Protocol):
    """One layer's cache, whatever it stores. Every tensor field is batch-first ([B, …]), which is what
    `Cache.nbytes` and the row operations rely on."""

    span_pos_dim: int   # the positions dimension of each tensor `span` returns (one row, batch dim dropped)
    # Whether positions past a row's length may simply be abandoned and written again (speculative decoding
    # rolls back a rejected draft that way). True for per-position kinds; a kind whose state folds several
    # positions together (a compressed window) is not, and the engine does not draft on such models.
    rewindable: bool
    prefix_cacheable: bool  # whether engine/prefix.py may copy blocks of positions in and out (`span`)

    @property
    def batch(self) -> int: ...

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the kind stores (what `Cache.nbytes` and `Cache.device` read)."""

    def copy_row(self, src: int, dst: int, length: int) -> None:
        """Row dst := row src's live state (its first `length` positions for a per-position kind)."""

    def swap_rows(self, a: int, b: int, len_a: int, len_b: int) -> None:
        """Exchange rows a and b, of which only the first len_a / len_b positions are live."""

    def rows(self, start: int, n: int) -> CacheLayer:
        """Rows [start, start + n) as views (no copy)."""

    def span(self, row: int, start: int, n: int) -> list[torch.Tensor]:
        """Views of positions [start, start + n) of one row, one per stored tensor."""

    def select(self, keep: torch.Tensor) -> CacheLayer:
        """A copy holding only rows `keep`, in that order."""

    def resized(self, length: int) -> CacheLayer:
        """A copy with `length` positions per row, holding this one's first positions."""


class PositionRows:
    """The row moves of a kind that stores one entry per position (every tensor field a `span`): only a row's
    first `length` positions are live, so only those are copied."""

    rewindable = True
    prefix_cacheable: ClassVar[bool] = True

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in vars(self).values() if isinstance(t, torch.Tensor)]

    def copy_row(self, src: int, dst: int, length: int) -> None:
        for d, s in zip(self.span(dst, 0, length), self.span(src, 0, length)):
            d.copy_(s)

    def swap_rows(self, a: int, b: int, len_a: int, len_b: int) -> None:
        saved = [t.clone() for t in self.span(a, 0, len_a)]
        for d, s in zip(self.span(a, 0, len_b), self.span(b, 0, len_b)):
            d.copy_(s)
        for d, s in zip(self.span(b, 0, len_a), saved):
            d.copy_(s)


@dataclass
class KVLayer(PositionRows):
    """Keys and values [B, H_kv, L, D] for one attention layer."""

    k: torch.Tensor
    v: torch.Tensor

    @property
    def batch(self) -> int:
        return self.k.shape[0]

    def write(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [B, T, H, D] at positions pos [B, T]."""
        rows = torch.arange(pos.shape[0], device=pos.device)[:, None]
        self.k[rows, :, pos] = k
        self.v[rows, :, pos] = v

    def rows(self, start: int, n: int) -> KVLayer:
        return KVLayer(self.k[start:start + n], self.v[start:start + n])

    span_pos_dim = 1  # positions are dim 1 of a row's [H, L, D]

    def span(self, row: int, start: int, n: int) -> list[torch.Tensor]:
        """Views of positions [start, start + n) of one row: k and v [H, n, D]."""
        return [self.k[row, :, start:start + n], self.v[row, :, start:start + n]]

    def select(self, keep: torch.Tensor) -> KVLayer:
        return KVLayer(self.k.index_select(0, keep), self.v.index_select(0, keep))

    def resized(self, length: int) -> KVLayer:
        return KVLayer(_resized(self.k, 2, length), _resized(self.v, 2, length))


@dataclass
class LatentLayer(PositionRows):
    """MLA's cache (DeepSeek-V2 §2.1.2): per token, the normed latent c_KV followed by the shared rotated
    rope key, in one tensor [B, L, kv_lora + rope] — 576 numbers per token per layer for V3 instead of
    40,960 for full K/V. One tensor, so absorbed decode reads it as a single 576-wide MQA key."""

    kv: torch.Tensor
    kv_lora: int

    @property
    def batch(self) -> int:
        return self.kv.shape[0]

    def write(self, pos: torch.Tensor, latent_and_rope: torch.Tensor) -> None:
        rows = torch.arange(pos.shape[0], device=pos.device)[:, None]
        self.kv[rows, pos] = latent_and_rope

    def rows(self, start: int, n: int) -> LatentLayer:
        return LatentLayer(self.kv[start:start + n], self.kv_lora)

    span_pos_dim = 0

    def span(self, row: int, start: int, n: int) -> list[torch.Tensor]:
        return [self.kv[row, start:start + n]]

    def select(self, keep: torch.Tensor) -> LatentLayer:
        return LatentLayer(self.kv.index_select(0, keep), self.kv_lora)

    def resized(self, length: int) -> LatentLayer:
        return LatentLayer(_resized(self.kv, 1, length), self.kv_lora)


@dataclass
class IndexedLatentLayer(LatentLayer):
    """DeepSeek Sparse Attention's cache (V3.2 report §2.1): MLA's latent rows plus, per token, the lightning
    indexer's one key shared by all index heads, index_k [B, L, index_head_dim] (128 numbers a token in V3.2
    next to MLA's 576). Every new query scores all cached index keys to pick the latent rows it attends to."""

    index_k: torch.Tensor

    def write_index(self, pos: torch.Tensor, k: torch.Tensor) -> None:
        """Store index keys k [B, T, D] at positions pos [B, T]."""
        rows = torch.arange(pos.shape[0], device=pos.device)[:, None]
        self.index_k[rows, pos] = k

    def rows(self, start: int, n: int) -> IndexedLatentLayer:
        return IndexedLatentLayer(self.kv[start:start + n], self.kv_lora, self.index_k[start:start + n])

    def span(self, row: int, start: int, n: int) -> list[torch.Tensor]:
        return [self.kv[row, start:start + n], self.index_k[row, start:start + n]]

    def select(self, keep: torch.Tensor) -> IndexedLatentLayer:
        return IndexedLatentLayer(self.kv.index_select(0, keep), self.kv_lora, self.index_k.index_select(0, keep))

    def resized(self, length: int) -> IndexedLatentLayer:
        return IndexedLatentLayer(_resized(self.kv, 1, length), self.kv_lora, _resized(self.index_k, 1, length))


def _resized(t: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    """A zero tensor like `t` with `length` positions along `dim`, holding t's first positions."""
    shape = list(t.shape)
    shape[dim] = length
    out = t.new_zeros(shape)
    keep = min(length, t.shape[dim])
    out.narrow(dim, 0, keep).copy_(t.narrow(dim, 0, keep))
    return out


@dataclass
class Cache:
    """One `CacheLayer` per decoder layer (kinds may differ between layers), all with the same rows and
    `max_len` positions."""

    layers: list[CacheLayer]
    max_len: int

    @property
    def batch(self) -> int:
        return self.layers[0].batch

    @property
    def device(self) -> torch.device:
        return self.layers[0].tensors()[0].device

    @property
    def rewindable(self) -> bool:
        return all(layer.rewindable for layer in self.layers)

    def rows(self, start: int, n: int = 1) -> Cache:
        return Cache([layer.rows(start, n) for layer in self.layers], self.max_len)

    def select(self, keep: torch.Tensor) -> Cache:
        """A new cache holding only rows `keep`, in that order (compaction when requests finish)."""
        return Cache([layer.select(keep) for layer in self.layers], self.max_len)

    def resized(self, length: int) -> Cache:
        """A cache of `length` positions per row holding this one's first min(length, max_len) positions."""
        return Cache([layer.resized(length) for layer in self.layers], length)

    @property
    def prefix_cacheable(self) -> bool:
        """Whether the prefix cache (engine/prefix.py) can copy blocks of positions in and out of this cache."""
        return all(layer.prefix_cacheable for layer in self.layers)

    def copy_row(self, src: int, dst: int, length: int) -> None:
        """Row dst := the first `length` positions of row src (the rest of dst is stale, hence unread)."""
        for layer in self.layers:
            layer.copy_row(src, dst, length)

    def swap_rows(self, a: int, b: int, len_a: int, len_b: int) -> None:
        """Exchange rows a and b, of which only the first len_a / len_b positions are live."""
        for layer in self.layers:
            layer.swap_rows(a, b, len_a, len_b)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors())


@dataclass
class Positions:
    """Where a forward pass's tokens sit, computed once per forward and shared by every layer.

    pos [B, T] absolute positions; cos/sin [B, T, rope_dim/2] rotary tables for them; with a cache,
    `length` keys are read from it and `mask` [B, 1, T, length] says which (None when every query sees every
    key, i.e. single-row decode, or when it is plain causal over T == length, see `build`: attention then
    runs causal); without a cache, attention is causal over the T tokens given."""

    pos: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    cached: bool
    interleaved: bool = False  # rotary pair layout, see models/layers.apply_rotary
    length: int = 0
    mask: torch.Tensor | None = None

    @classmethod
    def build(cls, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cached: bool,
              interleaved: bool = False, length: int | None = None, window: bool = False) -> Positions:
        """`length` = max(pos) + 1 when the caller already knows it (saves a device sync per forward).

        `window=True`: `length` is a fixed read window at least max(pos) + 1 (a static-shape decode step,
        engine/graphs.py), so the mask is always built: keys past a row's position may hold stale data.
        Otherwise the mask is left out where every query sees every key (single-row decode) and where it is
        plain causal: one row whose T positions are 0..T-1 (a first prefill chunk; positions within a cached
        forward's row are consecutive, which every caller guarantees), so attention can take SDPA's causal
        path (FlashAttention on CUDA) instead of a materialized mask."""
        if not cached:
            return cls(pos, cos, sin, False, interleaved)
        length = int(pos.max()) + 1 if length is None else length
        b, t = pos.shape
        mask = None
        if window or (b > 1 or t > 1) and not (b == 1 and t == length):
            keys = torch.arange(length, device=pos.device)
            mask = (keys[None, None, :] <= pos[:, :, None]).unsqueeze(1)
        return cls(pos, cos, sin, True, interleaved, length, mask)


# DeepSeek-V4's kinds live in their own module; re-exported so every cache kind is importable from here.
from nanoseek.models.v4_cache import CompressedLayer, CompressorState, WindowLayer  # noqa: F401

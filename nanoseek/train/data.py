"""Token shards on disk and the loaders that turn them into training batches.

Owns the shard format ("nanoseek-tokens-v1"), both sides of it:
  * `ShardWriter` writes one split as `<split>-NNNNN.bin` (raw token ids) + `<split>-NNNNN.idx` (int64 start
    offsets of the documents that begin in that shard); `write_meta` writes `meta.json` last.
  * `TokenShards` memory-maps a split and checks every file against meta.json.
  * `PackedLoader`: packed fixed-length batches, shuffled per epoch, sharded over data-parallel ranks, with an
    exact-resume position; `iter_eval_batches` for held-out loss.

A split is one token stream: shards are consecutive cuts of it, so a document may continue from one shard
into the next (its start is listed in the shard where it begins). `prepare.py` fills the format from text.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nanoseek.errors import BadInputError, NotFoundError
from nanoseek.files import write_text_atomic

FORMAT = "nanoseek-tokens-v1"
META = "meta.json"
SPLITS = ("train", "val")
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


def token_dtype(vocab_size: int) -> str:
    """uint16 holds ids < 65536, half the disk and page cache of uint32."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.bin"


# ---------------------------------------------------------------------------------------------------------
# Writing


class ShardWriter:
    """Appends documents to one split, cutting the stream into shards of `shard_tokens` tokens.

    Each shard is written under a temporary name and renamed when complete, so a crash never leaves a
    file that looks finished. `close()` returns the split's entries for meta.json.
    """

    def __init__(self, out_dir: str | os.PathLike, split: str, dtype: str, shard_tokens: int):
        if shard_tokens < 1:
            raise BadInputError(f"shard size must be at least 1 token, got {shard_tokens}")
        self.dir, self.split, self.dtype, self.shard_tokens = Path(out_dir), split, np.dtype(dtype), shard_tokens
        self.entries: list[dict[str, Any]] = []
        self._file = None
        self._count = 0             # tokens in the open shard
        self._starts: list[int] = []

    def add(self, doc: np.ndarray) -> None:
        """One document's tokens (bos/eos already in place)."""
        doc = np.asarray(doc, dtype=self.dtype)
        first = True
        while len(doc) or first:
            if self._file is None:
                self._open()
            if first:
                self._starts.append(self._count)
                first = False
            take = min(len(doc), self.shard_tokens - self._count)
            self._file.write(doc[:take].tobytes())
            self._count += take
            doc = doc[take:]
            if self._count == self.shard_tokens:
                self._finish()

    def close(self) -> list[dict[str, Any]]:
        if self._file is not None:
            self._finish()
        return self.entries

    def _tmp(self, name: str) -> Path:
        return self.dir / f".{name}.tmp"

    def _open(self) -> None:
        self._name = shard_name(self.split, len(self.entries))
        self._file = open(self._tmp(self._name), "wb")
        self._count, self._starts = 0, []

    def _finish(self) -> None:
        self._file.close()
        self._file = None
        idx = self._name[:-4] + ".idx"
        np.asarray(self._starts, dtype=np.int64).tofile(self._tmp(idx))
        os.replace(self._tmp(idx), self.dir / idx)
        os.replace(self._tmp(self._name), self.dir / self._name)
        self.entries.append({"file": self._name, "tokens": self._count, "docs": len(self._starts)})


def write_meta(out_dir: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """meta.json, atomically; it is written last, so its presence means every shard it lists is complete."""
    out = write_text_atomic(Path(out_dir) / META, json.dumps({"format": FORMAT, **meta}, indent=1) + "\n")
    return out


# ---------------------------------------------------------------------------------------------------------
# Reading


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """meta.json of a prepared directory, with its fields checked (errors name the file and the field)."""
    file = Path(path) / META
    if not file.is_file():
        raise NotFoundError(f"{file}: no such file (prepare token shards with `nanoseek data prepare`)")
    try:
        meta = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInputError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise BadInputError(f"{file}: 'format' is {got!r}, expected {FORMAT!r}")

    def need(ok: bool, field: str, what: str) -> None:
        if not ok:
            raise BadInputError(f"{file}: {field!r} must be {what}")

    vocab = meta.get("vocab_size")
    need(isinstance(vocab, int) and vocab > 0, "vocab_size", "a positive integer")
    need(meta.get("dtype") in DTYPES, "dtype", f"one of {', '.join(DTYPES)}")
    need(np.iinfo(DTYPES[meta["dtype"]]).max >= vocab - 1, "dtype", f"wide enough for vocab_size {vocab}")
    for key in ("bos_id", "eos_id"):
        v = meta.get(key)
        need(v is None or (isinstance(v, int) and 0 <= v < vocab), key, f"null or an id below vocab_size {vocab}")
    splits = meta.get("splits")
    need(isinstance(splits, dict), "splits", "an object mapping split names to shard lists")
    for name, entries in splits.items():
        need(isinstance(entries, list), f"splits.{name}", "a list")
        for i, e in enumerate(entries):
            ok = (isinstance(e, dict) and isinstance(e.get("file"), str) and "/" not in e["file"]
                  and all(isinstance(e.get(k), int) and e[k] >= 0 for k in ("tokens", "docs")))
            need(ok, f"splits.{name}[{i}]", "{file: name, tokens: int >= 0, docs: int >= 0}")
    return meta


class TokenShards:
    """One split of a prepared directory as a single token stream, memory-mapped shard by shard.

    Every .bin/.idx size is checked against meta.json up front, so a truncated copy fails here, naming the
    file, not as a short read in the middle of training.
    """

    def __init__(self, path: str | os.PathLike, split: str = "train"):
        self.path, self.split = Path(path), split
        meta = self.meta = read_meta(self.path)
        if split not in meta["splits"]:
            raise NotFoundError(f"{self.path / META}: no split {split!r} (has {', '.join(meta['splits'])})")
        self.vocab_size: int = meta["vocab_size"]
        self.bos_id: int | None = meta.get("bos_id")
        self.eos_id: int | None = meta.get("eos_id")
        self.dtype = np.dtype(DTYPES[meta["dtype"]])
        self._arrays: list[np.ndarray] = []
        self._idx_files: list[Path] = []
        for e in meta["splits"][split]:
            self._arrays.append(self._map(e))
        lengths = [len(a) for a in self._arrays]
        self._offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
        self.num_tokens: int = int(self._offsets[-1])
        self.num_docs: int = sum(e["docs"] for e in meta["splits"][split])
        self._doc_starts: np.ndarray | None = None

    def _map(self, entry: dict[str, Any]) -> np.ndarray:
        bin_file = self.path / entry["file"]
        idx_file = bin_file.with_suffix(".idx")
        for f, size in ((bin_file, entry["tokens"] * self.dtype.itemsize), (idx_file, entry["docs"] * 8)):
            if not f.is_file():
                raise NotFoundError(f"{f}: listed in {self.path / META} but missing")
            actual = f.stat().st_size
            if actual != size:
                raise BadInputError(f"{f}: {actual} bytes, meta.json says {size} "
                                    f"({'tokens' if f is bin_file else 'docs'} = "
                                    f"{entry['tokens' if f is bin_file else 'docs']}): truncated or corrupt")
        self._idx_files.append(idx_file)
        if entry["tokens"] == 0:   # mmap cannot map an empty file
            return np.zeros(0, self.dtype)
        return np.memmap(bin_file, dtype=self.dtype, mode="r")

    def __len__(self) -> int:
        return self.num_tokens

    def read(self, start: int, end: int) -> np.ndarray:
        """Tokens [start, end) of the split's stream (a view when they lie in one shard)."""
        if not 0 <= start <= end <= self.num_tokens:
            raise IndexError(f"tokens [{start}, {end}) outside the {self.split} split's {self.num_tokens}")
        if start == end:
            return np.zeros(0, self.dtype)
        i = int(np.searchsorted(self._offsets, start, side="right")) - 1
        base = int(self._offsets[i])
        if end <= self._offsets[i + 1]:
            return self._arrays[i][start - base:end - base]
        parts = []
        while start < end:
            base = int(self._offsets[i])
            take = min(end, base + len(self._arrays[i]))
            parts.append(self._arrays[i][start - base:take - base])
            start, i = take, i + 1
        return np.concatenate(parts)

    @property
    def doc_starts(self) -> np.ndarray:
        """int64 offsets, in the split's stream, where each document begins (for SFT masking, per-doc eval)."""
        if self._doc_starts is None:
            parts = [np.fromfile(f, dtype=np.int64) + int(base) for f, base in zip(self._idx_files, self._offsets)]
            self._doc_starts = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        return self._doc_starts


# ---------------------------------------------------------------------------------------------------------
# Batches


def _to_device(rows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.from_numpy(rows.astype(np.int64))
    if device.type == "cuda":
        t = t.pin_memory().to(device, non_blocking=True)
    elif device.type != "cpu":
        t = t.to(device)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


def _windows(shards: TokenShards, seq_len: int) -> int:
    if seq_len < 1:
        raise BadInputError(f"seq_len must be at least 1, got {seq_len}")
    return max(shards.num_tokens - 1, 0) // seq_len


def _check_rank(batch_size: int, rank: int, world_size: int) -> None:
    if batch_size < 1:
        raise BadInputError(f"batch size must be at least 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise BadInputError(f"rank {rank} is outside world size {world_size}")


class PackedLoader:
    """Packed fixed-length batches from a split's token stream.

    The stream is cut into windows of seq_len+1 tokens with stride seq_len: window k covers tokens
    [k·seq_len, (k+1)·seq_len + 1), so consecutive windows share one boundary token and every token after
    the first is a target exactly once per epoch. Documents are packed across window edges, separated only
    by their eos/bos tokens (as in GPT-style pretraining); attention is not masked at document boundaries.

    Each epoch visits the windows in an order shuffled by (seed, epoch) (shuffle=False keeps stream order),
    and the windows that do not fill a whole global batch are skipped for that epoch. Global batch g is
    windows [g·B·W, (g+1)·B·W) of that order; rank r takes its B windows [r·B, (r+1)·B) of it, so W ranks of
    batch B see exactly what one process with batch W·B sees, in the same order. The position is counted in
    global batches, so a checkpoint resumes under any (batch, world size) with the same global batch.
    """

    def __init__(self, shards: TokenShards, seq_len: int, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True, device: str | torch.device = "cpu"):
        _check_rank(batch_size, rank, world_size)
        self.shards, self.seq_len, self.batch_size = shards, seq_len, batch_size
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.device = torch.device(device)
        self.num_windows = _windows(shards, seq_len)
        self.global_batch = batch_size * world_size
        self.steps_per_epoch = self.num_windows // self.global_batch
        if self.steps_per_epoch == 0:
            raise BadInputError(
                f"{shards.path} ({shards.split}): {shards.num_tokens} tokens make {self.num_windows} windows of "
                f"{seq_len + 1}, fewer than one global batch of {self.global_batch} "
                f"(batch {batch_size} x {world_size} ranks); use more data or a smaller batch/seq_len")
        self.epoch = 0
        self.step = 0   # global batches already taken in this epoch
        self._order: tuple[int, np.ndarray] | None = None

    def _epoch_order(self) -> np.ndarray:
        if self._order is None or self._order[0] != self.epoch:
            order = (np.random.default_rng([self.seed, self.epoch]).permutation(self.num_windows) if self.shuffle
                     else np.arange(self.num_windows))
            self._order = (self.epoch, order)
        return self._order[1]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), int64 [batch_size, seq_len] each, y[:, t] = x[:, t + 1] within the window."""
        if self.step >= self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        first = self.step * self.global_batch + self.rank * self.batch_size
        windows = self._epoch_order()[first:first + self.batch_size]
        L = self.seq_len
        rows = np.stack([self.shards.read(int(w) * L, int(w) * L + L + 1) for w in windows])
        self.step += 1
        return _to_device(rows, self.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """Position plus what it depends on; rank-independent (all ranks hold the same)."""
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "shuffle": self.shuffle,
                "seq_len": self.seq_len, "global_batch": self.global_batch, "num_tokens": self.shards.num_tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        wrong = [f"{k} {state.get(k)!r} (now {mine[k]!r})" for k in
                 ("seed", "shuffle", "seq_len", "global_batch", "num_tokens") if k in state and state[k] != mine[k]]
        if wrong:
            raise BadInputError(f"data loader state does not fit this run: saved with {', '.join(wrong)}")
        epoch, step = state.get("epoch"), state.get("step")
        if not (isinstance(epoch, int) and isinstance(step, int) and epoch >= 0 and 0 <= step <= self.steps_per_epoch):
            raise BadInputError(f"data loader state: bad position epoch={epoch!r} step={step!r}")
        self.epoch, self.step = epoch, step


def iter_eval_batches(shards: TokenShards, seq_len: int, batch_size: int, max_batches: int | None = None,
                      rank: int = 0, world_size: int = 1, *, device: str | torch.device = "cpu"
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Held-out batches in stream order, the same every call: global batch g is windows [g·B·W, (g+1)·B·W)
    (the windows PackedLoader(shuffle=False) would give), rank r its B of them, at most max_batches of them.

    Every rank yields the same number of batches of the same shape (collectives stay in step). A split too
    small for one global batch gives one batch of n_windows // W rows per rank instead.
    """
    _check_rank(batch_size, rank, world_size)
    n = _windows(shards, seq_len)
    if n < world_size:
        raise BadInputError(f"{shards.path} ({shards.split}): {shards.num_tokens} tokens make {n} windows of "
                            f"{seq_len + 1}, fewer than the {world_size} ranks; use a larger val split")
    rows = batch_size if n >= batch_size * world_size else n // world_size
    count = n // (rows * world_size)
    if max_batches is not None:
        count = min(count, max_batches)
    dev = torch.device(device)
    for g in range(count):
        first = (g * world_size + rank) * rows
        batch = np.stack([shards.read(w * seq_len, w * seq_len + seq_len + 1) for w in range(first, first + rows)])
        yield _to_device(batch, dev)

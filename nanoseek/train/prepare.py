"""`nanoseek data prepare`: documents from text, JSONL, Parquet or Hugging Face datasets → token shards
(the format in data.py).

Documents are read in input order and tokenized in batches — in worker processes when workers > 1, with
results taken back in submission order, so the shards are byte-identical for any worker count. Each document
becomes [bos] + tokens + [eos] (bos only for tokenizers that prepend one themselves).

Validation documents are whole documents picked by position: document i goes to val when
floor((i+1)·f) > floor(i·f), i.e. evenly spaced, floor(N·f) of N. When that picks none (fewer than 1/f
documents, e.g. one big text file), the last f of the tokens — cut from the end of the last document —
become val, so concatenating train and val still reproduces that document exactly.

FIM (DeepSeek-V3's fill-in-the-middle objective, nanoseek/fim.py): with a tokenizer that has FIM tokens,
`fim_rate` of the documents (default 0.1) are rewritten as prefix-suffix-middle text before tokenizing.
It happens here, on text, rather than on token ids in the loader, because: the cut points fall between
characters (a token-level cut could never split inside a token, and would leave the pieces tokenized as
they were in context, not as the model sees them when serving FIM); the shards stay a plain token stream,
so the loader's packing, shuffling and exact-resume position are untouched; and the choice of documents
and cuts depends only on (fim_seed, document index), so shards are identical for any worker count and a
rerun. The price is that changing the rate means preparing again; meta.json records it.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import multiprocessing as mp
import os
import re
import tempfile
import time
from collections import deque
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from nanoseek.errors import BadInputError, NotFoundError, UnsupportedError
from nanoseek.fim import DEFAULT_FIM_RATE, detect, maybe_fim
from nanoseek.train.data import META, ShardWriter, token_dtype, write_meta
from nanoseek.train.tokenizer import bos_to_prepend, encode_documents, load_tokenizer, worker_init

DOC_SPLITS = ("none", "blank-lines")
_KINDS = {".txt": "txt", ".jsonl": "jsonl", ".parquet": "parquet"}
_BLANK_LINES = re.compile(r"\n(?:[ \t\r]*\n)+")
_SHARD_FILE = re.compile(r"^\.?(train|val)-\d{5}\.(bin|idx)(\.tmp)?$")
# A task for a worker: this many characters or documents, whichever comes first. Big enough to amortize
# the inter-process copy, small enough to keep every worker busy and memory bounded.
BATCH_CHARS, BATCH_DOCS = 1 << 20, 1024


# ---------------------------------------------------------------------------------------------------------
# Reading documents


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    gz = name.endswith(".gz")
    kind = _KINDS.get(Path(name[:-3] if gz else name).suffix)
    return None if gz and kind == "parquet" else kind


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[str]:
    """Input specs → the list of sources to read: files as given, directories as their .txt/.jsonl/.parquet
    files (recursively, sorted), `hf:` specs unchanged. Fails before any work on a missing or unknown input."""
    out: list[str] = []
    for spec in inputs:
        spec = str(spec)
        if spec.startswith("hf:"):
            out.append(spec)
            continue
        path = Path(spec).expanduser()
        if path.is_dir():
            files = sorted(str(f) for f in path.rglob("*") if f.is_file() and _kind(f))
            if not files:
                raise NotFoundError(f"{path}: no .txt, .jsonl or .parquet files inside")
            out += files
        elif path.is_file():
            if not _kind(path):
                raise UnsupportedError(f"{path}: unknown input type (expected .txt or .jsonl, optionally .gz, "
                                       f".parquet, a directory of them, or hf:NAME[:CONFIG][:SPLIT])")
            out.append(str(path))
        else:
            raise NotFoundError(f"{spec}: no such file or directory")
    if not out:
        raise BadInputError("no inputs given")
    return out


def _open_text(path: Path) -> io.TextIOBase:
    raw = gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8")


def _read_txt(path: Path) -> Iterator[str]:
    with _open_text(path) as f:
        try:
            yield f.read()
        except UnicodeDecodeError as e:
            raise BadInputError(f"{path}: not UTF-8 text ({e})") from None


def _read_jsonl(path: Path, field: str) -> Iterator[str]:
    with _open_text(path) as f:
        lineno = 0
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise BadInputError(f"{path}:{lineno}: not valid JSON ({e})") from None
                text = row.get(field) if isinstance(row, dict) else None
                if not isinstance(text, str):
                    keys = ", ".join(map(str, row)) if isinstance(row, dict) else type(row).__name__
                    raise BadInputError(f"{path}:{lineno}: no string field {field!r} (has: {keys}); "
                                        f"choose one with --text-field")
                yield text
        except UnicodeDecodeError as e:
            raise BadInputError(f"{path}:{lineno + 1}: not UTF-8 text ({e})") from None


def _read_parquet(path: Path, field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UnsupportedError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow==26.0.1)") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for files that are not Parquet
        raise BadInputError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    names = pf.schema_arrow.names
    if field not in names:
        raise BadInputError(f"{path}: no column {field!r} (has: {', '.join(names)}); choose one with --text-field")
    for batch in pf.iter_batches(columns=[field], batch_size=BATCH_DOCS):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield str(text)


def _read_hf(spec: str, field: str) -> Iterator[str]:
    name, config, split = (spec[3:].split(":") + [None, None])[:3]
    try:
        import datasets
    except ImportError:
        raise UnsupportedError(f"{spec}: Hugging Face datasets need the datasets package "
                               f"(pip install datasets==5.2.0)") from None
    try:  # streaming: nothing is downloaded beyond what is read
        ds = datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
        for i, row in enumerate(ds):
            text = row.get(field)
            if not isinstance(text, str):
                raise BadInputError(f"{spec}: row {i} has no string field {field!r} (has: {', '.join(row)}); "
                                    f"choose one with --text-field")
            yield text
    except BadInputError:
        raise
    except Exception as e:  # offline, unknown name, bad config: datasets raises many kinds
        raise NotFoundError(f"{spec}: cannot load the dataset ({type(e).__name__}: {e})") from None


def iter_documents(inputs: Sequence[str | os.PathLike], text_field: str = "text",
                   doc_split: str = "none") -> Iterator[str]:
    """Every document of every input, in order. A .txt file is one document; a .jsonl/.parquet row or an hf
    row is one. doc_split="blank-lines" further splits each of them into paragraphs. Blank documents are
    skipped."""
    if doc_split not in DOC_SPLITS:
        raise BadInputError(f"--doc-split {doc_split!r}: expected one of {', '.join(DOC_SPLITS)}")
    for src in expand_inputs(inputs):
        if src.startswith("hf:"):
            texts = _read_hf(src, text_field)
        else:
            path = Path(src).expanduser()
            kind = _kind(path)
            texts = (_read_txt(path) if kind == "txt" else _read_jsonl(path, text_field) if kind == "jsonl"
                     else _read_parquet(path, text_field))
        for text in texts:
            for doc in (_BLANK_LINES.split(text) if doc_split == "blank-lines" else (text,)):
                if doc.strip():
                    yield doc


# ---------------------------------------------------------------------------------------------------------
# Tokenizing


def _batches(docs: Iterator[str]) -> Iterator[list[str]]:
    batch, chars = [], 0
    for d in docs:
        batch.append(d)
        chars += len(d)
        if chars >= BATCH_CHARS or len(batch) >= BATCH_DOCS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _encoded(docs: Iterator[str], encode, workers: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Encoded batches in input order. At most 2 batches per worker are in flight, so memory stays bounded
    however large the input (Pool.imap would read the whole input ahead)."""
    if workers <= 1:
        yield from map(encode, _batches(docs))
        return
    # spawn: a fresh interpreter per worker, safe whatever threads this process runs (fork is not). What the
    # workers unpickle (encode_documents, worker_init) lives in tokenizer.py, which does not import torch.
    with mp.get_context("spawn").Pool(workers, initializer=worker_init) as pool:
        pending: deque = deque()
        for batch in _batches(docs):
            pending.append(pool.apply_async(encode, (batch,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class _Splitter:
    """Routes documents to train/val by position (see the module docstring). The last train document is held
    back until the next arrives, so that it can still be cut if no whole document went to val."""

    def __init__(self, fraction: float, train: ShardWriter, val: ShardWriter):
        self.fraction, self.train, self.val = fraction, train, val
        self.index = 0
        self.val_docs = 0
        self.train_tokens = 0
        self.held: np.ndarray | None = None

    def add(self, doc: np.ndarray) -> None:
        i, f = self.index, self.fraction
        self.index += 1
        if math.floor((i + 1) * f) > math.floor(i * f):
            self.val.add(doc)
            self.val_docs += 1
            return
        if self.held is not None:
            self.train.add(self.held)
        self.held = doc
        self.train_tokens += len(doc)

    def finish(self) -> None:
        doc, self.held = self.held, None
        if doc is None:
            return
        n_val = min(len(doc) - 1, round(self.fraction * self.train_tokens))
        if self.val_docs == 0 and n_val >= 1:
            self.train.add(doc[:-n_val])
            self.val.add(doc[-n_val:])
        else:
            self.train.add(doc)


def prepare(inputs: Sequence[str | os.PathLike], tokenizer: str, out_dir: str | os.PathLike, *,
            val_fraction: float = 0.005, text_field: str = "text", workers: int | None = None,
            shard_tokens: int = 100_000_000, doc_split: str = "none", fim_rate: float = DEFAULT_FIM_RATE,
            fim_seed: int = 0) -> dict[str, Any]:
    """Tokenize `inputs` into token shards in `out_dir`; returns the meta.json contents (plus timing).
    fim_rate: share of documents rewritten in FIM form (only for tokenizers with FIM tokens)."""
    from nanoseek.progress import progress_bar

    if not 0 <= val_fraction < 1:
        raise BadInputError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise BadInputError(f"--shard-tokens must be at least 1, got {shard_tokens}")
    if not 0 <= fim_rate <= 1:
        raise BadInputError(f"--fim-rate must be in [0, 1], got {fim_rate}")
    if doc_split not in DOC_SPLITS:
        raise BadInputError(f"--doc-split {doc_split!r}: expected one of {', '.join(DOC_SPLITS)}")
    sources = expand_inputs(inputs)   # fail on a bad path before loading anything
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise BadInputError(f"--workers must be at least 1, got {workers}")
    tok = load_tokenizer(tokenizer)
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise UnsupportedError(f"{tokenizer}: needs a fast (tokenizers-based) tokenizer")
    vocab_size = len(tok)
    dtype = token_dtype(vocab_size)
    bos_id, eos_id = bos_to_prepend(tok), tok.eos_token_id
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # No meta.json while shards change: a crash leaves a directory that refuses to load, not a mixed one.
    (out / META).unlink(missing_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nanoseek-tok-") as tmp:
        tok_file = str(Path(tmp) / "tokenizer.json")
        backend.save(tok_file)
        encode = partial(encode_documents, tok_file, bos_id=bos_id, eos_id=eos_id, vocab_size=vocab_size)
        train, val = (ShardWriter(out, s, dtype, shard_tokens) for s in ("train", "val"))
        splitter = _Splitter(val_fraction, train, val)
        fim = detect(tok)
        docs = (maybe_fim(fim, d, i, fim_rate, fim_seed)
                for i, d in enumerate(iter_documents(sources, text_field, doc_split)))
        with progress_bar("tokenizing (documents)", None) as advance:
            for flat, lengths in _encoded(docs, encode, workers):
                for doc in np.split(flat, np.cumsum(lengths)[:-1]):
                    splitter.add(doc)
                advance(len(lengths))
        splitter.finish()
    if splitter.index == 0:
        raise BadInputError(f"{', '.join(map(str, inputs))}: no documents (every input is empty or blank)")
    # A path is stored absolute so training and export find the tokenizer from any working directory.
    tok_name = str(Path(tokenizer).expanduser().resolve()) if Path(tokenizer).expanduser().exists() else str(tokenizer)
    meta = {"dtype": dtype, "vocab_size": vocab_size, "tokenizer": tok_name, "bos_id": bos_id,
            "eos_id": eos_id, "splits": {"train": train.close(), "val": val.close()},
            "inputs": [str(s) for s in inputs], "val_fraction": val_fraction,
            "fim": {"rate": fim_rate if fim is not None else 0.0, "seed": fim_seed,
                    "tokens": fim.name if fim is not None else None}}
    write_meta(out, meta)
    keep = {e["file"][:-4] + ext for entries in meta["splits"].values() for e in entries for ext in (".bin", ".idx")}
    for f in out.iterdir():   # shards of an earlier, larger run in the same directory
        if _SHARD_FILE.match(f.name) and f.name not in keep:
            f.unlink()
    return {**meta, "seconds": time.perf_counter() - t0}

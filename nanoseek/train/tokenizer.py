"""Tokenizers for training.

Owns:
  * `load_tokenizer`: a built-in model name, a .gguf file, a tokenizer directory or a Hub name → tokenizer.
  * `train_tokenizer` (`nanoseek tokenizer train`): byte-level BPE with DeepSeek's special tokens and an
    R1-style chat template, saved so `AutoTokenizer.from_pretrained(dir)` loads it.
  * `encode_documents`: the per-batch work `nanoseek data prepare` hands to worker processes. This module
    imports neither torch nor transformers at the top so those workers start in a fraction of a second.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from nanoseek.errors import BadInputError, NotFoundError, UnsupportedError

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"   # also the pad token, as in DeepSeek's tokenizer_config
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
FIM_BEGIN, FIM_HOLE, FIM_END = "<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"
SPECIAL_TOKENS = (BOS, EOS, USER, ASSISTANT, THINK_OPEN, THINK_CLOSE, FIM_BEGIN, FIM_HOLE, FIM_END)
# Only bos/eos are "special" in the decode-skipping sense. The others must survive
# decode(skip_special_tokens=True): the server's reasoning split reads <think>…</think> from decoded text, and
# DeepSeek's own tokenizer marks them special=false too.
DECODE_SKIPPED = (BOS, EOS)

# DeepSeek-R1 style: bos, system text, then <｜User｜>msg and <｜Assistant｜>reply<｜end▁of▁sentence｜> turns.
# Assistant history keeps only the text after </think> (R1 drops reasoning from context). The generation
# prompt is <｜Assistant｜>, followed by "<think>\n" when the caller asks for thinking (`thinking` or
# `enable_thinking`, the switches nanoseek.chat.render_prompt passes).
CHAT_TEMPLATE = (
    r"""{{- bos_token -}}"""
    r"""{%- for m in messages if m['role'] == 'system' -%}"""
    r"""{{- m['content'] if loop.last else m['content'] + '\n\n' -}}"""
    r"""{%- endfor -%}"""
    r"""{%- for m in messages -%}"""
    r"""{%- if m['role'] == 'user' -%}"""
    r"""{{- '<｜User｜>' + m['content'] -}}"""
    r"""{%- elif m['role'] == 'assistant' -%}"""
    r"""{%- set content = m['content'] or '' -%}"""
    r"""{%- if '</think>' in content -%}{%- set content = content.split('</think>')[-1].lstrip() -%}{%- endif -%}"""
    r"""{{- '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' -}}"""
    r"""{%- elif m['role'] != 'system' -%}"""
    r"""{{- raise_exception('unsupported role: ' + m['role']) -}}"""
    r"""{%- endif -%}"""
    r"""{%- endfor -%}"""
    r"""{%- if add_generation_prompt -%}"""
    r"""{{- '<｜Assistant｜>' -}}"""
    r"""{%- if (thinking is defined and thinking) or (enable_thinking is defined and enable_thinking) -%}"""
    r"""{{- '<think>\n' -}}"""
    r"""{%- endif -%}"""
    r"""{%- endif -%}"""
)

# Text is split with Llama 3's regex: numbers into runs of at most three digits (arithmetic-friendly, and it
# keeps thousands of number tokens out of the vocabulary), words with a leading space or punctuation mark,
# punctuation runs, whitespace. It is llama.cpp's `llama-bpe` pre-tokenizer, so a GGUF export splits text
# exactly as training did. (Earlier versions split digits 1-3 and then applied GPT-2's regex, a combination
# llama.cpp has no pre-type for; tokenizers trained that way still load, but `export --format gguf` refuses
# them rather than write a file that tokenizes differently.)
PRE_TOKENIZER = "llama-bpe"

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


# ---------------------------------------------------------------------------------------------------------
# Loading


def load_tokenizer(spec: str | os.PathLike):
    """A transformers tokenizer for a built-in model name (its GGUF's vocabulary), a .gguf file, a directory
    with tokenizer files (e.g. from `nanoseek tokenizer train`), or a Hub name transformers can load."""
    from nanoseek.weights.registry import BUILTINS

    if isinstance(spec, str) and spec in BUILTINS:
        return _gguf(BUILTINS[spec].path())
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return _gguf(path)
        if path.name in _TOKENIZER_FILES:
            return _auto(path.parent)
        raise UnsupportedError(f"{path}: not a .gguf file or tokenizer directory")
    if path.is_dir():
        if any((path / f).exists() for f in _TOKENIZER_FILES):
            return _auto(path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _gguf(ggufs[0])
        raise NotFoundError(f"{path}: no tokenizer files ({', '.join(_TOKENIZER_FILES)}) or single .gguf file")
    not_found = NotFoundError(f"{spec}: not a built-in model ({', '.join(BUILTINS)}), a .gguf file, a tokenizer "
                              f"directory, or a Hugging Face repo name (org/name) that can be loaded here")
    if str(spec).count("/") != 1:   # only "org/name" can be a Hub repo; don't wait on the network for typos
        raise not_found
    try:
        return _auto(str(spec))
    except BadInputError:
        raise not_found from None


def _gguf(path: Path):
    from nanoseek.weights.gguf import gguf_tokenizer

    return gguf_tokenizer(path)


def _auto(where: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(where))
    except Exception as e:  # transformers raises OSError, ValueError, JSON errors... for bad or missing files
        raise BadInputError(f"{where}: cannot load the tokenizer ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------------------------------------------
# Encoding documents (runs in `data prepare`'s worker processes)


def worker_init() -> None:
    # Worker processes are the parallelism; tokenizers' own thread pool in each would oversubscribe cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


@functools.lru_cache(maxsize=2)
def _backend(tokenizer_file: str):
    """Each worker parses the tokenizer file once, not once per batch."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(tokenizer_file)


def encode_documents(tokenizer_file: str, texts: Sequence[str], bos_id: int | None, eos_id: int | None,
                     vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(token ids of all documents concatenated as uint32, each document's length), each document being
    [bos] + tokens + [eos] (bos/eos only where not None). `tokenizer_file` is a tokenizers JSON file."""
    encodings = _backend(tokenizer_file).encode_batch(list(texts), add_special_tokens=False)
    head, tail = [bos_id] if bos_id is not None else [], [eos_id] if eos_id is not None else []
    ids: list[int] = []
    lengths = np.empty(len(encodings), dtype=np.int64)
    for i, e in enumerate(encodings):
        doc = head + e.ids + tail
        ids.extend(doc)
        lengths[i] = len(doc)
    flat = np.asarray(ids, dtype=np.uint32)
    if len(flat) and int(flat.max()) >= vocab_size:
        raise BadInputError(f"{tokenizer_file}: produced token id {int(flat.max())} >= vocab size {vocab_size}")
    return flat, lengths


def bos_to_prepend(tokenizer) -> int | None:
    """The tokenizer's bos id if it starts its encodings with it (DeepSeek, Llama); None for tokenizers that
    have a bos token but do not use it for plain text (SmolLM2's is <|im_start|>, a chat-turn marker)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer.encode("a", add_special_tokens=True)
    return bos if ids and ids[0] == bos else None


# ---------------------------------------------------------------------------------------------------------
# Training


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike, *, min_frequency: int = 2):
    """Train a byte-level BPE of `vocab_size` ids (special tokens included) on `texts` and save it to
    `out_dir` as a PreTrainedTokenizerFast directory. Returns the tokenizer as AutoTokenizer loads it back."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from nanoseek.weights.gguf import pre_tokenizer_for

    floor = 256 + len(SPECIAL_TOKENS)
    if vocab_size < floor:
        raise BadInputError(f"--vocab-size {vocab_size}: byte-level BPE needs at least {floor} "
                            f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    if min_frequency < 1:
        raise BadInputError(f"--min-frequency must be at least 1, got {min_frequency}")
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizer_for(PRE_TOKENIZER)
    tk.decoder = decoders.ByteLevel()
    # Special tokens come first (ids 0..8: bos 0, eos 1, as in DeepSeek's vocabulary) and are never merged.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=sys.stderr.isatty())
    tk.train_from_iterator(texts, trainer)
    if tk.get_vocab_size() <= floor:
        raise BadInputError("the training text is empty: no BPE merges were learned")
    # The trainer marks all its special tokens decode-skipped; only bos/eos should be (see DECODE_SKIPPED).
    # The flag can only be changed through the serialized form.
    spec = json.loads(tk.to_str())
    for t in spec["added_tokens"]:
        t["special"] = t["content"] in DECODE_SKIPPED
    tk = Tokenizer.from_str(json.dumps(spec))
    bos_id = tk.token_to_id(BOS)
    tk.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B:1", special_tokens=[(BOS, bos_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=BOS, eos_token=EOS, pad_token=EOS,
                                   chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Save beside the target, then move file by file: a reader never sees a half-written tokenizer.json.
    with tempfile.TemporaryDirectory(dir=out, prefix=".tokenizer-") as tmp:
        fast.save_pretrained(tmp)
        # transformers 5 writes its own class name and a separate chat_template.jinja; the 4.x name and an
        # inline template let older transformers (and tools pinned to it) load the directory too.
        cfg_file = Path(tmp) / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text())
        cfg.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=CHAT_TEMPLATE)
        cfg_file.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
        for f in sorted(Path(tmp).iterdir()):
            os.replace(f, out / f.name)
    return _auto(out)

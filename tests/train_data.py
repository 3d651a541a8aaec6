"""Token shards of tinyshakespeare for the training tests, made with the real `tokenizer train` and
`data prepare` code (a 320-id byte-level BPE keeps tokenizing and the models small)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.toml"
VOCAB = 320


def prepare_shakespeare(out: Path, text: Path) -> Path:
    """Tokenizer + shards of `text` (tinyshakespeare, or conftest's synthetic corpus where it is absent)."""
    from nanoseek.train.prepare import prepare
    from nanoseek.train.tokenizer import train_tokenizer

    # The BPE merges only need a sample; the shards cover the whole text.
    train_tokenizer([text.read_text()[:200_000]], VOCAB, out / "tok")
    prepare([text], str(out / "tok"), out / "data", val_fraction=0.05, workers=1, doc_split="blank-lines")
    return out / "data"


def unigram_cross_entropy(data: Path) -> float:
    """Nats/token of the best context-free predictor (train-split token frequencies) on the val split: what a
    model that learned nothing but token frequencies would score on held-out text."""
    from nanoseek.train.data import TokenShards

    train, val = TokenShards(data, "train"), TokenShards(data, "val")
    counts = np.bincount(np.asarray(train.read(0, train.num_tokens)), minlength=train.vocab_size) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[np.asarray(val.read(0, val.num_tokens))].mean())


def small_run(data: Path, out_dir: Path, steps: int, *extra: str) -> list[str]:
    """--set overrides for a quick run of the tiny preset: small batches, no plots."""
    return [f"data.path={data}", f"train.out_dir={out_dir}", f"train.steps={steps}", "data.batch_size=4",
            "data.seq_len=32", "optim.warmup_steps=5", "train.eval_batches=4", "train.log_every=1000",
            "train.plots=false", *extra]


def cli(*args: str, torchrun: int = 0, **kw) -> subprocess.Popen:
    """`nanoseek ...` (or torchrun of it) in a fresh process with a fixed thread count, so runs compare
    bit for bit."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"}
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
               "-m", "nanoseek.cli", *args]
        env["OMP_NUM_THREADS"] = "1"
    else:
        cmd = [sys.executable, "-m", "nanoseek.cli", *args]
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **kw)


class FixedBatches:
    """A loader that serves the same (inputs, targets) batch every step, cut from `seq` [B, T + 1]; nothing to
    save or restore."""

    def __init__(self, seq):
        self.seq = seq

    def next_batch(self):
        return self.seq[:, :-1], self.seq[:, 1:]

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass

"""`--log tensorboard|wandb` beside metrics.jsonl: a missing extra is one line naming it, before any model
loads; records become scalar series; TensorBoard writes its event files when the package is there."""

import importlib.util

import pytest

from nanoseek.cli import main
from nanoseek.train.tracking import Tracker, scalars


@pytest.mark.parametrize("kind", ["tensorboard", "wandb"])
def test_a_missing_extra_is_one_line(kind, tmp_path, capsys):
    if importlib.util.find_spec(kind) is not None:
        pytest.skip(f"{kind} is installed")
    rc = main(["sft", "--model", "no-such-model", "--data", "x.jsonl", "--out", str(tmp_path / "r"), "--log", kind])
    err = capsys.readouterr().err.strip().splitlines()
    want = f"nanoseek: error: --log {kind} needs the {kind} package: pip install 'nanoseek[tracking]'"
    assert rc == 4 and err == [want]


def test_records_become_named_scalars():
    rec = {"kind": "train", "step": 3, "loss": 1.5, "load_max_mean": [1.2, 1.4], "note": "x"}
    assert scalars(rec, ["layer 1", "layer 2"]) == {"train/loss": 1.5, "train/load_max_mean/layer 1": 1.2,
                                                   "train/load_max_mean/layer 2": 1.4}


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard not installed")
def test_tensorboard_writes_event_files(tmp_path):
    t = Tracker("tensorboard", tmp_path, {})
    t.log({"kind": "train", "step": 1, "loss": 2.0})
    t.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))

"""`nanoseek export CKPT OUT.gguf` on a DeepSeek-V3.2 or V4 checkpoint: llama.cpp has neither architecture
(V3.2 would load as deepseek2 with its indexer silently dropped), so the export refuses in one line naming it
and writes nothing."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nanoseek.cli import main
from nanoseek.models import build_model
from nanoseek.train.checkpoint import model_spec
from nanoseek.train.config import load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("preset,arch", [("tiny-v32", "deepseek_v32"), ("tiny-v4", "deepseek_v4")])
def test_gguf_export_refuses_v32_and_v4(preset, arch, tmp_path, capsys):
    torch.manual_seed(0)
    model = build_model(load_config(REPO / "configs" / f"{preset}.toml").model_config(64, 0, 1))
    ck = tmp_path / "ck"
    ck.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ck / "model.safetensors"))
    (ck / "meta.json").write_text(json.dumps({"step": 1, "model": model_spec(model.config)}))
    assert main(["export", str(ck), str(tmp_path / "m.gguf"), "--format", "gguf"]) != 0
    err = capsys.readouterr().err.strip()
    assert f"architecture '{arch}' has no llama.cpp equivalent" in err and "\n" not in err
    assert not (tmp_path / "m.gguf").exists()

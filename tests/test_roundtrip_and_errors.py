"""nanoseek → HF files → transformers gives the same logits; broken checkpoints give one clear line."""

import json
import shutil

import pytest
import torch
import transformers

from hf_models import deepseek, llama, qwen2
from nanoseek.cli import main
from nanoseek.errors import BadInputError, NotFoundError, UnsupportedError
from nanoseek.models import build_model
from nanoseek.models.config import DeepseekConfig
from nanoseek.weights.hf import load_hf, save_hf


@pytest.mark.parametrize("make", [llama, qwen2, deepseek], ids=["llama", "qwen2", "deepseek"])
@torch.no_grad()
def test_save_then_transformers_loads_identical_logits(make, tmp_path):
    make(tmp_path / "src")
    ours, _ = load_hf(tmp_path / "src")
    save_hf(ours, tmp_path / "out", max_shard_bytes=20_000)  # force sharding
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 17))
    assert (ref(ids).logits - ours(ids)).abs().max() < 1e-4
    again, _ = load_hf(tmp_path / "out")
    assert torch.equal(again(ids), ours(ids))


@torch.no_grad()
def test_mtp_weights_round_trip_in_hub_layout(tmp_path):
    cfg = DeepseekConfig(vocab_size=40, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                         num_hidden_layers=2, num_attention_heads=2, q_lora_rank=None, kv_lora_rank=8,
                         qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4, n_group=2,
                         topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1, num_nextn_predict_layers=1)
    torch.manual_seed(0)
    m = build_model(cfg).eval()
    save_hf(m, tmp_path / "ck")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "ck" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.2.eh_proj.weight" in keys and "model.layers.2.mlp.experts.3.up_proj.weight" in keys
    back, cfg2 = load_hf(tmp_path / "ck")
    assert cfg2.num_nextn_predict_layers == 1
    ids = torch.randint(0, 40, (1, 9))
    h1, h2 = m.hidden(ids), back.hidden(ids)
    assert torch.equal(m.mtp_logits(ids, h1)[0], back.mtp_logits(ids, h2)[0])


def test_packed_expert_layout_loads(tmp_path):
    """transformers 5.x in-memory layout (experts.gate_up_proj [E, 2I, H]) saved as-is also loads."""
    ref = deepseek(tmp_path / "src")
    from safetensors.torch import save_file
    packed = {k: v.contiguous() for k, v in ref.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in packed)
    (tmp_path / "packed").mkdir()
    save_file(packed, str(tmp_path / "packed" / "model.safetensors"))
    shutil.copy(tmp_path / "src" / "config.json", tmp_path / "packed" / "config.json")
    ours, _ = load_hf(tmp_path / "packed")
    ids = torch.randint(0, 100, (1, 11))
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max() < 1e-4


def _expect(tmp_path, capsys, argv, code, *needles):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == code, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err


def test_bad_inputs_give_one_clear_line(tmp_path, capsys):
    llama(tmp_path / "ok")
    capsys.readouterr()  # drop transformers' own progress output from writing the fixture
    gen = ["generate", "hi", "--max-tokens", "1", "--quant", "none", "--model"]
    _expect(tmp_path, capsys, gen + [str(tmp_path / "nope")], NotFoundError.exit_code, "nope")

    trunc = tmp_path / "trunc"
    shutil.copytree(tmp_path / "ok", trunc)
    f = trunc / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _expect(tmp_path, capsys, gen + [str(trunc)], BadInputError.exit_code, "model.safetensors", "truncated")

    garbage = tmp_path / "garbage"
    shutil.copytree(tmp_path / "ok", garbage)
    (garbage / "model.safetensors").write_bytes(b"\x00\x01not a safetensors file" * 10)
    _expect(tmp_path, capsys, gen + [str(garbage)], BadInputError.exit_code, "model.safetensors")

    wrong = tmp_path / "wrong"
    shutil.copytree(tmp_path / "ok", wrong)
    cfg = json.loads((wrong / "config.json").read_text())
    cfg["intermediate_size"] = 100
    (wrong / "config.json").write_text(json.dumps(cfg))
    _expect(tmp_path, capsys, gen + [str(wrong)], BadInputError.exit_code, "mlp", "shape", "config.json")

    arch = tmp_path / "arch"
    shutil.copytree(tmp_path / "ok", arch)
    cfg["architectures"], cfg["model_type"] = ["MambaForCausalLM"], "mamba"
    (arch / "config.json").write_text(json.dumps(cfg))
    _expect(tmp_path, capsys, gen + [str(arch)], UnsupportedError.exit_code, "MambaForCausalLM")

    badjson = tmp_path / "badjson"
    shutil.copytree(tmp_path / "ok", badjson)
    (badjson / "config.json").write_text("{not json")
    _expect(tmp_path, capsys, gen + [str(badjson)], BadInputError.exit_code, "config.json")


def test_debug_flag_shows_traceback(tmp_path, capsys):
    rc = main(["--debug", "generate", "x", "--model", str(tmp_path / "missing")])
    assert rc == NotFoundError.exit_code
    assert "Traceback" in capsys.readouterr().err


def test_fp8_block_scaled_weights_are_dequantized(tmp_path):
    """DeepSeek-V3's released weights: float8_e4m3fn with one fp32 scale per 128x128 block."""
    from safetensors.torch import load_file, save_file

    llama(tmp_path / "src")
    state = load_file(str(tmp_path / "src" / "model.safetensors"))
    name = "model.layers.0.mlp.gate_proj.weight"  # [112, 64]: one partial block
    w = state[name]
    scale = torch.tensor([[w.abs().max().item() / 448.0]])
    state[name] = (w / scale).to(torch.float8_e4m3fn)
    state[name + "_scale_inv"] = scale
    (tmp_path / "fp8").mkdir()
    save_file(state, str(tmp_path / "fp8" / "model.safetensors"))
    shutil.copy(tmp_path / "src" / "config.json", tmp_path / "fp8" / "config.json")
    ours, _ = load_hf(tmp_path / "fp8")
    got = ours.model.layers[0].mlp.gate_proj.weight
    assert torch.equal(got, state[name].float() * scale)
    assert (got - w).abs().max() < 0.07 * w.abs().max()  # e4m3 keeps ~2 significant digits

"""LoRA: a wrapped model starts equal to the original, only the adapters train, merging gives the same function
under the original parameter names, a tiny model learns a reply through the Trainer, and `nanoseek sft
--lora-r` writes an ordinary HF model that resumes exactly from its checkpoints."""

import json
import shutil

import pytest
import torch
from torch import nn

from nanoseek.chat import render_prompt
from nanoseek.cli import main
from nanoseek.engine.generate import Engine
from nanoseek.engine.sampling import SamplingParams
from nanoseek.errors import BadInputError
from nanoseek.models import build_model
from nanoseek.models.config import DeepseekConfig, DenseConfig
from nanoseek.train import checkpoint as ckpt
from nanoseek.train.config import OptimConfig, RunConfig, TrainConfig
from nanoseek.train.loop import Trainer
from nanoseek.train.lora import LoRALinear, apply_lora, merge_lora
from nanoseek.train.optim import build_optimizers
from nanoseek.train.pretrain import init_weights
from nanoseek.train.sft import SFTBatches, SFTObjective, build_examples, pack
from nanoseek.weights.hf import save_hf
from nanoseek.weights.registry import load_model
from test_chat import CHATML, make_tokenizer

MLA_TARGETS = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "down_proj")


def dense(vocab=64, tied=True, eos=None, seed=0):
    torch.manual_seed(seed)
    m = build_model(DenseConfig(vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                tie_word_embeddings=tied, eos_token_id=eos))
    init_weights(m, 0.1)
    return m


def deepseek(seed=0):
    torch.manual_seed(seed)
    m = build_model(DeepseekConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                                   num_hidden_layers=2, num_attention_heads=4, q_lora_rank=16, kv_lora_rank=12,
                                   qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4,
                                   n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1,
                                   max_position_embeddings=64, num_nextn_predict_layers=1))
    init_weights(m, 0.1)
    return m


@pytest.mark.parametrize("make,targets", [(dense, None), (deepseek, MLA_TARGETS)], ids=["dense-tied", "mla-moe"])
def test_adapters_start_at_zero_train_alone_and_merge_to_the_same_function(make, targets):
    model = make()
    original_keys = list(model.state_dict())
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        ref = model(ids)
    wrapped = apply_lora(model, r=4, alpha=8, targets=targets)
    assert len(wrapped) == sum(isinstance(m, LoRALinear) for m in model.modules()) > 0
    with torch.no_grad():
        assert torch.equal(model(ids), ref)                               # B = 0: exactly the original
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * len(wrapped)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opts = build_optimizers(model, OptimConfig(lr=1e-2, weight_decay=0.1), torch.device("cpu"))
    assert {id(p) for o in opts for g in o.param_groups for p in g["params"]} == \
        {id(p) for n, p in model.named_parameters() if n in trainable}
    model.train()
    for _ in range(3):
        logits = model(ids)
        torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1)).backward()
        assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
        # (the MTP module's adapters take part only in the MTP loss, not in this forward)
        assert all(p.grad is not None for n, p in model.named_parameters() if ".lora_B." in n
                   and not n.startswith("mtp."))
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)   # base frozen
    assert all(m.lora_B.weight.abs().sum() > 0 for n, m in model.named_modules()
               if isinstance(m, LoRALinear) and not n.startswith("mtp."))

    model.eval()
    with torch.no_grad():
        adapted = model(ids)
        assert not torch.allclose(adapted, ref, atol=1e-4)                # training changed the function
        if targets is not None:
            # MLA's absorbed path reads kv_b_proj.weight directly: it must see the adapted weight.
            for layer in model.model.layers:
                layer.self_attn.mode = "absorb"
            torch.testing.assert_close(model(ids), adapted, atol=1e-5, rtol=1e-5)
            for layer in model.model.layers:
                layer.self_attn.mode = "naive"
        assert merge_lora(model) == len(set(map(id, (model.get_submodule(n) for n in wrapped))))
        torch.testing.assert_close(model(ids), adapted, atol=1e-5, rtol=1e-5)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(type(model.get_submodule(n)) is nn.Linear for n in wrapped)
    assert list(model.state_dict()) == original_keys                        # transformers' names again
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_tiny_model_learns_its_reply_with_lora_only(tmp_path):
    tok = make_tokenizer(CHATML)
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]
    x, y = pack(build_examples(tok, [conv], seq_len=64) * 4, 64, pad_id=0)
    model = dense(len(tok), tied=True, eos=tok.eos_token_id)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, r=8, alpha=16)
    cfg = TrainConfig(optim=OptimConfig(lr=1e-2, schedule="constant", warmup_steps=0, weight_decay=0.0),
                      train=RunConfig(steps=60, device="cpu", out_dir=str(tmp_path), eval_every=0, ckpt_every=0,
                                      plots=False, log_every=1000))
    Trainer(cfg, model, SFTObjective(), SFTBatches(x, y, batch_size=1)).fit()
    merge_lora(model)
    model.eval()
    prompt = render_prompt(tok, conv[:1]).ids
    out = Engine(model, tok).generate([prompt], SamplingParams(temperature=0, max_tokens=20))[0]
    assert out.text == "hello there" and out.finish_reason == "stop"
    after = model.state_dict()
    assert torch.equal(after["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert torch.equal(after["model.norm.weight"], base["model.norm.weight"])
    assert not torch.equal(after["model.layers.0.self_attn.q_proj.weight"],
                           base["model.layers.0.self_attn.q_proj.weight"])


def _sft_args(base, data, out):
    return ["sft", "--model", str(base), "--data", str(data), "--out", str(out), "--steps", "6", "--lora-r", "4",
            "--lora-targets", "q_proj,v_proj,down_proj", "--lora-dropout", "0.1", "--seq-len", "64",
            "--batch-size", "1", "--ckpt-every", "3", "--warmup-steps", "0", "--device", "cpu", "--no-plots"]


def test_sft_cli_with_lora_writes_a_plain_model_and_resumes_exactly(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    tok = make_tokenizer(CHATML)
    model = dense(len(tok), tied=True, eos=tok.eos_token_id)
    base_dir = save_hf(model, tmp_path / "base", tokenizer=tok)
    data = tmp_path / "chat.jsonl"
    convs = [[{"role": "user", "content": f"{a}+{a}?"}, {"role": "assistant", "content": str(2 * a),
                                                           "reasoning_content": "double it"}] for a in range(6)]
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    out = tmp_path / "run"
    assert main(_sft_args(base_dir, data, out)) == 0
    assert json.loads((out / "config.json").read_text())["optim"]["lr"] == 2e-4   # LoRA's default lr

    final = load_model(out / "final")
    assert not any(isinstance(m, LoRALinear) for m in final.model.modules())
    # The last checkpoint holds the frozen base and the adapters; merging them is what final/ holds.
    step6 = ckpt.latest(out)
    assert step6.name == "step_00000006" and json.loads((step6 / "meta.json").read_text())["lora"]["r"] == 4
    sd = ckpt.read_weights(step6, tied=True)
    assert torch.equal(sd["model.layers.0.self_attn.q_proj.base.weight"],
                       model.state_dict()["model.layers.0.self_attn.q_proj.weight"])
    rebuilt = load_model(base_dir).model
    apply_lora(rebuilt, r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
    rebuilt.load_state_dict(sd, strict=True)
    merge_lora(rebuilt)
    ids = torch.randint(0, len(tok), (2, 16))
    with torch.no_grad():
        logits = final.model(ids)
        assert torch.equal(rebuilt.eval()(ids), logits)
        assert not torch.allclose(model.eval()(ids), logits, atol=1e-4)      # the adapters did train
    fsd, bsd = final.model.state_dict(), model.state_dict()
    assert torch.equal(fsd["model.layers.1.self_attn.k_proj.weight"], bsd["model.layers.1.self_attn.k_proj.weight"])
    assert not torch.equal(fsd["model.layers.1.mlp.down_proj.weight"], bsd["model.layers.1.mlp.down_proj.weight"])

    # transformers reads final/ as an ordinary Llama: every name matches, and it computes the same logits.
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out / "final", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(ids).logits, logits, atol=1e-4, rtol=1e-4)

    # Killed after the step-3 checkpoint: the rerun resumes from it and ends bitwise where the first run did.
    first = {k: v.clone() for k, v in fsd.items()}
    shutil.rmtree(step6)
    shutil.rmtree(out / "final")
    capsys.readouterr()
    assert main(_sft_args(base_dir, data, out)) == 0
    assert "step_00000003 (step 3)" in capsys.readouterr().err
    again = load_model(out / "final").model.state_dict()
    assert all(torch.equal(again[k], first[k]) for k in first)


def test_bad_targets_and_options_are_named(capsys):
    model = dense()
    with pytest.raises(BadInputError, match=r"q_porj: no such linear layer.*down_proj, gate_proj, k_proj"):
        apply_lora(model, targets=("q_proj", "q_porj"))
    with pytest.raises(BadInputError, match=r"lm_head: its weight is shared with model.embed_tokens"):
        apply_lora(model, targets=("lm_head",))
    with pytest.raises(BadInputError, match="rank r must be >= 1"):
        apply_lora(model, r=0)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())    # refused before changing anything
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(BadInputError, match="no such linear layer"):
        apply_lora(deepseek(), targets=("k_proj",))                           # MLA has no k_proj
    assert main(["sft", "--data", "x.jsonl", "--out", "o", "--lora-alpha", "8"]) != 0
    assert "need --lora-r" in capsys.readouterr().err

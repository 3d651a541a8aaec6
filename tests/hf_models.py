"""Tiny random transformers models written with save_pretrained: the numerical reference for our models."""

from __future__ import annotations

import torch
import transformers


def _save(model, path, seed_extra=None):
    model = model.float().eval()
    if seed_extra:
        seed_extra(model)
    model.save_pretrained(path)
    return model


def llama(path, **kw):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
                                   rms_norm_eps=1e-5, tie_word_embeddings=kw.pop("tie", True), **kw)
    return _save(transformers.LlamaForCausalLM(cfg), path)


def qwen2(path, **kw):
    torch.manual_seed(1)
    cfg = transformers.Qwen2Config(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=False, **kw)
    model = transformers.Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # biases default to zero; make them matter
        for layer in model.model.layers:
            for p in (layer.self_attn.q_proj.bias, layer.self_attn.k_proj.bias, layer.self_attn.v_proj.bias):
                p.normal_(std=0.5)
    return _save(model, path)


def deepseek(path, *, yarn=False, q_lora=True, **kw):
    torch.manual_seed(2)
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if yarn:
        rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
                "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8}
    cfg = transformers.DeepseekV3Config(
        vocab_size=113, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2,
        n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=32 if q_lora else None, kv_lora_rank=16,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=256,
        rope_parameters=rope, **kw)
    model = transformers.DeepseekV3ForCausalLM(cfg)

    def randomize(m):
        with torch.no_grad():
            for layer in m.model.layers:
                gate = getattr(layer.mlp, "gate", None)
                if gate is not None:  # zero by default: exercise the selection-only bias path
                    gate.e_score_correction_bias.normal_(std=0.05)
                    gate.weight.normal_(std=0.3)
    return _save(model, path, randomize)

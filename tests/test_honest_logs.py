"""Plots and logs that say what they measure (issue 18): each objective's console line carries the keys its
plot shows (GRPO: reward, accuracy, format, KL, length; pretraining: CE and MTP apart, not their sum); MoE
plots name model layers; output that is not a terminal gets a line at least every 10 s."""

import json
import time

from nanoseek.models import build_model
from nanoseek.models.config import DeepseekConfig
from nanoseek.progress import progress_bar
from nanoseek.train.distill import KDObjective
from nanoseek.train.grpo import GRPOObjective
from nanoseek.train.loop import _Progress, format_metrics, moe_labels
from nanoseek.train.plots import plot_run
from nanoseek.train.pretrain import LanguageModeling
from nanoseek.train.sft import SFTObjective

REC = {"kind": "train", "step": 1, "loss": 3.9, "ce": 3.0, "mtp": 3.5, "balance": 0.01, "kl": 0.2,
       "reward": 0.5, "accuracy": 0.4, "format": 0.9, "completion_len": 17.0, "frac_reward_zero_std": 0.25,
       "lr": 1e-3, "tokens_per_s": 100.0}


def test_console_lines_carry_what_each_objective_optimises():
    pre = format_metrics(REC, LanguageModeling.console_keys)
    assert pre.startswith("ce 3.0000  mtp 3.5000") and "loss" not in pre   # CE compares with held-out CE
    assert format_metrics(REC, SFTObjective.console_keys).startswith("ce 3.0000")
    assert format_metrics(REC, KDObjective.console_keys).startswith("kl 0.2000  ce 3.0000")
    grpo = format_metrics(REC, GRPOObjective.console_keys)
    for part in ("reward 0.5000", "accuracy 0.4000", "format 0.9000", "kl 0.2000", "completion_len 17.0000"):
        assert part in grpo


def test_plain_progress_every_ten_seconds(capsys, monkeypatch):
    p = _Progress(True, total=100, start=0, keys=GRPOObjective.console_keys)   # capsys: stderr is no terminal
    p.update(1, REC, None, force=False)
    assert capsys.readouterr().err == ""           # < 10 s since the start, not a log_every step
    monkeypatch.setattr(_Progress, "PLAIN_EVERY_S", 0.0)
    p.update(2, REC, None, force=False)
    assert capsys.readouterr().err.startswith("step 2/100  reward 0.5000")
    with progress_bar("eval x", 10, every_s=0.05) as advance:
        advance(3)
        time.sleep(0.3)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) >= 3 and lines[-1].startswith("eval x: 3/10")


def test_moe_plots_name_model_layers():
    cfg = DeepseekConfig(vocab_size=61, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                         num_hidden_layers=3, num_attention_heads=2, q_lora_rank=None, kv_lora_rank=16,
                         qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=8, n_group=2,
                         topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1, num_nextn_predict_layers=1)
    model = build_model(cfg)
    assert len(model.moe_layers()) == 3
    assert moe_labels(model) == ["layer 1", "layer 2", "MTP depth 1"]   # layer 0 is dense


def test_grpo_run_plots_its_rollout_statistics(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({**REC, "step": s}) + "\n" for s in (1, 2)))
    written = {p.name for p in plot_run(tmp_path, "grpo")}
    assert "grpo.png" in written and "loss.png" not in written   # no policy loss posing as a CE

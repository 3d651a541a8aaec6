"""V4's CSA indexer trains by V3.2's KL loss through the shared Trainer (models/v4_attention.py, dsa.indexer_kl,
train/loop.py): a dense warm-up in which only the indexers learn and their KL falls, then sparse steps in which
the KL reaches the indexers alone (their inputs are detached) and top-k still passes the LM loss no gradient."""

from pathlib import Path

import torch
from train_data import FixedBatches

from nanoseek.models.dsa import dsa_modules, indexer_kl

REPO = Path(__file__).resolve().parents[1]


def _model_and_cfg(tmp_path, warmup: int):
    from nanoseek.models import build_model
    from nanoseek.train.config import load_config
    from nanoseek.train.pretrain import init_weights

    cfg = load_config(REPO / "configs" / "tiny-v4.toml",
                      [f"train.out_dir={tmp_path}", f"train.indexer_warmup_steps={warmup}", "optim.warmup_steps=1",
                       "data.seq_len=64", "data.batch_size=2", "optim.lr=1e-2", "model.hidden_size=64"])
    torch.manual_seed(0)
    model = build_model(cfg.model_config(vocab_size=64, bos_id=0, eos_id=1))
    init_weights(model, cfg.train.init_std)
    return model, cfg


def test_kl_leaves_out_queries_with_no_allowed_key():
    """Before CSA's first entry closes a query has nothing to pick: its row must not make the loss NaN."""
    torch.manual_seed(0)
    probs, scores = torch.rand(1, 3, 4, 5).softmax(-1), torch.randn(1, 4, 5)
    allowed = torch.rand(1, 4, 5) > 0.3
    allowed[0, :, 0] = True
    full = indexer_kl(probs, scores, allowed)
    allowed_empty = torch.cat([torch.zeros(1, 1, 5, dtype=torch.bool), allowed], 1)
    probs_empty = torch.cat([torch.zeros(1, 3, 1, 5), probs], 2)
    got = indexer_kl(probs_empty, torch.cat([torch.randn(1, 1, 5), scores], 1), allowed_empty)
    torch.testing.assert_close(got, full)


def test_csa_kl_reaches_only_the_indexers(tmp_path):
    model, _ = _model_and_cfg(tmp_path, 0)
    csa = dsa_modules(model)
    assert len(csa) == 2  # tiny-v4's two CSA layers
    ids = torch.randint(0, 64, (2, 48), generator=torch.Generator().manual_seed(1))
    model.train()
    logits = model(ids)
    kl = sum(m.last_index_loss for m in csa)
    assert torch.isfinite(kl) and kl > 0
    kl.backward(retain_graph=True)
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad and all(".indexer." in n for n in with_grad)
    assert any(n.startswith("model.layers.1.") for n in with_grad) and any(n.startswith("model.layers.3.")
                                                                        for n in with_grad)
    model.zero_grad(set_to_none=True)
    logits.logsumexp(-1).mean().backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for n, p in model.named_parameters() if ".indexer." in n)


def test_trainer_warms_up_then_trains_v4_indexers(tmp_path):
    from nanoseek.train.loop import Trainer
    from nanoseek.train.pretrain import LanguageModeling

    model, cfg = _model_and_cfg(tmp_path, 10)
    seq = torch.randint(0, 64, (2, 65), generator=torch.Generator().manual_seed(0))

    trainer = Trainer(cfg, model, LanguageModeling(), FixedBatches(seq))
    start = {n: t.detach().clone() for n, t in model.state_dict().items()}
    recs = [trainer.train_step() for _ in range(10)]
    assert all("indexer_kl" in r and "lm_loss" in r for r in recs)
    assert recs[-1]["indexer_kl"] < 0.8 * recs[0]["indexer_kl"]
    moved = {n for n, t in model.state_dict().items() if not torch.equal(t, start[n])}
    assert moved and all(".indexer." in n for n in moved)
    rec = trainer.train_step()  # sparse: everything learns, the KL is added to the LM loss
    assert "lm_loss" not in rec and rec["indexer_kl"] > 0
    moved = {n for n, t in model.state_dict().items() if not torch.equal(t, start[n])}
    assert "model.embed_tokens.weight" in moved

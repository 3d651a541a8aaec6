"""GRPO on the shared Trainer: a tiny model learns what its reward asks for, and does not at learning rate 0;
rollouts build the right masks, resume to the same problems and seeds, and the first inner update has ratio 1."""

import pytest
import torch

from nanoseek.models import build_model
from nanoseek.models.config import DenseConfig
from nanoseek.tasks.base import Problem, RewardBreakdown, Task
from nanoseek.train.config import OptimConfig, RunConfig, TrainConfig
from nanoseek.train.grpo import GRPOConfig, GRPOObjective, Rollouts, Row
from nanoseek.train.loop import LMForward, Trainer, read_jsonl
from nanoseek.train.pretrain import init_weights
from test_chat import make_tokenizer

DIGITS = set("0123456789")


class DigitTask(Task):
    """Reward = the share of digits in the completion: dense enough for a tiny random model to find."""

    name = "digits"

    def iter_problems(self, split="test"):
        for i in range(8):
            yield Problem(f"{split}/{i}", f"Q{i}:", "")

    def check(self, answer, problem):
        return False

    def reward(self, completion, problem, *, started_in_think=False, num_tokens=None):
        share = sum(c in DIGITS for c in completion) / max(len(completion), 1)
        return RewardBreakdown(share, 1.0, 0.0, share, None)


def _policy(tok):
    torch.manual_seed(0)
    cfg = DenseConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    model = build_model(cfg)
    init_weights(model, 0.02)  # near-uniform next-token distribution: every token gets sampled
    return model


def _cfg(**kw):
    base = dict(group_size=8, prompts_per_step=4, max_new_tokens=6, template="plain", open_think=False, seed=0)
    return GRPOConfig(**{**base, **kw})


def _train(tmp_path, lr, steps=30, **kw):
    tok = make_tokenizer(None)
    policy = _policy(tok)
    gcfg = _cfg(**kw)
    tcfg = TrainConfig(optim=OptimConfig(lr=lr, schedule="constant", warmup_steps=0, weight_decay=0.0),
                       train=RunConfig(steps=steps, device="cpu", out_dir=str(tmp_path / f"run-{lr}"),
                                       eval_every=0, ckpt_every=0, plots=False, log_every=1000))
    source = Rollouts(policy, tok, DigitTask(), gcfg, micro_batches=1)
    Trainer(tcfg, policy, GRPOObjective(gcfg), source).fit()
    return [r["reward"] for r in read_jsonl(tmp_path / f"run-{lr}" / "metrics.jsonl") if r["kind"] == "train"]


def test_reward_rises_with_learning_and_not_without(tmp_path):
    learned = _train(tmp_path, lr=1e-2)
    frozen = _train(tmp_path, lr=0.0)
    first, last = sum(learned[:5]) / 5, sum(learned[-5:]) / 5
    assert last > first + 0.3, learned        # from ~0.04 (10 digits of ~260 tokens) to mostly digits
    f_first, f_last = sum(frozen[:5]) / 5, sum(frozen[-5:]) / 5
    assert abs(f_last - f_first) < 0.1 and f_last < 0.2, frozen
    assert learned[:1] == frozen[:1]           # same seeds: the first rollout is the same either way


def test_rollout_masks_cover_exactly_the_completions():
    tok = make_tokenizer(None)
    src = Rollouts(_policy(tok), tok, DigitTask(), _cfg(prompts_per_step=2, group_size=2), micro_batches=2)
    rows = [([5, 6, 7], [8, 9]), ([5, 6], [1, 2, 3]), ([4], [7]), ([1, 2, 3, 4], [])]
    batches = src._micro_batches([Row(p, c, 0.0) for p, c in rows], torch.tensor([1.0, -1.0, 0.5, -0.5]), {})
    assert [b.ids.shape[0] for b in batches] == [2, 2]
    seen = []
    for b in batches:
        for ids, mask in zip(b.ids.tolist(), b.mask.tolist()):
            targets = [ids[t + 1] for t in range(len(mask)) if mask[t]]
            seen.append(targets)
    assert sorted(map(tuple, seen)) == sorted(tuple(c) for _, c in rows)
    assert sorted(float(a) for b in batches for a in b.advantages) == [-1.0, -0.5, 0.5, 1.0]


def test_resume_replays_the_same_problems_and_samples():
    tok = make_tokenizer(None)
    policy = _policy(tok)
    a = Rollouts(policy, tok, DigitTask(), _cfg(), micro_batches=1)
    a.next_batch()
    state = a.state_dict()
    want = a.next_batch()
    b = Rollouts(policy, tok, DigitTask(), _cfg(), micro_batches=1)
    b.load_state_dict(state)
    got = b.next_batch()
    assert torch.equal(got.ids, want.ids) and torch.equal(got.advantages, want.advantages)


def test_inner_updates_reuse_the_rollout_with_its_old_logprobs():
    tok = make_tokenizer(None)
    policy = _policy(tok)
    src = Rollouts(policy, tok, DigitTask(), _cfg(inner_updates=2), micro_batches=1)
    b1, b2 = src.next_batch(), src.next_batch()
    assert b1 is b2 and b1.old_logp is None and src.rollouts == 1
    loss, m = GRPOObjective(_cfg(inner_updates=2)).loss(LMForward(policy), b1)
    # the first pass records the sampling policy's log-probs (same precision as the loss): ratio exactly 1
    assert b1.old_logp is not None and float(m["ratio"]) == pytest.approx(1.0, abs=1e-6)
    assert m["clip_low"] == m["clip_high"] == 0
    src.next_batch()
    assert src.rollouts == 2


def test_dynamic_sampling_drops_flat_groups():
    tok = make_tokenizer(None)

    class Flat(DigitTask):
        def reward(self, completion, problem, **kw):
            return RewardBreakdown(0.0, 0.0, 0.0, 0.0, None)

    src = Rollouts(_policy(tok), tok, Flat(), _cfg(dynamic_sampling=True, max_rounds=2), micro_batches=1)
    batch = src.next_batch()
    assert batch.stats["frac_reward_zero_std"] == 1.0
    assert src.consumed == 8                    # two rounds of 4 prompts were tried
    assert torch.count_nonzero(batch.advantages) == 0


def test_rollouts_split_problems_across_ranks():
    tok = make_tokenizer(None)
    policy = _policy(tok)
    one = Rollouts(policy, tok, DigitTask(), _cfg(), micro_batches=1)
    ranks = [Rollouts(policy, tok, DigitTask(), _cfg(), micro_batches=1, rank=r, world_size=2) for r in (0, 1)]
    single = [next(one._stream).id for _ in range(16)]
    split = [[next(r._stream).id for _ in range(8)] for r in ranks]
    assert split[0] == single[0::2] and split[1] == single[1::2]   # disjoint, together the same problems


def _grpo_run(out, rank=0, world=1, port=0):
    import os

    from nanoseek.train import distributed as D

    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                          LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    tok = make_tokenizer(None)
    policy = _policy(tok)
    gcfg = _cfg(prompts_per_step=4, aggregation="grpo")  # per-sequence means: equal under any split by rank
    tcfg = TrainConfig(optim=OptimConfig(lr=1e-2, schedule="constant", warmup_steps=0, weight_decay=0.0),
                       train=RunConfig(steps=4, device="cpu", out_dir=str(out), eval_every=0, ckpt_every=0,
                                       plots=False, log_every=1000))
    env = D.init_distributed("cpu")
    try:
        src = Rollouts(policy, tok, DigitTask(), gcfg, micro_batches=1, rank=env.rank, world_size=env.world_size)
        Trainer(tcfg, policy, GRPOObjective(gcfg), src, None, env).fit()
    finally:
        D.shutdown()


def _grpo_rank(rank, out, world, port):  # mp.spawn passes the rank first
    _grpo_run(out, rank, world, port)


def test_two_ranks_roll_out_halves_and_train_like_one(tmp_path):
    """Under torchrun each rank rolls out half the prompts; with DDP the update equals one process doing all."""
    import socket

    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    from nanoseek.train.checkpoint import checkpoints

    _grpo_run(tmp_path / "one")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_grpo_rank, args=(tmp_path / "two", 2, port), nprocs=2)
    a = [r for r in read_jsonl(tmp_path / "one" / "metrics.jsonl") if r["kind"] == "train"]
    b = [r for r in read_jsonl(tmp_path / "two" / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["reward"] for r in a] == pytest.approx([r["reward"] for r in b], abs=1e-6)
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], abs=1e-5)
    wa = load_file(str(checkpoints(tmp_path / "one")[-1][1] / "model.safetensors"))
    wb = load_file(str(checkpoints(tmp_path / "two")[-1][1] / "model.safetensors"))
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=5e-5), k


def test_resume_in_the_middle_of_inner_updates_is_exact(tmp_path):
    """μ = 2 with a checkpoint after the first update of a rollout: the resumed run does the second update on
    the same rollout with the same recorded log-probs, bit for bit."""
    def run(out, steps):
        tok = make_tokenizer(None)
        policy = _policy(tok)
        gcfg = _cfg(inner_updates=2)
        tcfg = TrainConfig(optim=OptimConfig(lr=1e-2, schedule="constant", warmup_steps=0, weight_decay=0.0),
                           train=RunConfig(steps=steps, device="cpu", out_dir=str(out), eval_every=0, ckpt_every=1,
                                           plots=False, log_every=1000))
        Trainer(tcfg, policy, GRPOObjective(gcfg), Rollouts(policy, tok, DigitTask(), gcfg, micro_batches=1)).fit()
        return [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]

    whole = run(tmp_path / "whole", 4)
    run(tmp_path / "cut", 3)                 # stops after the first update of the second rollout
    resumed = run(tmp_path / "cut", 4)
    assert resumed[-1]["step"] == 4
    assert resumed[-1]["loss"] == whole[-1]["loss"] and resumed[-1]["ratio"] == whole[-1]["ratio"]
    assert whole[-1]["ratio"] != 1.0         # the second pass really is off-policy


def test_dapo_normalizes_by_the_tokens_of_the_whole_rollout():
    """Split over micro-batches, the accumulated DAPO loss is Σ token losses / all tokens, as in one batch."""
    tok = make_tokenizer(None)
    policy = _policy(tok)
    gcfg = _cfg(prompts_per_step=2, group_size=4)
    rows = [([5, 6, 7], [8, 9]), ([5, 6], [1, 2, 3, 4, 5]), ([4], [7]), ([1, 2], [3, 3, 3])] * 2
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.2, 0.1, -0.3, 0.0])
    rows = [Row(p, c, 0.0) for p, c in rows]
    n = float(sum(len(r.completion) for r in rows))
    one = Rollouts(policy, tok, DigitTask(), gcfg, micro_batches=1)._micro_batches(rows, adv, {}, n)
    two = Rollouts(policy, tok, DigitTask(), gcfg, micro_batches=2)._micro_batches(rows, adv, {}, n / 2)
    obj, model = GRPOObjective(gcfg), LMForward(policy)
    whole = obj.loss(model, one[0])[0]
    split = sum(obj.loss(model, b)[0] for b in two) / 2     # the loop averages micro-batches
    assert torch.allclose(whole, split, atol=1e-6)


def test_grpo_on_a_deepseek_moe_with_mtp(tmp_path):
    """A DeepSeek-V3 model with an MTP module and the balance loss on: GRPO's forward skips MTP, and the loop
    counts only the MoE layers that ran. Fine-tuning loads drop the MTP modules altogether."""
    from nanoseek.models.config import DeepseekConfig
    from nanoseek.train.finetune import load_trainable
    from nanoseek.weights.hf import save_hf

    tok = make_tokenizer(None)
    torch.manual_seed(0)
    cfg = DeepseekConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                         num_hidden_layers=2, num_attention_heads=4, q_lora_rank=None, kv_lora_rank=12,
                         qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4, n_group=1,
                         topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1, max_position_embeddings=64,
                         num_nextn_predict_layers=1, seq_aux_alpha=0.01, eos_token_id=tok.eos_token_id)
    policy = build_model(cfg)
    init_weights(policy, 0.02)
    gcfg = _cfg()
    tcfg = TrainConfig(optim=OptimConfig(lr=1e-3, schedule="constant", warmup_steps=0, weight_decay=0.0),
                       train=RunConfig(steps=2, device="cpu", out_dir=str(tmp_path / "run"), eval_every=0,
                                       ckpt_every=0, plots=False, log_every=1000))
    last = Trainer(tcfg, policy, GRPOObjective(gcfg), Rollouts(policy, tok, DigitTask(), gcfg, micro_batches=1)).fit()
    assert len(last["train"]["load_max_mean"]) == 2   # the main MoE layer, and the MTP's (zero load)
    save_hf(policy, tmp_path / "hf", tokenizer=tok)
    loaded = load_trainable(str(tmp_path / "hf"), "cpu")
    assert len(loaded.model.mtp) == 0 and loaded.model.config.num_nextn_predict_layers == 0

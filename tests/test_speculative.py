"""Speculative decoding in the one loop: every drafter is lossless (greedy output equals plain decoding; the
sampling rule keeps the output distribution), rejected drafts leave no trace in the cache, and a request
cancelled mid-verify frees its row."""

import math

import pytest
import torch

from nanoseek.engine.draft import DraftRow, ModelDrafter, MTPDrafter, NgramDrafter
from nanoseek.engine.generate import Engine
from nanoseek.engine.sampling import Sampler, SamplerState, SamplingParams
from nanoseek.engine.scheduler import Scheduler
from nanoseek.models import build_model
from nanoseek.models.cache import LatentLayer
from nanoseek.models.config import DeepseekConfig, DenseConfig
from test_chat import make_tokenizer

TOK = make_tokenizer(None)  # byte-level: every byte a token, so text round-trips exactly
V = len(TOK)


def _model(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "dense":
        cfg = DenseConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, eos_token_id=None)
    else:  # MLA attention, a dense first block and MoE after, one MTP module
        cfg = DeepseekConfig(vocab_size=V, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                             num_hidden_layers=2, num_attention_heads=4, q_lora_rank=None, kv_lora_rank=12,
                             qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4, n_group=1,
                             topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1,
                             max_position_embeddings=256, eos_token_id=None, num_nextn_predict_layers=1)
    m = build_model(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(std=0.3)
    return m.eval()


def _drafter(name, model):
    if name == "ngram":
        return NgramDrafter()
    if name == "draft":  # the target as its own draft model: every draft is right, so drafts run long
        return ModelDrafter(model, V, 256)
    return MTPDrafter(model, 256)


TEXT = ["abcabcabcabc", "the cat sat on the mat; the cat sat", "xyz", "hello hello hello"]


MODELS = {"dense": _model("dense"), "moe": _model("moe")}


@pytest.mark.parametrize("kind,drafter", [("dense", "ngram"), ("dense", "draft"), ("moe", "ngram"), ("moe", "draft"),
                                          ("moe", "mtp")])
def test_greedy_output_equals_plain_decoding_batched_and_alone(kind, drafter):
    model = MODELS[kind]
    prompts = [TOK.encode(t) for t in TEXT]
    # max_tokens cuts inside a draft; stop strings and a stop token end rows mid-draft
    params = [SamplingParams(temperature=0, max_tokens=23),
              SamplingParams(temperature=0, max_tokens=40, stop=["t s"]),
              SamplingParams(temperature=0, max_tokens=30, logprobs=2),
              SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[ord("l")])]
    plain = Engine(model, TOK)
    spec = Engine(model, TOK, drafter=_drafter(drafter, model), draft_tokens=5)
    want = plain.generate(prompts, params)
    together = spec.generate(prompts, params)
    for w, g in zip(want, together):
        assert (g.token_ids, g.text, g.finish_reason) == (w.token_ids, w.text, w.finish_reason)
    assert [lp["top"][0][0] for lp in together[2].logprobs] == [lp["top"][0][0] for lp in want[2].logprobs]
    for p, sp, w in zip(prompts, params, want):
        assert spec.generate([p], sp)[0].token_ids == w.token_ids
    st = spec.loop.stats()
    assert st["spec_verify_steps"] > 0 and st["spec_draft_tokens"] > 0
    if drafter == "draft":
        assert st["spec_acceptance_rate"] > 0.9 and st["spec_tokens_per_step"] > 3


def test_a_mixed_batch_drafts_only_where_it_may():
    model = _model("dense")
    sched = Scheduler(model, TOK, max_batch=4, drafter=ModelDrafter(model, V, 256), draft_tokens=4)
    p = SamplingParams(temperature=0, max_tokens=20)
    a = sched.submit(TOK.encode(TEXT[0]), p)
    b = sched.submit(TOK.encode(TEXT[1]), p, speculate=False)
    while sched.step():
        pass
    plain = Engine(model, TOK)
    assert a.result().token_ids == plain.generate([TOK.encode(TEXT[0])], p)[0].token_ids
    assert b.result().token_ids == plain.generate([TOK.encode(TEXT[1])], p)[0].token_ids
    st = sched.stats()
    # row b never drafts; row a's first token comes from its prefill, then 4 drafts per step, 3 in the last
    # (a step emits drafts + 1 tokens, and 20 - 16 leaves room for 3 + 1)
    assert st["spec_draft_tokens"] == st["spec_accepted_tokens"] == 4 + 4 + 4 + 3 and st["spec_verify_steps"] == 4


def test_after_rollback_the_cache_equals_a_run_that_never_drafted():
    model = _model("moe")
    sched = Scheduler(model, TOK, max_batch=2, drafter=NgramDrafter(), draft_tokens=6, prefix_cache_tokens=0)
    prompt = TOK.encode("abababababab xyz ababab")
    h = sched.submit(prompt, SamplingParams(temperature=0, max_tokens=60))
    rejected = 0
    while not h.done and len(h.completion.token_ids if h.completion else []) < 200:
        sched.step()
        st = sched.stats()
        rejected = st["spec_draft_tokens"] - st["spec_accepted_tokens"]
        slot = sched.rows.slots[0] if sched.rows.slots else None
        if slot is not None and slot.decoding and rejected and st["spec_accepted_tokens"]:
            break
    assert rejected > 0, "the test needs a rejected draft"
    fed = slot.cached_tokens()
    ref = model.new_cache(1, sched.cache.max_len)
    with torch.no_grad():
        model(torch.tensor([fed]), torch.arange(len(fed))[None], ref)
    got, want = sched.cache.layers, ref.layers
    for g, w in zip(got, want):
        assert torch.allclose(g.kv[slot.row, :len(fed)], w.kv[0, :len(fed)], atol=1e-5)


def test_a_request_cancelled_mid_verify_frees_its_row():
    model = _model("dense")
    drafter = ModelDrafter(model, V, 256)
    sched = Scheduler(model, TOK, max_batch=2, drafter=drafter, draft_tokens=6)
    seen = []

    def on_delta(d):
        seen.append(d)
        if len(seen) == 3:  # inside the verify step's position loop
            h.cancel()

    h = sched.submit(TOK.encode(TEXT[0]), SamplingParams(temperature=0, max_tokens=100), on_delta)
    while sched.step():
        pass
    out = h.result(timeout=0)
    assert out.finish_reason == "cancelled" and len(out.token_ids) < 100
    assert sched.stats()["running"] == 0 and not drafter.caches.rows


def test_drafting_switches_off_for_a_cache_that_cannot_rewind(monkeypatch, caplog):
    monkeypatch.setattr(LatentLayer, "rewindable", False)
    sched = Scheduler(_model("moe"), TOK, drafter=NgramDrafter())
    assert sched.drafter is None and "cannot drop" in caplog.text


def test_mtp_first_draft_is_the_training_forwards_prediction():
    model = _model("moe", seed=3)
    tokens = TOK.encode("some text for the module")
    drafter = MTPDrafter(model, 256)
    with torch.no_grad():
        h = model.hidden(torch.tensor([tokens]))
        want = model.mtp_logits(torch.tensor([tokens]), h)[0][0].argmax(-1)  # row t predicts token t+2
    drafter.observe(0, 0, h[0, :-1])
    for n in range(3, len(tokens) + 1):  # as decoding proceeds: known hidden up to n-2, token n-1 next
        got = drafter.propose([DraftRow(0, tokens[:n])], [1])[0]
        assert got == [int(want[n - 2])]


def test_mtp_row_buffers_grow_by_doubling_not_per_step():
    # observe() runs every decode step with one more position; a buffer that grew to exactly what was needed
    # was reallocated and copied on every step.
    drafter = MTPDrafter(MODELS["moe"], 256)
    h = torch.zeros(1, MODELS["moe"].config.hidden_size)
    sizes = set()
    for pos in range(130):
        drafter.observe(0, pos, h)
        sizes.add((drafter.rows[0]["cache"].max_len, drafter.rows[0]["h"].shape[0]))
    assert sizes == {(64, 64), (128, 128), (256, 256)}


def test_ngram_drafts_what_followed_the_latest_match():
    d = NgramDrafter(max_n=3, min_n=1)
    assert d.propose([DraftRow(0, [1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3])], [2]) == [[7, 1]]
    assert d.propose([DraftRow(0, [5, 6, 7])], [3]) == [[]]


def _chi2_pvalue(counts, probs):
    """Pearson's chi-square test of counts against probs (categories with p = 0 must have no counts)."""
    n = sum(counts)
    stat, dof = 0.0, -1
    for c, p in zip(counts, probs):
        if p == 0:
            assert c == 0, "a token of probability 0 was sampled"
            continue
        stat += (c - n * p) ** 2 / (n * p)
        dof += 1
    # survival function of chi-square via the regularized upper gamma function
    return torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                   torch.tensor(stat / 2, dtype=torch.float64)).item()


@pytest.mark.parametrize("draft,kw", [(0, {}), (3, {}), (1, {"top_k": 3}), (4, {"top_p": 0.8}), (2, {"mask": True})])
def test_the_accept_reject_rule_keeps_the_sampling_distribution(draft, kw):
    """20,000 rows, each with its own seed, verify the same draft against the same logits; the emitted tokens
    must follow plain sampling's distribution. A p-value below 1e-4 fails: that is the false-failure rate a
    fresh random draw would have (the seeds are fixed, so the test is deterministic)."""
    n, logits = 20000, torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    mask = kw.pop("mask", False)
    params = SamplingParams(temperature=0.9, **kw)
    sampler = Sampler([SamplerState(params, 6) for _ in range(n)])
    for i, s in enumerate(sampler.states):
        s.generator.manual_seed(1000 + i)
    allowed = None
    if mask:
        allowed = torch.tensor([True, False, True, True, False, True]).expand(n, -1)
    x = logits.expand(n, -1)
    tokens, accepted, _ = sampler.verify(x, torch.full((n,), draft), torch.ones(n, dtype=torch.bool),
                                         allowed=allowed)
    ref = Sampler([SamplerState(params, 6)])
    probs = ref._probs((x[:1] if allowed is None else x[:1].masked_fill(~allowed[:1], -math.inf)).float())[0]
    probs = (probs / probs.sum()).tolist()
    counts = torch.bincount(tokens, minlength=6).tolist()
    assert _chi2_pvalue(counts, probs) > 1e-4
    assert bool((accepted == (tokens == draft)).all())
    # the rule accepts with probability p(draft)
    assert abs(accepted.float().mean().item() - probs[draft]) < 4 * math.sqrt(probs[draft] * (1 - probs[draft]) / n) + 1e-9


def test_speculative_sampling_matches_plain_sampling_end_to_end():
    """The third generated token's distribution, plain against drafted (a draft model that disagrees with the
    target often), over 1,000 seeds each; two-sample chi-square, p < 1e-4 fails."""
    target, other = _model("dense", seed=0), _model("dense", seed=1)
    prompt, n = TOK.encode("ab"), 1000
    plain = Engine(target, TOK, max_batch=256).generate(
        [prompt] * n, [SamplingParams(temperature=1.0, seed=s, max_tokens=3, ignore_eos=True) for s in range(n)])
    spec = Engine(target, TOK, max_batch=256, drafter=ModelDrafter(other, V, 256), draft_tokens=2)
    drafted = spec.generate([prompt] * n, [SamplingParams(temperature=1.0, seed=s + 10_000, max_tokens=3,
                                                          ignore_eos=True) for s in range(n)])
    assert spec.loop.stats()["spec_draft_tokens"] > 0 and spec.loop.stats()["spec_acceptance_rate"] < 0.9
    a = torch.bincount(torch.tensor([o.token_ids[2] for o in plain]), minlength=V).double()
    b = torch.bincount(torch.tensor([o.token_ids[2] for o in drafted]), minlength=V).double()
    keep = (a + b) >= 10   # pool rare tokens into one category
    a = torch.cat([a[keep], a[~keep].sum()[None]])
    b = torch.cat([b[keep], b[~keep].sum()[None]])
    both = a + b
    nz = both > 0
    expected_a, expected_b = both * a.sum() / both.sum(), both * b.sum() / both.sum()
    stat = (((a - expected_a) ** 2 / expected_a)[nz] + ((b - expected_b) ** 2 / expected_b)[nz]).sum()
    dof = int(nz.sum()) - 1
    p = torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2).item()
    assert p > 1e-4


def test_constrained_rows_verify_drafts_against_their_grammar():
    from test_decode_loop import OnlyTokens

    model = MODELS["dense"]
    prompt = TOK.encode("abcabcabc")
    allowed = TOK.encode("abc")
    p = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    plain = Engine(model, TOK).generate([prompt], p, constraints=[OnlyTokens(V, allowed, allowed[0], 12)])[0]
    spec = Engine(model, TOK, drafter=ModelDrafter(model, V, 256), draft_tokens=4)
    got = spec.generate([prompt], p, constraints=[OnlyTokens(V, allowed, allowed[0], 12)])[0]
    assert got.token_ids == plain.token_ids and set(got.token_ids) <= set(allowed)
    # the unconstrained target disagrees with the mask somewhere, so some drafts were rejected by it
    st = spec.loop.stats()
    assert st["spec_draft_tokens"] > st["spec_accepted_tokens"]


def test_metrics_report_speculative_counters():
    from nanoseek.serve.metrics import _SchedulerCollector

    eng = Engine(MODELS["dense"], TOK, drafter=ModelDrafter(MODELS["dense"], V, 256), draft_tokens=3)
    eng.generate([TOK.encode(TEXT[0])], SamplingParams(temperature=0, max_tokens=9))
    got = {f.name: f.samples[0].value for f in _SchedulerCollector({"m": eng.loop.stats}).collect()
           if f.name.startswith("nanoseek_spec_decode")}
    assert got["nanoseek_spec_decode_num_draft_tokens"] == got["nanoseek_spec_decode_num_accepted_tokens"] > 0
    assert got["nanoseek_spec_decode_acceptance_rate"] == 1.0 and got["nanoseek_spec_decode_tokens_per_step"] > 1

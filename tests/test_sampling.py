import math

import pytest
import torch

import random

from nanoseek.engine.sampling import Sampler, SamplerState, SamplingParams
from nanoseek.errors import BadInputError

V = 50


def logits_like(seed: int, batch: int = 4, vocab: int = V) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def draws(params: SamplingParams, row_logits: torch.Tensor, n: int) -> torch.Tensor:
    """n successive samples of one request from the same logits."""
    sampler = Sampler.from_requests([params], row_logits.shape[-1])
    return torch.stack([sampler.sample(row_logits[None]).tokens[0] for _ in range(n)])


# --- greedy and truncation --------------------------------------------------------------------------------

def test_greedy_is_argmax():
    logits = logits_like(0, batch=6)
    sampler = Sampler.from_requests([SamplingParams(temperature=0)] * 6, V)
    assert torch.equal(sampler.sample(logits).tokens, logits.argmax(-1))


def test_greedy_rows_draw_no_randomness():
    # The all-greedy path is a bare argmax: no generator is touched, no counts are kept.
    states = [SamplerState(SamplingParams(temperature=0, seed=1), V) for _ in range(3)]
    before = [s.generator.get_state() for s in states]
    sampler = Sampler(states)
    for step in range(3):
        sampler.sample(logits_like(step, batch=3))
    assert sampler.counts is None and sampler.seen is None
    assert all(torch.equal(b, s.generator.get_state()) for b, s in zip(before, states))


def test_greedy_accepts_bf16():
    logits = logits_like(1).bfloat16()
    sampler = Sampler.from_requests([SamplingParams(temperature=0)] * 4, V)
    assert torch.equal(sampler.sample(logits).tokens, logits.argmax(-1))


@pytest.mark.parametrize("params", [SamplingParams(top_k=1, seed=0), SamplingParams(top_p=1e-6, seed=0),
                                    SamplingParams(min_p=1.0, seed=0, temperature=2.0),
                                    SamplingParams(top_k=1, top_p=0.5, temperature=1.7, seed=0)])
def test_truncation_to_one_token_is_greedy(params):
    for step in range(20):
        logits = logits_like(step)
        sampler = Sampler.from_requests([params] * 4, V)
        assert torch.equal(sampler.sample(logits).tokens, logits.argmax(-1))


def test_mixed_batch_greedy_rows_stay_argmax():
    logits = logits_like(2, batch=4)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.5, seed=3),
              SamplingParams(temperature=0), SamplingParams(top_p=0.9, seed=4)]
    sampler = Sampler.from_requests(params, V)
    for _ in range(10):
        tokens = sampler.sample(logits).tokens
        assert tokens[0] == logits[0].argmax() and tokens[2] == logits[2].argmax()


FOUR = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()


def test_min_p_drops_tokens_below_fraction_of_top():
    # Threshold 0.25 × 0.5 = 0.125: tokens 0..2 pass, token 3 (0.05) never appears.
    seen = set(draws(SamplingParams(min_p=0.25, seed=7), FOUR, 2000).tolist())
    assert seen == {0, 1, 2}
    # Threshold 0.6 × 0.5 = 0.3: token 1 (exactly 0.3) passes, 2 and 3 do not.
    assert set(draws(SamplingParams(min_p=0.6, seed=7), FOUR, 500).tolist()) == {0, 1}


def test_top_k_keeps_k_most_likely():
    assert set(draws(SamplingParams(top_k=2, seed=5), FOUR, 1000).tolist()) == {0, 1}
    assert set(draws(SamplingParams(top_k=3, seed=5), FOUR, 1000).tolist()) == {0, 1, 2}


def test_top_p_keeps_smallest_prefix_reaching_p_and_renormalises():
    # Mass before token 1 is 0.5 < 0.6 (kept); before token 2 it is 0.8 >= 0.6 (dropped).
    tokens = draws(SamplingParams(top_p=0.6, seed=11), FOUR, 4000)
    assert set(tokens.tolist()) == {0, 1}
    assert abs((tokens == 0).float().mean().item() - 0.5 / 0.8) < 0.03
    # p = 0.5 exactly: the first token alone reaches it.
    assert set(draws(SamplingParams(top_p=0.5, seed=11), FOUR, 300).tolist()) == {0}


@pytest.mark.parametrize("temperature, expected", [(1.0, [0.2, 0.3, 0.5]),
                                                   (0.5, [0.04 / 0.38, 0.09 / 0.38, 0.25 / 0.38])])
def test_temperature_sampling_frequencies(temperature, expected):
    logits = torch.tensor([0.2, 0.3, 0.5]).log() + 4.0   # an offset changes nothing
    tokens = draws(SamplingParams(temperature=temperature, seed=1234), logits, 4000)
    freq = torch.bincount(tokens, minlength=3).float() / len(tokens)
    # Standard error is at most sqrt(0.25 / 4000) ≈ 0.008; 0.03 is ~4 of them.
    assert torch.allclose(freq, torch.tensor(expected), atol=0.03), freq


# --- penalties ---------------------------------------------------------------------------------------------

def test_penalties_match_hand_computation():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
    params = SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0)
    # prompt [1]; generated so far [0, 0, 3] → counts {0: 2, 3: 1}; seen {0, 1, 3}.
    sampler = Sampler.from_requests([params], 5, prompts=[[1]], outputs=[[0, 0, 3]])
    got = sampler.apply_penalties(logits)
    expected = torch.tensor([[
        2.0 / 2 - 0.25 * 2 - 0.5,   # seen, positive: divided; generated twice
        -1.0 * 2,                   # in the prompt only: repetition penalty, no presence/frequency
        0.5,                        # never seen
        3.0 / 2 - 0.25 * 1 - 0.5,   # generated once
        -2.0,
    ]])
    assert torch.allclose(got, expected)
    # Greedy picks from the penalised logits (token 3 at 0.75), and counts it incrementally.
    assert sampler.sample(logits).tokens.item() == 3
    assert sampler.counts[0].tolist() == [2, 0, 0, 2, 0]
    assert torch.allclose(sampler.apply_penalties(logits)[0, 3], torch.tensor(3.0 / 2 - 0.25 * 2 - 0.5))


def test_negative_penalties_and_untouched_neighbours():
    logits = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    params = [SamplingParams(presence_penalty=-1.0, frequency_penalty=-0.5), SamplingParams()]
    sampler = Sampler.from_requests(params, 3, outputs=[[2, 2, 2], [2, 2, 2]])
    got = sampler.apply_penalties(logits)
    assert torch.allclose(got[0], torch.tensor([1.0, 1.0, 1.0 + 1.0 + 0.5 * 3]))
    assert torch.equal(got[1], logits[1])   # a row without penalties is left exactly as it was


def test_counts_survive_batch_recomposition():
    p = SamplingParams(temperature=0, frequency_penalty=1.0)
    a, b = SamplerState(p, 4), SamplerState(SamplingParams(temperature=0), 4)
    first = Sampler([a, b])
    first.sample(torch.tensor([[0.0, 0.0, 5.0, 0.0], [0.0, 0.0, 0.0, 9.0]]))
    assert a.counts.tolist() == [0, 0, 1, 0]          # the state sees the Sampler's update (a view)
    c = SamplerState(SamplingParams(temperature=0, presence_penalty=2.0), 4, prompt_ids=[0])
    second = Sampler([c, a])                           # b left, c joined, a moved to row 1
    out = second.sample(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 5.0, 0.0]]))
    assert out.tokens.tolist() == [0, 2]
    assert a.counts.tolist() == [0, 0, 2, 0] and c.counts.tolist() == [1, 0, 0, 0]
    assert torch.allclose(second.apply_penalties(torch.zeros(2, 4)),
                          torch.tensor([[-2.0, 0, 0, 0], [0, 0, -2.0, 0]]))


# --- randomness --------------------------------------------------------------------------------------------

SEEDED = SamplingParams(temperature=0.9, top_p=0.95, top_k=30, seed=2024, frequency_penalty=0.3)


def seeded_run(compose, steps=24):
    """Tokens of the SEEDED request when `compose(step, state)` decides the batch around it."""
    target = SamplerState(SEEDED, V)
    tokens, sampler, rows = [], None, None
    for step in range(steps):
        new_rows = compose(step, target)
        if new_rows is not rows:
            rows, sampler = new_rows, Sampler(new_rows)
        logits = torch.randn(len(rows), V) * 2                      # other rows: anything
        logits[rows.index(target)] = logits_like(100 + step, batch=1)[0]
        tokens.append(sampler.sample(logits).tokens[rows.index(target)].item())
    return tokens


def test_seeded_row_independent_of_batch():
    fixed = {}
    alone = seeded_run(lambda step, t: fixed.setdefault("alone", [t]))
    others = [SamplerState(SamplingParams(temperature=1.3), V), SamplerState(SamplingParams(temperature=0), V),
              SamplerState(SamplingParams(seed=9, min_p=0.1, repetition_penalty=1.5), V)]

    def crowded(step, t):
        return fixed.setdefault("crowded", [others[0], others[1], t, others[2]])

    batches = {}

    def churning(step, t):   # rows join and leave every few steps; the target changes position
        key = step // 5
        if key not in batches:
            fresh = [SamplerState(SamplingParams(temperature=0.7, top_k=5), V) for _ in range(key % 3)]
            batches[key] = [*fresh, t] if key % 2 else [t, *fresh]
        return batches[key]

    assert len(set(alone)) > 3   # it really samples
    assert seeded_run(crowded) == alone
    assert seeded_run(churning) == alone


def test_unseeded_rows_follow_pythons_random_seed():
    def run():
        random.seed(77)
        sampler = Sampler.from_requests([SamplingParams(), SamplingParams()], V)
        return [sampler.sample(logits_like(s, batch=2)).tokens.tolist() for s in range(20)]

    first, second = run(), run()
    assert first == second
    assert [a for a, _ in first] != [b for _, b in first]   # the two rows have different streams
    random.seed()


# --- logprobs ----------------------------------------------------------------------------------------------

def test_logprobs_are_raw_model_distribution():
    logits = logits_like(3, batch=2)
    params = [SamplingParams(temperature=0.3, presence_penalty=1.0, logprobs=3, seed=1),
              SamplingParams(temperature=0, logprobs=0)]
    out = Sampler.from_requests(params, V, outputs=[[int(logits[0].argmax())], []]).sample(logits)
    raw = logits.log_softmax(-1)
    assert torch.allclose(out.logprobs.chosen, raw.gather(-1, out.tokens[:, None]).squeeze(-1))
    assert out.logprobs.top_ids.shape == (2, 3)
    assert torch.equal(out.logprobs.top_ids, raw.topk(3).indices)
    assert torch.allclose(out.logprobs.top_logprobs, raw.topk(3).values)


def test_no_logprobs_unless_asked():
    assert Sampler.from_requests([SamplingParams(temperature=0)], V).sample(logits_like(0, 1)).logprobs is None


# --- parameters --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": 2.5}, "Invalid 'temperature': decimal above maximum value. Expected a value <= 2, but got 2.5"),
    ({"temperature": -0.1}, "Invalid 'temperature': decimal below minimum value. Expected a value >= 0"),
    ({"temperature": "hot"}, "Invalid type for 'temperature': expected a number, but got a string instead."),
    ({"temperature": math.nan}, "Invalid 'temperature': expected a finite number"),
    ({"top_p": 0}, "Invalid 'top_p': decimal below minimum value. Expected a value > 0, but got 0 instead."),
    ({"top_p": 1.01}, "Invalid 'top_p': decimal above maximum value. Expected a value <= 1"),
    ({"top_k": -2}, "Invalid 'top_k': integer below minimum value. Expected a value >= -1"),
    ({"top_k": 2.5}, "Invalid type for 'top_k': expected an integer, but got a decimal instead."),
    ({"min_p": 1.5}, "Invalid 'min_p'"),
    ({"presence_penalty": -2.1}, "Invalid 'presence_penalty': decimal below minimum value"),
    ({"frequency_penalty": 3}, "Invalid 'frequency_penalty': decimal above maximum value. Expected a value <= 2"),
    ({"repetition_penalty": 0}, "Invalid 'repetition_penalty': decimal below minimum value. Expected a value > 0"),
    ({"max_tokens": 0}, "Invalid 'max_tokens': integer below minimum value. Expected a value >= 1, but got 0"),
    ({"max_tokens": True}, "Invalid type for 'max_tokens': expected an integer, but got a boolean instead."),
    ({"seed": 1.0}, "Invalid type for 'seed'"),
    ({"stop": ["x"] * 17}, "Invalid 'stop': array too long. Expected an array with maximum length 16, "
                           "but got an array with length 17 instead."),
    ({"stop": ["ok", ""]}, "Invalid 'stop[1]': empty string"),
    ({"stop_token_ids": [3, -1]}, "Invalid 'stop_token_ids[1]': integer below minimum value"),
    ({"logprobs": 21}, "Invalid 'logprobs': integer above maximum value. Expected a value <= 20"),
    ({"ignore_eos": 1}, "Invalid type for 'ignore_eos': expected a boolean"),
])
def test_validation_errors(kwargs, message):
    with pytest.raises(BadInputError) as err:
        SamplingParams(**kwargs).validate()
    assert message in str(err.value)


def test_valid_params_and_normalisation():
    p = SamplingParams(temperature=2, top_p=1, top_k=-1, min_p=1, presence_penalty=-2, frequency_penalty=2,
                       repetition_penalty=1.3, seed=-5, stop="###", stop_token_ids=[0], logprobs=20)
    assert p.validate() is p and p.stop == ["###"]
    assert SamplingParams(stop=None).stop == []
    assert SamplingParams(stop_token_ids=[7]).finish_token_ids([2]) == {2, 7}
    assert SamplingParams(stop_token_ids=[7], ignore_eos=True).finish_token_ids([2]) == {7}
    # A state validates, so a bad request can't reach the batch.
    with pytest.raises(BadInputError):
        SamplerState(SamplingParams(top_p=0), V)
    with pytest.raises(BadInputError):
        SamplerState(SamplingParams(repetition_penalty=1.2), V, prompt_ids=[V])


@pytest.mark.parametrize("field", ["temperature", "top_p", "repetition_penalty"])
def test_positive_values_that_vanish_in_float32_are_refused(field):
    """5e-324 passes a `> 0` check but is 0 in the sampler's float32: it must be a 400, not a failed step."""
    with pytest.raises(BadInputError, match="too small"):
        SamplingParams(max_tokens=4, **{field: 5e-324}).validate()


def test_top_p_candidates_give_the_full_sorts_nucleus(monkeypatch):
    # Sampler._nucleus orders only the TOP_P_CANDIDATES most likely tokens; rows whose candidates hold less
    # than top_p (flat ones) sort everything. Set against the plain full-sort rule on peaked rows, flat rows
    # that need the fallback, and a row without top_p.
    from nanoseek.engine import sampling

    monkeypatch.setattr(sampling, "TOP_P_CANDIDATES", 8)
    g = torch.Generator().manual_seed(3)
    vocab = 64
    x = torch.cat([torch.randn(3, vocab, generator=g) * 4,        # peaked: the nucleus sits in the top 8
                   torch.randn(3, vocab, generator=g) * 0.1])     # flat: the top 8 hold ~1/8 of the mass
    top_p = [0.9, 0.5, 0.99, 0.9, 0.5, 1.0]
    sampler = Sampler.from_requests([SamplingParams(top_p=p, seed=i) for i, p in enumerate(top_p)], vocab)
    got = torch.isfinite(sampler._nucleus(x.clone()))

    def reference(row, p):
        if p >= 1:
            return torch.ones(vocab, dtype=torch.bool)
        ordered, order = row.sort(descending=True)
        q = ordered.softmax(-1)
        return torch.zeros(vocab, dtype=torch.bool).scatter(0, order, (q.cumsum(-1) - q) < p)

    want = torch.stack([reference(x[i], p) for i, p in enumerate(top_p)])
    assert torch.equal(got, want)
    assert got[3].sum() > 8 and got[:3].sum(-1).max() <= 8   # the flat rows did need more than the candidates

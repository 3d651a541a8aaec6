"""Logits → next tokens for a batch of requests, each row with its own sampling parameters.

Owns three things:
  * `SamplingParams`: what one request asks for, and its OpenAI-worded validation: the one copy of each
    sampling rule, which the engine, scheduler, CLI, eval, GRPO and the HTTP schemas all call.
  * `SamplerState`: one request's running state — output-token counts (frequency/presence penalties), the
    set of seen tokens (repetition penalty) and its random generator. It outlives any one batch, so a request
    can leave a batch and join another (continuous batching, preemption) without losing its history or its
    random stream.
  * `Sampler`: one batch composition. It stacks its states' vectors into [B, V] tensors once and, each step,
    turns logits [B, V] into tokens [B] with batched tensor ops, then records the tokens into those tensors.
    Each state's vectors are rebound to views of the stacked rows, so the state sees every update without a
    copy back; building the next Sampler from (some of) the same states copies them into its own stack.

Per-step pipeline (rows needing a step skip it only when no row in the batch needs it):
    repetition penalty → presence/frequency penalties → greedy argmax | temperature → top_k → top_p → min_p
    → one inverse-CDF draw per row.
Penalty order follows vLLM (repetition first); the formulas are OpenAI's (presence: −p if the token was
generated at least once; frequency: −f·count, counts over generated tokens only) and HF/vLLM's repetition
penalty (a seen token's logit is divided by r if positive, multiplied by r if not; seen = prompt + output).

Randomness: every row draws exactly one uniform number per sampled step from its own CPU `torch.Generator`
(seeded from `params.seed`, or from Python's `random` for unseeded requests), and picks the token by
inverse CDF. So a seeded request's tokens do not depend on what else is in the batch, nor on the device
the logits live on (up to the device's float arithmetic). Greedy rows never draw.

Logprobs are those of the raw model distribution: log_softmax of the logits handed in, before penalties,
temperature and truncation — what OpenAI and vLLM (its default) report. They describe the model, not the
sampler, and stay finite for tokens the filters removed.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from nanoseek.errors import BadInputError

MAX_STOP_STRINGS = 16
MAX_LOGPROBS = 20
F32 = torch.finfo(torch.float32)   # the sampler's arithmetic, whatever dtype the logits arrive in
TOP_P_CANDIDATES = 1024            # top-p orders these first (Sampler._nucleus)
OVERFLOW_DIVISOR = 1e-6            # below this, a temperature or repetition penalty may overflow the logits



# ---------------------------------------------------------------------------------------------------------
# Parameters


@dataclass
class SamplingParams:
    """One request's sampling parameters. Defaults are OpenAI's (max_tokens is ours).

    temperature 0 means greedy. top_k 0 (or -1, vLLM's spelling) means off. `stop` may also be given as one
    string or None (OpenAI accepts both); it is normalised to a list. logprobs: None = no logprobs, n = the
    chosen token's logprob plus the n most likely tokens' (0 = only the chosen one's).
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None

    def __post_init__(self):
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_counts(self) -> bool:
        """Needs output-token counts (presence or frequency penalty)."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0

    @property
    def uses_seen(self) -> bool:
        """Needs the set of prompt+output tokens (repetition penalty)."""
        return self.repetition_penalty != 1

    def finish_token_ids(self, eos_token_ids: Sequence[int] = ()) -> set[int]:
        """Token ids that end this request: its stop_token_ids, plus the model's EOS unless ignore_eos."""
        ids = set(self.stop_token_ids)
        if not self.ignore_eos:
            ids.update(eos_token_ids)
        return ids

    def validate(self) -> SamplingParams:
        """Raise BadInputError for the first out-of-range field; return self so calls can chain."""
        check_integer("max_tokens", self.max_tokens, ge=1)
        _number("temperature", self.temperature, ge=0, le=2)
        if self.temperature != 0:      # 0 means greedy; any other value divides the logits
            _normal_f32("temperature", self.temperature, "; use 0 for greedy decoding")
        _number("top_p", self.top_p, gt=0, le=1)
        _normal_f32("top_p", self.top_p)
        check_integer("top_k", self.top_k, ge=-1)
        _number("min_p", self.min_p, ge=0, le=1)
        _number("presence_penalty", self.presence_penalty, ge=-2, le=2)
        _number("frequency_penalty", self.frequency_penalty, ge=-2, le=2)
        # Unbounded by OpenAI, but above F32.max it is inf in float32, and a seen logit of 0 times inf is NaN.
        _number("repetition_penalty", self.repetition_penalty, gt=0, le=F32.max)
        _normal_f32("repetition_penalty", self.repetition_penalty)
        if self.seed is not None:
            check_integer("seed", self.seed)
        _array("stop", self.stop, max_len=MAX_STOP_STRINGS)
        for i, s in enumerate(self.stop):
            if not isinstance(s, str):
                raise BadInputError(f"Invalid type for 'stop[{i}]': expected a string, but got {json_kind(s)} instead.")
            if not s:
                raise BadInputError(f"Invalid 'stop[{i}]': empty string. Expected a string with minimum length 1, "
                                    "but got an empty string instead.")
        _array("stop_token_ids", self.stop_token_ids)
        for i, t in enumerate(self.stop_token_ids):
            check_integer(f"stop_token_ids[{i}]", t, ge=0)
        if not isinstance(self.ignore_eos, bool):
            raise BadInputError(f"Invalid type for 'ignore_eos': expected a boolean, but got {json_kind(self.ignore_eos)} "
                                "instead.")
        if self.logprobs is not None:
            check_integer("logprobs", self.logprobs, ge=0, le=MAX_LOGPROBS)
        return self


def json_kind(value) -> str:
    """OpenAI's names for JSON types, as used in its 'Invalid type' errors."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _bounds(name: str, value, word: str, ge=None, gt=None, le=None) -> None:
    def fail(side: str, rel: str, bound) -> None:
        raise BadInputError(f"Invalid '{name}': {word} {side} value. Expected a value {rel} {bound}, "
                            f"but got {value} instead.")

    if ge is not None and value < ge:
        fail("below minimum", ">=", ge)
    if gt is not None and value <= gt:
        fail("below minimum", ">", gt)
    if le is not None and value > le:
        fail("above maximum", "<=", le)


def _number(name: str, value, **bounds) -> None:
    # bool is an int subclass; `True` as a temperature is a client bug, not 1.0.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadInputError(f"Invalid type for '{name}': expected a number, but got {json_kind(value)} instead.")
    if not math.isfinite(value):
        raise BadInputError(f"Invalid '{name}': expected a finite number, but got {value} instead.")
    _bounds(name, value, "decimal", **bounds)


def _normal_f32(name: str, value: float, hint: str = "") -> None:
    """The one rule for the positive values the sampler divides by or compares against in float32
    (temperature, top_p, repetition_penalty): they must be normal float32 numbers, >= F32.tiny (1.18e-38).

    Below that a value is 0 there (a division by zero: inf/NaN logits, then an out-of-range token) or
    subnormal, which devices may flush to 0 (GPU kernels built with flush-to-zero, CPU under
    torch.set_flush_denormal) and which has lost most of its precision anyway. The sampler is written so
    that every normal value is safe: it divides max-shifted logits by the temperature and clamps the
    penalised ones (see `Sampler._draw`), so a tiny temperature or penalty cannot overflow into NaN."""
    if 0 < value < F32.tiny:
        raise BadInputError(f"Invalid '{name}': {value} is too small. Sampling computes in float32, where a "
                            f"positive value must be at least {F32.tiny:.4g}{hint}.")


def check_integer(name: str, value, **bounds) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadInputError(f"Invalid type for '{name}': expected an integer, but got {json_kind(value)} instead.")
    _bounds(name, value, "integer", **bounds)


def _array(name: str, value, max_len: int | None = None) -> None:
    if not isinstance(value, (list, tuple)):
        raise BadInputError(f"Invalid type for '{name}': expected an array, but got {json_kind(value)} instead.")
    if max_len is not None and len(value) > max_len:
        raise BadInputError(f"Invalid '{name}': array too long. Expected an array with maximum length {max_len}, "
                            f"but got an array with length {len(value)} instead.")


# ---------------------------------------------------------------------------------------------------------
# Per-request state


class SamplerState:
    """One request's sampling state, kept across batch compositions.

    counts: [V] float32 output-token counts, only when the request has a presence/frequency penalty.
    seen:   [V] bool, prompt+output tokens, only when it has a repetition penalty.
    generator: CPU generator, advanced by exactly one draw per sampled (non-greedy) step.
    vocab_size must be the width of the logits (the model's padded vocab), not the tokenizer's, and device
    the logits' device. Keep the state object across preemption to resume exactly; `output_ids` only
    rebuilds the counts from ids (the generator then restarts from its seed).
    """

    def __init__(self, params: SamplingParams, vocab_size: int, prompt_ids: Sequence[int] = (),
                 output_ids: Sequence[int] = (), device: torch.device | str = "cpu"):
        self.params = params.validate()
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        # Unseeded requests draw their seed from Python's `random`, so `random.seed(n)` makes a whole run
        # (a benchmark, a test) reproducible without a sampler-specific global.
        seed = params.seed if params.seed is not None else random.getrandbits(64)
        # CPU generator: one tiny draw per step is cheaper there than a kernel launch, and the stream is the
        # same whichever device the logits are on.
        self.generator = torch.Generator().manual_seed(seed % 2**64)
        self.counts = None
        self.seen = None
        if params.uses_counts:
            self.counts = self._bincount(output_ids).float()
        if params.uses_seen:
            self.seen = self._bincount([*prompt_ids, *output_ids]) > 0

    def _bincount(self, ids: Sequence[int]) -> torch.Tensor:
        ids = torch.as_tensor(list(ids), dtype=torch.long, device=self.device)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise BadInputError(f"token id outside the vocabulary of {self.vocab_size}")
        return torch.bincount(ids, minlength=self.vocab_size)


# ---------------------------------------------------------------------------------------------------------
# The batched step


@dataclass
class Logprobs:
    """Raw-model logprobs for a batch. K = the largest `logprobs` any row asked for; a row that asked for
    fewer (or None) takes its first n columns (or ignores the lot)."""

    chosen: torch.Tensor        # [B] logprob of the sampled token
    top_ids: torch.Tensor       # [B, K] most likely tokens, most likely first
    top_logprobs: torch.Tensor  # [B, K]


@dataclass
class SampleOutput:
    tokens: torch.Tensor            # [B] long, on the logits' device
    logprobs: Logprobs | None = None


class Sampler:
    """One batch composition: row i of the logits belongs to states[i].

    Build a new Sampler whenever rows join or leave; `sample` every step in between. A state must be used by
    one live Sampler at a time (the newest one built from it), since its vectors are views of that Sampler's
    stacked rows.
    """

    def __init__(self, states: Sequence[SamplerState]):
        if not states:
            raise ValueError("a Sampler needs at least one row")
        self.states = list(states)
        params = [s.params for s in self.states]
        self.vocab_size = V = self.states[0].vocab_size
        self.device = dev = self.states[0].device
        if any(s.vocab_size != V or s.device != dev for s in self.states):
            raise ValueError("all rows of a Sampler must share vocab size and device")
        B = len(params)
        self._rows = torch.arange(B, device=dev)

        def col(values, dtype=torch.float32) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=dev)

        # Penalty state: stacked once, then each state's vector becomes a view of its row.
        self.counts = self.seen = None
        if any(p.uses_counts for p in params):
            self.counts = torch.stack([s.counts if s.counts is not None else torch.zeros(V, device=dev)
                                       for s in self.states])
            self._presence = col([p.presence_penalty for p in params])
            self._frequency = col([p.frequency_penalty for p in params])
        if any(p.uses_seen for p in params):
            self.seen = torch.stack([s.seen if s.seen is not None else torch.zeros(V, dtype=torch.bool, device=dev)
                                     for s in self.states])
            self._repetition = col([p.repetition_penalty for p in params])
        for i, s in enumerate(self.states):
            if s.counts is not None:
                s.counts = self.counts[i]
            if s.seen is not None:
                s.seen = self.seen[i]

        greedy = [p.greedy for p in params]
        self._all_greedy = all(greedy)
        self._any_greedy = any(greedy)
        self._greedy = col(greedy, torch.bool)
        # Greedy rows divide by 1 so the shared division stays finite; their draw is discarded anyway.
        self._temperature = col([p.temperature or 1.0 for p in params])
        # Only a divisor this small can overflow float32 with real logits (|x| / 1e-6 stays finite up to
        # |x| = 3.4e32): batches without one keep the plain division, the decode step's common case.
        self._guard_overflow = any(0 < p.temperature < OVERFLOW_DIVISOR or p.repetition_penalty < OVERFLOW_DIVISOR
                                   for p in params)
        k = [min(p.top_k, V) if p.top_k > 0 and not p.greedy else 0 for p in params]
        self._k_max = max(k)
        self._k_index = col([max(x, 1) - 1 for x in k], torch.long)
        self._k_on = col([x > 0 for x in k], torch.bool)
        # top_p = 1 rows get an infinite threshold: float rounding in the cumulative sum must never drop a tail.
        self._any_top_p = any(p.top_p < 1 and not p.greedy for p in params)
        self._top_p = col([p.top_p if p.top_p < 1 else math.inf for p in params])
        self._any_min_p = any(p.min_p > 0 and not p.greedy for p in params)
        self._min_p = col([p.min_p for p in params])
        # Which rows draw a random number each step, and from which generator.
        self._drawing = [(i, s.generator) for i, s in enumerate(self.states) if not s.params.greedy]
        self._draw_index = torch.tensor([i for i, _ in self._drawing], dtype=torch.long)
        wanted = [p.logprobs for p in params if p.logprobs is not None]
        self._logprobs_k = min(max(wanted), V) if wanted else None

    @classmethod
    def from_requests(cls, params: Sequence[SamplingParams], vocab_size: int,
                      prompts: Sequence[Sequence[int]] | None = None,
                      outputs: Sequence[Sequence[int]] | None = None, device="cpu") -> Sampler:
        """Fresh states for a batch in one call (tests, one-shot generation)."""
        prompts = prompts or [()] * len(params)
        outputs = outputs or [()] * len(params)
        return cls([SamplerState(p, vocab_size, pr, out, device) for p, pr, out in zip(params, prompts, outputs)])

    @property
    def batch(self) -> int:
        return len(self.states)

    def sample(self, logits: torch.Tensor, *, allowed: torch.Tensor | None = None,
               record: bool = True) -> SampleOutput:
        """logits [B, V] (any float dtype) → tokens [B]. `allowed` [B, V] bool restricts each row's choice
        (a grammar's mask; every row must allow at least one token); logprobs still describe the unrestricted
        distribution. With record, the tokens are counted as generated (pass record=False and call `record`
        yourself if some sampled tokens may be thrown away)."""
        if logits.dim() != 2 or logits.shape[0] != self.batch or logits.shape[1] != self.vocab_size:
            raise ValueError(f"logits must be [{self.batch}, {self.vocab_size}], got {list(logits.shape)}")
        penalized = self.counts is not None or self.seen is not None
        if self._all_greedy and not penalized and allowed is None:
            tokens = logits.argmax(-1)      # the common case: one kernel, no per-row work
        else:
            x = self.apply_penalties(logits) if penalized else logits.float()
            if allowed is not None:
                x = x.masked_fill(~allowed, -math.inf)
            tokens = x.argmax(-1) if self._all_greedy else self._draw(x)
        out = SampleOutput(tokens, self._logprobs(logits, tokens) if self._logprobs_k is not None else None)
        if record:
            self.record(tokens)
        return out

    def verify(self, logits: torch.Tensor, drafts: torch.Tensor, active: torch.Tensor, *,
               allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, Logprobs | None]:
        """One position of a speculative verify step. logits [B, V]; drafts [B] the proposed token at this
        position (-1: none); active [B] bool, rows still verifying (every earlier draft accepted). Returns
        (tokens [B], accepted [B] bool, logprobs); inactive rows' entries are meaningless, and nothing is drawn
        from their generators or recorded for them.

        The proposals are deterministic (q puts all mass on the draft x), so the standard rule (Leviathan et
        al. 2023; Chen et al. 2023) reduces to: accept x with probability p(x), else draw from p with x
        removed. P(x) = p(x) and P(y) = (1 - p(x)) · p(y) / (1 - p(x)) = p(y): each row's output distribution
        is exactly that of plain sampling. Greedy rows accept x when it is the argmax."""
        penalized = self.counts is not None or self.seen is not None
        x = self.apply_penalties(logits) if penalized else logits.float()
        if allowed is not None:
            x = x.masked_fill(~allowed, -math.inf)
        tokens = x.argmax(-1)
        has = drafts >= 0
        accepted = has & (tokens == drafts)
        on = active.tolist()  # one read of the flags, not one device sync per sampling row
        rows = [(i, g) for i, g in self._drawing if on[i]]
        if rows:
            index = torch.tensor([i for i, _ in rows], dtype=torch.long)
            u = torch.zeros(self.batch, 2)
            u[index] = torch.stack([torch.rand(2, generator=g) for _, g in rows])
            u = u.to(x.device)
            probs = self._probs(x)
            d = drafts.clamp(min=0)[:, None]
            p_draft = probs.gather(-1, d).squeeze(-1)
            total = probs.sum(-1)
            take = has & (u[:, 0] * total < p_draft)
            rest = probs.scatter(-1, d, torch.where(has[:, None], 0.0, p_draft[:, None]))
            # p(x) == total up to rounding: nothing else to draw from, so x stands.
            take |= has & (rest.sum(-1) <= 0)
            drawn = torch.where(take, drafts, self._inverse_cdf(rest, u[:, 1]))
            sampling = torch.zeros(self.batch, dtype=torch.bool, device=x.device)
            sampling[index.to(x.device)] = True
            tokens = torch.where(sampling, drawn, tokens)
            accepted = torch.where(sampling, take, accepted)
        lp = self._logprobs(logits, tokens) if self._logprobs_k is not None else None
        if penalized:
            self.record(tokens, active.nonzero().squeeze(-1))
        return tokens, accepted, lp

    def record(self, tokens: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Count tokens [B] (one per row) as generated; with `rows`, only those rows' tokens. Pairs (row,
        token) are distinct, so a plain indexed add is exact."""
        if rows is None:
            rows = self._rows
        else:
            tokens = tokens[rows]
        if self.counts is not None:
            self.counts[rows, tokens] += 1
        if self.seen is not None:
            self.seen[rows, tokens] = True

    # -- steps ------------------------------------------------------------------------------------------

    def apply_penalties(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, V] → float32 logits after the repetition, frequency and presence penalties, given the
        tokens recorded so far (a new tensor; the input is left alone)."""
        x = logits.float()
        if self.seen is not None:
            r = self._repetition[:, None]
            x = torch.where(self.seen, torch.where(x > 0, x / r, x * r), x)
        if self.counts is not None:
            x = x - self._frequency[:, None] * self.counts - self._presence[:, None] * (self.counts > 0)
        return x

    def _draw(self, x: torch.Tensor) -> torch.Tensor:
        greedy_tokens = x.argmax(-1) if self._any_greedy else None
        tokens = self._inverse_cdf(self._probs(x))
        return torch.where(self._greedy, greedy_tokens, tokens) if self._any_greedy else tokens

    def _probs(self, x: torch.Tensor) -> torch.Tensor:
        """Penalized logits [B, V] → each row's sampling weights after temperature, top_k, top_p and min_p
        (not renormalized after min_p: draws scale by each row's total)."""
        # With a tiny temperature or penalty in the batch (see _guard_overflow): shift each row so its largest
        # logit is 0, then divide: the quotient is <= 0 and can only overflow
        # to -inf (probability 0, the right limit), never to +inf, whose inf - inf in the softmax is NaN.
        # x / T alone overflows once |x| > T·3.4e38, i.e. for any logit > 4 at temperature 1.2e-38. The
        # clamp keeps the shift finite when a repetition penalty < 1 has already pushed a logit to ±inf.
        if self._guard_overflow:
            x = x.clamp(-F32.max, F32.max)
            x = (x - x.amax(-1, keepdim=True)) / self._temperature[:, None]
        else:
            x = x / self._temperature[:, None]
        if self._k_max:
            # Keep logits >= the row's k-th largest (ties at the boundary survive, as in vLLM/HF).
            kth = x.topk(self._k_max, dim=-1).values.gather(-1, self._k_index[:, None])
            x = x.masked_fill((x < kth) & self._k_on[:, None], -math.inf)
        if self._any_top_p:
            x = self._nucleus(x)
        probs = x.softmax(-1)
        if self._any_min_p:
            # Relative to the most likely token, so truncation by top_k/top_p (a renormalisation) doesn't
            # change which tokens pass. No renormalisation needed: the draw scales by the remaining mass.
            probs = probs.masked_fill(probs < self._min_p[:, None] * probs.amax(-1, keepdim=True), 0)
        return probs

    def _nucleus(self, x: torch.Tensor) -> torch.Tensor:
        """Top-p: keep the smallest most-likely prefix whose mass reaches top_p; a token goes when the mass
        strictly before it already does, so the first token always stays (top_p > 0). Rows without top_p
        (inf) keep everything. Only the TOP_P_CANDIDATES most likely tokens are ordered: once they hold top_p
        of the mass, every later token has at least that much before it and goes, so the result is the full
        sort's. Rows where they do not (very flat distributions) sort the whole vocabulary. The full sort of
        64 × 49k logits costs ~200 ms a step on a CPU core, the top-1024 ~30 ms."""
        cut = self._top_p[:, None]
        p = x.softmax(-1)
        top, index = p.topk(min(TOP_P_CANDIDATES, x.shape[-1]), dim=-1)
        keep = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, index, (top.cumsum(-1) - top) < cut)
        keep |= torch.isinf(cut)
        flat = (torch.isfinite(cut) & (top.sum(-1, keepdim=True) < cut)).squeeze(-1)
        if bool(flat.any()):
            rows = flat.nonzero().squeeze(-1)
            ordered, order = x[rows].sort(dim=-1, descending=True)
            q = ordered.softmax(-1)
            keep[rows] = torch.zeros_like(ordered, dtype=torch.bool).scatter_(-1, order,
                                                                              (q.cumsum(-1) - q) < cut[rows])
        return x.masked_fill(~keep, -math.inf)

    def _inverse_cdf(self, probs: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
        """One token per row, drawn from its weights `probs` with uniforms `u` [B] (default: one fresh draw
        from each sampling row's generator)."""
        if u is None:
            u = torch.zeros(self.batch)
            u[self._draw_index] = torch.cat([torch.rand(1, generator=g) for _, g in self._drawing])
        cdf = probs.cumsum(-1)
        total = cdf[:, -1:]
        # u < 1, but u·total can round up to total; keep it strictly below so the search stays in range.
        target = torch.minimum(u.to(probs.device)[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
        tokens = torch.searchsorted(cdf, target, right=True).squeeze(-1)
        # The first index whose cdf exceeds the target has positive mass when the cdf is monotone. A parallel
        # scan may round non-monotonically across a removed (zero-mass) token; never emit one: fall back to the
        # row's most likely token in that (~1e-7) case.
        ok = probs.gather(-1, tokens[:, None]).squeeze(-1) > 0
        return torch.where(ok, tokens, probs.argmax(-1))

    def _logprobs(self, logits: torch.Tensor, tokens: torch.Tensor) -> Logprobs:
        lp = logits.float().log_softmax(-1)
        chosen = lp.gather(-1, tokens[:, None]).squeeze(-1)
        top = lp.topk(self._logprobs_k, dim=-1)
        return Logprobs(chosen, top.indices, top.values)

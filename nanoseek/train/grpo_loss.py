"""The GRPO objective and its published variants, as pure tensor functions (no model, no engine).

GRPO (DeepSeekMath §4.1; DeepSeek-R1 §2.2.1) replaces PPO's critic with the group: G completions of the same
prompt are scored, and each completion's advantage is its reward relative to the group's. One loss with
switches covers the variants a user wants to ablate:

  advantage    r − mean(group) divided by the group's std (GRPO), the batch's std, or nothing (Dr. GRPO §3.1)
  clipping     ratio clipped to [1 − ε_low, 1 + ε_high]; ε_high > ε_low is DAPO's clip-higher
  KL           β · k3(π_ref ‖ π_θ) per token (Schulman's unbiased, always ≥ 0 estimator), dropped at β = 0
  aggregation  "grpo": mean over sequences of each sequence's token mean (length-biased, per Dr. GRPO);
               "dapo": sum over all tokens / number of tokens; "dr_grpo": token sum / (sequences × max length)

DeepSeek-V3.2's stability options (§3.1 of its report), opt-in:
  unbiased KL  k3 weighted by the importance ratio π_θ/π_old (not detached): the tokens were sampled from
               π_old, so E_old[ρ·k3] = E_θ[k3] = KL(π_θ ‖ π_ref), and its gradient is the KL's
  off-policy   a sequence with negative advantage whose mean per-token log(π_old/π_θ) exceeds a threshold
  masking      drops out of the surrogate: learning from one's own mistakes made under a policy too far
               from the current one destabilises (positive sequences always stay). π_old is the sampler's
               own log-prob where the rollout recorded it (`behaviour_logp`: the train–inference gap V3.2
               guards against), else the trainer's recomputation at the first pass
  sampling     token_logprobs(…, allowed=): the log-probs are renormalised over the rollout's top-p/top-k
  mask         action space, so π_θ and π_old are compared on the distribution that was actually sampled
"""

from __future__ import annotations

from typing import Literal

import torch

Scale = Literal["group", "batch", "none"]
Aggregation = Literal["grpo", "dapo", "dr_grpo"]


def group_advantages(rewards: torch.Tensor, group_size: int, scale: Scale = "group",
                     eps: float = 1e-4) -> torch.Tensor:
    """rewards [N·G], grouped consecutively → advantages [N·G]. `eps` keeps groups whose rewards are all
    equal at advantage 0 (they carry no signal) instead of dividing 0 by 0."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.float().view(-1, group_size)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale == "group":
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        adv = adv / (r.std() + eps)
    elif scale != "none":
        raise ValueError(f"unknown advantage scaling {scale!r}: group, batch or none")
    return adv.view(-1)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(π_θ ‖ π_ref) from samples of π_θ: exp(ref − logp) − (ref − logp) − 1."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor,
                   allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(target) and the entropy of π at each position: logits [B, T, V], targets [B, T] → [B, T] each.
    In fp32: the ratio exp(logp − old_logp) amplifies rounding, and bf16 logits would make it drift from 1.
    `allowed` [B, T, V] bool: π is renormalised over those tokens only (keep sampling mask)."""
    logits = logits.float()
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    p = logp_all.exp()
    # 0 · log 0 = 0 for the masked-out tokens (their logp is -inf; the product would be NaN).
    entropy = -torch.where(p > 0, p * logp_all, torch.zeros_like(p)).sum(-1)
    return logp, entropy


def offpolicy_keep(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                   threshold: float, behaviour_logp: torch.Tensor | None = None) -> torch.Tensor:
    """V3.2's off-policy sequence mask [B]: 0 for a sequence with A < 0 whose mean over its tokens of
    log π_old − log π_θ (a sample estimate of KL(π_old ‖ π_θ)) exceeds `threshold`, else 1. Where
    `behaviour_logp` [B, T] is not NaN, it is π_old (the sampler's own log-probs)."""
    if behaviour_logp is not None:
        old_logp = torch.where(torch.isnan(behaviour_logp), old_logp, behaviour_logp.to(old_logp.dtype))
    n = mask.sum(1).clamp(min=1)
    divergence = ((old_logp - logp).detach() * mask).sum(1) / n
    return (~((advantages < 0) & (divergence > threshold))).to(logp.dtype)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              ref_logp: torch.Tensor | None = None, beta: float = 0.0, eps_low: float = 0.2,
              eps_high: float | None = None, aggregation: Aggregation = "dapo",
              max_len: int | None = None, num_tokens: float | None = None, unbiased_kl: bool = False,
              offpolicy_threshold: float | None = None,
              behaviour_logp: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped surrogate (negated, to minimise) over completion tokens.

    logp, old_logp, ref_logp, mask: [B, T] (mask 1 on completion tokens); advantages [B]. `old_logp` is the
    policy that sampled the completions: equal to logp (detached) on the first inner update, so the ratio is
    1 and the gradient is the plain policy gradient; it matters from the second of μ updates on.
    `num_tokens` replaces DAPO's divisor (this batch's token count) when the batch is one of several whose
    tokens must be normalized together (accumulation, data parallelism).
    `unbiased_kl`: the KL term is ρ·k3 (V3.2) instead of k3. `offpolicy_threshold`: V3.2's off-policy
    sequence masking (offpolicy_keep, π_old from `behaviour_logp` where given) on the surrogate; the KL term and
    the normalisers are unchanged.
    Returns the loss and metrics: kl (mean per token), clip fractions (low, high), ratio mean, and with
    masking the share of sequences masked."""
    eps_high = eps_low if eps_high is None else eps_high
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None].to(logp.dtype)
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)
    keep = None
    if offpolicy_threshold is not None:
        keep = offpolicy_keep(logp, old_logp, advantages.to(logp.dtype), mask, offpolicy_threshold, behaviour_logp)
        per_token = per_token * keep[:, None]
    kl = None
    if beta != 0.0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs the reference model's log-probabilities")
        kl = k3_kl(logp, ref_logp)
        if unbiased_kl:
            kl = ratio * kl
        per_token = per_token + beta * kl
    loss = aggregate(per_token, mask, aggregation, max_len, num_tokens)
    n = mask.sum().clamp(min=1)
    with torch.no_grad():
        metrics = {
            "clip_low": float((((ratio < 1 - eps_low) & (adv < 0)).to(mask.dtype) * mask).sum() / n),
            "clip_high": float((((ratio > 1 + eps_high) & (adv > 0)).to(mask.dtype) * mask).sum() / n),
            "ratio": float((ratio * mask).sum() / n),
            "kl": float((kl * mask).sum() / n) if kl is not None else 0.0,
        }
        if keep is not None:
            metrics["offpolicy_masked"] = float(1 - keep.mean())
    return loss, metrics


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: Aggregation, max_len: int | None = None,
              num_tokens: float | None = None):
    if how == "grpo":
        return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    if how == "dapo":
        return (per_token * mask).sum() / (num_tokens if num_tokens else mask.sum().clamp(min=1))
    if how == "dr_grpo":
        return (per_token * mask).sum() / (per_token.shape[0] * (max_len or per_token.shape[1]))
    raise ValueError(f"unknown loss aggregation {how!r}: grpo, dapo or dr_grpo")

"""Scheduling policy: which waiting requests get rows, and how this step's prefill budget is spent.

Pure decisions over small descriptions of the rows (no tensors, no model), so they are unit-tested on their
own, as nano-vllm keeps its scheduler apart from execution. engine/scheduler.py executes them;
engine/rows.py keeps the row layout they act on.

The rules:
  * admission is first come, first served, while rows are free;
  * prefill goes oldest request first, at most `budget` prompt tokens per step in total, so a long prompt is
    spread over several steps instead of stalling the rows that are decoding;
  * a prompt identical to one already in a row (GRPO's G samples of a prompt, eval's k samples, `n > 1`) is
    computed once: its twins copy the finished row instead of spending budget, and wait (spending nothing)
    while that row is still prefilling.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass


def admit_count(waiting: int, used: int, max_batch: int) -> int:
    """How many waiting requests to move into rows now."""
    return max(0, min(waiting, max_batch - used))


@dataclass(frozen=True)
class RowView:
    """What the policy sees of one occupied row."""

    rid: int            # request id: admission order, oldest first
    key: Hashable       # the prompt's identity (namespace and tokens): equal keys hold equal prompt KV
    remaining: int      # prompt tokens still to prefill; 0 = the prompt is in the cache (decoding)


@dataclass(frozen=True)
class Prefill:
    rid: int
    n: int              # prompt tokens to compute this step


@dataclass(frozen=True)
class CopyTwin:
    rid: int
    src: int            # the request whose finished prompt row is copied (and whose last logits are reused)


def plan_prefill(rows: Sequence[RowView], budget: int) -> list[Prefill | CopyTwin]:
    """This step's prefill work, in the order it must run (a copy may name a row prefilled earlier in the plan)."""
    done = {r.key: r.rid for r in sorted(rows, key=lambda r: r.rid) if r.remaining == 0}
    busy: set[Hashable] = set()
    plan: list[Prefill | CopyTwin] = []
    for r in sorted((r for r in rows if r.remaining > 0), key=lambda r: r.rid):
        if r.key in done:
            plan.append(CopyTwin(r.rid, done[r.key]))
        elif r.key in busy or budget <= 0:
            continue
        else:
            n = min(budget, r.remaining)
            plan.append(Prefill(r.rid, n))
            budget -= n
            if n == r.remaining:
                done[r.key] = r.rid
            else:
                busy.add(r.key)
    return plan

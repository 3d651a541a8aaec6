"""`Engine.generate`: offline generation (eval, GRPO rollouts, distillation traces, chat, `nanoseek generate`)
as a thin driver over the one decode loop, `Scheduler.step` (engine/scheduler.py), run on the caller's thread.

Offline callers differ from the server in three ways only: nothing bounds the queue (a 1,000-problem eval
submits everything at once and rows join as others finish), the context is the model's own rather than the
server's cap, and the prefix cache lives for one call only (GRPO changes the weights between calls, which
would make cached keys stale). Within a call it still pays: an eval's or a rollout's prompts share their system
prompt and template, which is most of a short prompt (~65 of ~80 tokens for the R1 arithmetic prompts). A
prompt repeated within a call (n samples, GRPO groups) is computed once: the loop copies its row
(engine/policy.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from nanoseek.engine.draft import Drafter
from nanoseek.engine.graphs import make_runner
from nanoseek.engine.request import Completion, Delta, check_prompt
from nanoseek.engine.sampling import SamplingParams
from nanoseek.engine.scheduler import Scheduler
from nanoseek.errors import BadInputError


class Engine:
    """Generation over one loaded model. Not thread-safe: one `generate` at a time."""

    def __init__(self, model: torch.nn.Module, tokenizer=None, *, max_batch: int = 64,
                 prefill_chunk: int = 512, eos_token_ids: Sequence[int] | None = None, compile: bool = False,
                 drafter: Drafter | None = None, draft_tokens: int = 6, cuda_graphs: bool = False,
                 prefix_cache_tokens: int = 2048):
        self.model = model
        self.prefix_cache_tokens = prefix_cache_tokens   # the per-call prefix cache's pool; 0 turns it off
        self.drafter, self.draft_tokens = drafter, draft_tokens  # speculative decoding (engine/draft.py)
        if compile:
            compile_blocks(model)
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        # cuda_graphs: static-shape decode steps replayed as CUDA graphs (engine/graphs.py); CPU ignores it.
        self.runner = make_runner(model, tokenizer, eos_token_ids, cuda_graphs=cuda_graphs)
        self._loop: Scheduler | None = None

    # The model's facts live once, on the runner (engine/step.py).
    @property
    def context(self) -> int:
        return self.runner.context

    @property
    def vocab_size(self) -> int:
        return self.runner.vocab_size

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def eos_token_ids(self) -> list[int]:
        return self.runner.eos_token_ids

    def check_prompt(self, prompt: Sequence[int]) -> None:
        check_prompt(prompt, self.context)

    @property
    def loop(self) -> Scheduler:
        """The decode loop, built on first use (its cache starts small and follows what runs)."""
        if self._loop is None:
            self._loop = Scheduler(self.model, self.tokenizer, max_batch=self.max_batch, max_len=self.context,
                                   max_queue=None, prefill_chunk=self.prefill_chunk,
                                   prefix_cache_tokens=self.prefix_cache_tokens,
                                   runner=self.runner, drafter=self.drafter, draft_tokens=self.draft_tokens)
        return self._loop

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
                 on_delta: Callable[[Delta], None] | None = None,
                 cancelled: Callable[[int], bool] | None = None, *, constraints: Sequence | None = None,
                 record_routing: bool = False) -> list[Completion]:
        """Generate for every prompt (token ids). `params` is one for all or one per prompt; `constraints`,
        if given, one `request.Constraint` (or None) per prompt. `on_delta` gets every delta with `index` =
        the prompt's index; `cancelled(index)` is polled every step. Returns the completions in prompt
        order."""
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(plist) != len(prompts):
            raise BadInputError(f"{len(prompts)} prompts but {len(plist)} sampling parameter sets")
        clist = list(constraints) if constraints is not None else [None] * len(prompts)
        if len(clist) != len(prompts):
            raise BadInputError(f"{len(prompts)} prompts but {len(clist)} constraints")
        for p, prompt in zip(plist, prompts):
            p.validate()
            self.check_prompt(prompt)
        loop = self.loop
        if loop.prefix is not None:   # the weights may have changed since the last call (module doc)
            loop.prefix.clear()
        index: dict[int, int] = {}

        def forward(d: Delta) -> None:
            d.index = index[d.index]
            on_delta(d)

        handles = []
        for i, (prompt, p, c) in enumerate(zip(prompts, plist, clist)):
            h = loop.submit(prompt, p, forward if on_delta is not None else None, stream=False,
                            constraint=c, record_routing=record_routing)
            index[h.id] = i
            handles.append(h)
        try:
            while not all(h.done for h in handles):
                if cancelled is not None:
                    for i, h in enumerate(handles):
                        if not h.done and cancelled(i):
                            h.cancel()
                loop.step()
        except BaseException as e:
            loop.abort(e)
            raise
        outs = [h.result() for h in handles]
        for i, out in enumerate(outs):
            out.index = i
        return outs


def compile_blocks(model: torch.nn.Module) -> None:
    """torch.compile each decoder block (dynamic shapes: batch and cache length vary step to step).

    Per-token decode of a small model is bound by per-op dispatch, not FLOPs: on 2 CPU cores SmolLM2 spends
    ~8 of its 15 ms per step outside the matmuls. Inductor fuses the norms, rotary and cache glue into a few
    C++ kernels (15.2 → 12.1 ms/step measured with int4 weights), at the price of ~20 s of compilation on
    first use; hence opt-in."""
    for layer in model.model.layers:
        layer.forward = torch.compile(layer.forward, dynamic=True)



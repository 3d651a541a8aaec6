"""A loaded model ready to talk: model + tokenizer + engine, and chat turns streamed as reasoning/content.

This is the one place that strings together loading (weights/), prompt rendering and the reasoning split
(chat.py) and generation (engine/). The CLI's `chat` and `generate` use it; the server will too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from nanoseek.chat import Prompt, ReasoningSplitter, render_prompt, split_reasoning
from nanoseek.engine.generate import Engine
from nanoseek.engine.request import Completion, Delta
from nanoseek.engine.sampling import SamplingParams
from nanoseek.errors import BadInputError, UnsupportedError


@dataclass
class LoadOptions:
    model: str = "smollm2-135m"
    device: str = "cpu"
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    quant: str = "auto"  # none | int8 | int8-group | int4 | auto (see auto_quant)
    threads: int | None = None
    compile: bool = False  # torch.compile the decoder blocks (faster decode, ~20 s warm-up)
    speculative: str | None = None  # mtp | ngram | draft=MODEL (engine/draft.py); None: plain decoding
    draft_tokens: int = 6           # drafts verified per step (at most 7)
    cuda_graphs: bool = False  # decode through engine/graphs.py's captured static-shape steps (CUDA only)
    # Single-row decode of quantized dense models through the fused native step (models/cpu_decode.py) where
    # the CPU has AVX-512 VNNI and g++ is installed; about 2x PyTorch's own quantized path at batch 1.
    native_decode: bool = True


@dataclass
class ChatTurn:
    reasoning: str | None
    content: str
    completion: Completion
    prompt: Prompt


def _dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise BadInputError(f"unknown dtype {name!r} (choose from {', '.join(table)})")
    return table[name]


def auto_quant(device: str, source_bits: float) -> str:
    """CPU decode is memory-bandwidth bound, so weight-only quantization is what makes it fast
    (benchmarks/quant_kernels.py, benchmarks/decode.py). A source already stored at ≤5 bits (Q4_0/Q4_1/Q4_K)
    loses nothing at int4 with group 32 — the same grid as Q4_1 — so it gets int4; anything finer gets
    int8 with per-32 group scales (0.6% per-layer error). On GPU we keep the loaded dtype."""
    if device != "cpu":
        return "none"
    return "int4" if source_bits <= 5.0 else "int8-group"


class Session:
    def __init__(self, opts: LoadOptions):
        from nanoseek.weights.registry import load_model

        if opts.threads:
            torch.set_num_threads(opts.threads)
        if opts.device.startswith("cuda") and not torch.cuda.is_available():
            raise UnsupportedError(f"device {opts.device!r}: this torch build sees no CUDA device")
        t0 = time.perf_counter()
        loaded = load_model(opts.model, dtype=_dtype(opts.dtype, opts.device), device=opts.device)
        self.model, self.tokenizer, self.name = loaded.model, loaded.tokenizer, loaded.name
        self.model.fuse()
        self.quant = auto_quant(opts.device, loaded.weight_bits) if opts.quant == "auto" else opts.quant
        # Why the fused native decode step is off (None: on); it packs the float weights, so it goes first.
        self.native_decode: str | None = "off (quantization none)" if self.quant == "none" else "off (option)"
        if self.quant != "none" and opts.native_decode:
            from nanoseek.models.cpu_decode import attach

            self.native_decode = attach(self.model, self.quant)
        if self.quant != "none":
            from nanoseek.models.quant import quantize_model

            quantize_model(self.model, self.quant)
        if self.tokenizer is None:
            raise BadInputError(f"{loaded.path}: no tokenizer files next to the weights; chat needs one")
        self.drafter = make_drafter(opts, self.model)
        self.engine = Engine(self.model, self.tokenizer, compile=opts.compile, drafter=self.drafter,
                             draft_tokens=opts.draft_tokens, cuda_graphs=opts.cuda_graphs)
        self.load_s = time.perf_counter() - t0

    def complete(self, prompts: Sequence[str], params: SamplingParams,
                 on_delta: Callable[[Delta], None] | None = None) -> list[Completion]:
        """Raw text completion (no chat template)."""
        ids = [self.tokenizer.encode(p) for p in prompts]
        return self.engine.generate(ids, params, on_delta=on_delta)

    def chat(self, messages: Sequence[dict], params: SamplingParams, *, thinking: bool | None = None,
             on_text: Callable[[str, str], None] | None = None,
             cancelled: Callable[[int], bool] | None = None) -> ChatTurn:
        """One assistant turn. on_text(reasoning_delta, content_delta) streams as tokens arrive."""
        prompt = render_prompt(self.tokenizer, messages, thinking=thinking)
        splitter = ReasoningSplitter(start_in_reasoning=prompt.starts_in_reasoning)

        def on_delta(d: Delta) -> None:
            r, c = splitter.feed(d.text) if d.text else ("", "")
            if d.finish_reason is not None:
                r2, c2 = splitter.flush()
                r, c = r + r2, c + c2
            if on_text is not None and (r or c):
                on_text(r, c)

        out = self.engine.generate([prompt.ids], params, on_delta=on_delta, cancelled=cancelled)[0]
        reasoning, content = split_reasoning(out.text, prompt.starts_in_reasoning)
        return ChatTurn(reasoning, content, out, prompt)


def make_drafter(opts: LoadOptions, model):
    """The drafter `opts.speculative` names, for `model` (None without one). A draft model is loaded the way
    the target was (device, dtype, quantization)."""
    from nanoseek.engine.draft import ModelDrafter, MTPDrafter, NgramDrafter

    spec = opts.speculative
    if not spec:
        return None
    if not 1 <= opts.draft_tokens <= 7:
        raise BadInputError(f"--draft-tokens must be between 1 and 7, got {opts.draft_tokens}")
    context = model.config.max_position_embeddings
    if spec == "ngram":
        return NgramDrafter()
    if spec == "mtp":
        return MTPDrafter(model, context)
    if spec.startswith("draft="):
        from nanoseek.weights.registry import load_model

        loaded = load_model(spec[len("draft="):], dtype=_dtype(opts.dtype, opts.device), device=opts.device)
        draft = loaded.model
        draft.fuse()
        quant = auto_quant(opts.device, loaded.weight_bits) if opts.quant == "auto" else opts.quant
        if quant != "none":
            from nanoseek.models.quant import quantize_model

            quantize_model(draft, quant)
        from nanoseek.engine.step import logits_width

        return ModelDrafter(draft, logits_width(model), context)
    raise BadInputError(f"--speculative {spec!r}: choose mtp, ngram or draft=MODEL")

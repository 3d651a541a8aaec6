"""FP8 weights as DeepSeek's released checkpoints store them: float8_e4m3fn with one fp32 scale per 128x128
block. Builds the fixtures of the FP8 loading tests (test_v32.py, test_v4.py)."""

from __future__ import annotations

import torch

from nanoseek.weights.hf import FP8_BLOCK


def fp8_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [R, C] → (q float8_e4m3fn [R, C], scale [⌈R/128⌉, ⌈C/128⌉] with each block's max at 448, and q
    dequantized by its scales in fp32: what loading must give back)."""
    rb, cb = -(-w.shape[0] // FP8_BLOCK), -(-w.shape[1] // FP8_BLOCK)
    amax = torch.stack([blk.abs().max() for row in w.split(FP8_BLOCK) for blk in row.split(FP8_BLOCK, 1)])
    scale = (amax / 448.0).view(rb, cb)
    full = scale.repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)[:w.shape[0], :w.shape[1]]
    q = (w / full).to(torch.float8_e4m3fn)
    return q, scale, q.float() * full

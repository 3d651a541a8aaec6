"""The hardware a run or benchmark reports it ran on: the CPU model (lscpu's "Model name") or the GPU."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux; empty elsewhere), e.g. {"avx512f", "amx_bf16", ...}."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def device_name() -> str:
    """The GPU when one is visible, else the CPU model."""
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else cpu_name()

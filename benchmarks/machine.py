"""What the benchmark scripts say about the machine they ran on (imported by the scripts beside it)."""

from __future__ import annotations

from nanoseek.machine import cpu_flags, cpu_name, device_name

__all__ = ["cpu_flags", "cpu_name", "device_name"]

import os

# OpenMP workers that spin-wait turn 2 threads on a shared 2-core machine into a 100-1000x slowdown
# whenever another process holds a core (measured: 8 ms vs 15 us for one small op). Must precede torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


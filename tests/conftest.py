import os

# OpenMP workers that spin-wait turn 2 threads on a shared 2-core machine into a 100-1000x slowdown
# whenever another process holds a core (measured: 8 ms vs 15 us for one small op). Must precede torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The data folder beside the project (gsm8k/, tinyshakespeare/): $NANOSEEK_DATA, else the checkout's
    sibling shared/data. Package code never looks there by itself; tests pass this path in as a user would."""
    env = os.environ.get("NANOSEEK_DATA")
    path = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not (path / "tinyshakespeare").is_dir():
        pytest.skip(f"test data not found at {path} (set NANOSEEK_DATA to the folder holding tinyshakespeare/)")
    return path

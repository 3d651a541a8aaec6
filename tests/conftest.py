import os

import pytest
import torch

# Deterministic, small thread count: CI has 2 cores and tests compare numbers, not speed.
torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def tmp_dir(tmp_path):
    return tmp_path

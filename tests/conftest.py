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


def _synthetic_text(n_paragraphs: int = 1500) -> str:
    """Seeded sentences from a small grammar: text with structure at the character, word and sentence level,
    for training tests that need some corpus but not a particular one."""
    import random

    rng = random.Random(0)
    subj = ["the king", "a lord", "my lady", "the fool", "our queen", "this knight", "his brother", "the people"]
    verb = ["speaks of", "loves", "betrays", "remembers", "fears", "honours", "forgets", "follows"]
    obj = ["the crown", "his father", "a sword", "the night", "thy name", "our cause", "the sea", "her grief"]
    tail = [".", "!", "?", ", and weeps.", ", my lord."]
    paras = []
    for _ in range(n_paragraphs):
        lines = [f"{rng.choice(subj).capitalize()} {rng.choice(verb)} {rng.choice(obj)}{rng.choice(tail)}"
                 for _ in range(rng.randint(1, 4))]
        paras.append("\n".join(lines))
    return "\n\n".join(paras) + "\n"


@pytest.fixture(scope="session")
def train_text(tmp_path_factory) -> Path:
    """A text file to train on: tinyshakespeare when the shared data is there, else a synthetic corpus, so
    the training mechanics (resume, DDP, balancing) are tested on every machine."""
    env = os.environ.get("NANOSEEK_DATA")
    shared = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    real = shared / "tinyshakespeare" / "input.txt"
    if real.is_file():
        return real
    path = tmp_path_factory.mktemp("corpus") / "synthetic.txt"
    path.write_text(_synthetic_text())
    return path

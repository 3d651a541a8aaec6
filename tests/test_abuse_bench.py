"""benchmarks/abuse.py keeps running: --help, and all six measurements at a tiny size against a tiny server.

The script is a black-box HTTP client, so this guards its plumbing (key creation, the six probes, the ledger
read, the result file) against changes in the server, not the figures: the tiny random model runs in this
process behind uvicorn, and whether each bar passes depends on the server code, so either verdict is fine here.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

from nanoseek.serve.app import create_app
from nanoseek.serve.store import Store
from test_chat import CHATML
from test_serve import _served, _Server

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "abuse.py"
TINY = ["--budget-parallel", "6", "--budget-requests", "2", "--budget-max-tokens", "4", "--streams", "2",
        "--stream-tokens", "128", "--quiet-s", "0.2", "--big-prompt-mb", "0.05", "--chunked-mib", "1",
        "--renders", "2", "--render-kb", "2", "--render-alone-s", "0.3", "--slowloris", "4",
        "--header-timeout", "0.2", "--slowloris-grace", "0.2", "--trickle-s", "0.1", "--request-timeout", "30"]


def test_help():
    r = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert "--only" in r.stdout and "slowloris" in r.stdout


def test_every_measurement_runs_and_writes_a_row(tmp_path):
    data = tmp_path / "data"
    served = {"tiny": _served("tiny", CHATML, slow_s=0.02)}   # streams last through the windows
    store = Store(data)
    server = _Server(create_app(served, store, require_auth=False, poll_s=0.05))
    out = tmp_path / "abuse.md"
    try:
        r = subprocess.run([sys.executable, str(SCRIPT), "--url", server.url, "--data-dir", str(data),
                            "--server-pid", str(os.getpid()), *TINY, "--out", str(out)],
                           capture_output=True, text=True, timeout=120, check=False)
    finally:
        server.stop()
        served["tiny"].scheduler.stop(timeout=5)
        store.close()
    # 1: some bar failed, which is the server's business; a crash exits 1 too, but writes no result file
    assert r.returncode in (0, 1) and out.exists(), r.stderr[-3000:]
    text = out.read_text()
    rows = re.findall(r"^\| (\d) \| [^|]+ \| [^|]+ \| (pass|FAIL) \| ([^|]+) \|$", text, re.MULTILINE)
    assert [int(n) for n, _, _ in rows] == [1, 2, 3, 4, 5, 6], text
    assert "ERROR" not in text and "skipped" not in text, text
    figures = {int(n): f for n, _, f in rows}
    assert re.search(r"served \d+/6 .* spend \$\S+ vs budget \$\S+", figures[1])
    assert re.search(r"A's own repeat hit \d+/\d+", figures[2])
    assert re.search(r"chat HTTP \d+ in [\d.]+ s, tokenize HTTP \d+ in [\d.]+ s; worst stall [\d.]+ s", figures[3])
    assert re.search(r"HTTP \d+ after [\d.]+ MiB of 1.0 MiB sent .*server RSS \+", figures[4])
    assert re.search(r"stream [\d.]+ tok/s alone → [\d.]+ tok/s during 2 parallel renders", figures[5])
    assert re.search(r"\d/4 still open after 0.4 s", figures[6])

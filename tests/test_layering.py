"""Layering: the models depend on nothing above them.

nanoseek.models defines the networks and what a forward pass reads and writes (models/cache.py); the
engine, the server and training build on it. A model module that imported one of those would tie every
user of the models (export, weight conversion, tests) to the serving and training stacks, and invite import
cycles. Checked in a fresh interpreter per module, since this test process has imported everything already.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import nanoseek.models

ROOT = Path(__file__).resolve().parents[1]
ABOVE_MODELS = ("nanoseek.engine", "nanoseek.serve", "nanoseek.train")
MODEL_MODULES = ["nanoseek.models", *(f"nanoseek.models.{m.name}" for m in pkgutil.iter_modules(nanoseek.models.__path__))]

# Imports each module in turn in one fresh interpreter, recording what each brought in beyond the modules
# already loaded (so a module is blamed for its own imports, not for those of the modules before it).
_PROBE = """
import importlib, json, sys
out = {}
for name in sys.argv[1:]:
    before = set(sys.modules)
    importlib.import_module(name)
    out[name] = sorted(set(sys.modules) - before)
print(json.dumps(out))
"""


def test_model_modules_are_found():
    assert {"nanoseek.models.cache", "nanoseek.models.mla", "nanoseek.models.moe", "nanoseek.models.dense"} \
        <= set(MODEL_MODULES)


def test_models_import_nothing_from_engine_serve_or_train():
    r = subprocess.run([sys.executable, "-c", _PROBE, *MODEL_MODULES], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env={"PATH": "", "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE"})
    assert r.returncode == 0, r.stderr[-3000:]
    loaded = json.loads(r.stdout)
    assert set(loaded) == set(MODEL_MODULES)
    everything = {m for mods in loaded.values() for m in mods}
    assert "nanoseek.models.layers" in everything      # the probe saw the models' own imports
    offenders = {name: [m for m in mods if m.startswith(ABOVE_MODELS)] for name, mods in loaded.items()}
    assert not any(offenders.values()), {k: v for k, v in offenders.items() if v}

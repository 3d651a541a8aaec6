#!/usr/bin/env bash
# Wheels that benchmarks/gpu.py's TRL anchor imports and the lent H100 lacks (it has Python 3.12, torch 2.11,
# transformers 5.17, no network; no trl/datasets). Run HERE, with PyPI reachable, before the device call; the
# call carries the folder (ignored by git) and installs it with `pip install --no-deps .gpu_wheels/*.whl`.
#
#   bash benchmarks/gpu_wheels.sh [DEST]        # default DEST: .gpu_wheels (about 2 MB)
#
# Versions: trl 1.16.0 is the anchor the issue names. datasets 4.7.0 is the oldest TRL 1.16 accepts and asks
# least of the host (huggingface-hub < 2, pyarrow >= 21); dill and multiprocess are pinned inside its bounds.
# The image already holds TRL's other needs (accelerate 1.15, pandas, pyarrow, xxhash, psutil, pyyaml; see
# /work/.library/device/KINDS.md), and two versions of one package stop the install, so they are not fetched;
# WITH_HOST_DEPS=1 adds accelerate, xxhash, pyarrow and pandas (~60 MB) for a host without them.
# Never add torch here: the host's CUDA build must stay.
set -euo pipefail
DEST=${1:-.gpu_wheels}
PY=${PYTHON:-python3}
mkdir -p "$DEST"
pkgs=(trl==1.16.0 datasets==4.7.0 dill==0.4.0 multiprocess==0.70.18)
if [ "${WITH_HOST_DEPS:-0}" = 1 ]; then
  pkgs+=(accelerate xxhash pyarrow pandas)
fi
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  -d "$DEST" "${pkgs[@]}"
size=$(du -sm "$DEST" | cut -f1)
echo "$DEST: $(ls "$DEST" | wc -l) wheels, ${size} MB"
if [ "$size" -gt 60 ]; then
  echo "warning: over the device call's 64 MiB carry limit together with the worktree" >&2
fi

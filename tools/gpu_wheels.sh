#!/usr/bin/env bash
# Wheels that bench/gpu.py (and fmalib's image stages) need on a GPU machine that has its own PyTorch stack but
# no package registry, into gpu_wheels/ (git-ignored; emptied first, so one version of each). Run here, where
# PyPI is reachable:
#
#   bash tools/gpu_wheels.sh [PYTHON_VERSION]      # the device's CPython, default 3.12; x86-64 manylinux
#
# Versions are the ones installed in .venv, so the device runs what the tests ran. Wheels for the device's
# Python and platform are downloaded (grimp, pycocotools and wcwidth are compiled); those with only an sdist on PyPI
# (fvcore, iopath, antlr4-python3-runtime) are built here as pure-Python wheels; Detectron2 is the wheel that
# `make install` (tools/install_detectron2.sh) built into .cache/detectron2. The device is assumed to have
# torch, torchvision, numpy, scipy, pandas, pillow, pyyaml, regex, timm, huggingface_hub, safetensors, tqdm
# and matplotlib (carry those too where it does not). Then, there, in the repo root, carrying gpu_wheels:
#
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site gpu_wheels/*.whl && PYTHONPATH=/tmp/site:. python3 bench/gpu.py
set -euo pipefail
cd "$(dirname "$0")/.."

PYVER=${1:-3.12}
PY=${PY:-.venv/bin/python}
OUT=gpu_wheels
NAMES=(grimp open_clip_torch ftfy wcwidth segment_anything pycocotools fvcore iopath yacs termcolor tabulate cloudpickle
       portalocker omegaconf hydra-core antlr4-python3-runtime)
PIP=("$PY" -m pip --quiet --disable-pip-version-check)

pinned() { for name in "$@"; do echo "$name==$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")"; done; }

D2_WHEEL=$(ls .cache/detectron2/*detectron2*.whl 2>/dev/null | head -n 1 || true)
if [[ -z "$D2_WHEEL" ]]; then
    echo "gpu_wheels: no Detectron2 wheel in .cache/detectron2: run 'make install' first" >&2
    exit 1
fi
rm -rf "$OUT" && mkdir -p "$OUT"
for spec in $(pinned "${NAMES[@]}"); do
    if "${PIP[@]}" download --no-deps --only-binary=:all: --implementation cp --python-version "$PYVER" \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$OUT" "$spec" 2>/dev/null; then
        echo "gpu_wheels: $spec (wheel for CPython $PYVER)"
    else  # no wheel on PyPI: build it from the sdist (these are pure Python)
        "${PIP[@]}" wheel --no-deps -w "$OUT" "$spec"
        echo "gpu_wheels: $spec (built from its sdist)"
    fi
done
cp "$D2_WHEEL" "$OUT/"
ls -1 "$OUT"
du -sh "$OUT"

#!/usr/bin/env bash
# Install Detectron2 into a Python environment (called by `make install`):
#
#   bash tools/install_detectron2.sh .venv/bin/python
#
# Three paths, first match wins:
#   1. `import detectron2` already works in that Python (your own build, with compiled ops): left alone.
#   2. DETECTRON2_SRC=/path/to/detectron2 (a git checkout): built from it with its C++/CUDA ops; the official
#      way on GPU clusters (needs a compiler, and nvcc for CUDA ops).
#   3. Otherwise: the `pb1-detectron2==0.6` sdist from PyPI (a copy of Detectron2 v0.6 whose sdist lacks the
#      C++ sources), built as pure Python with its extension list emptied. Semantic segmentation
#      (SemanticFPN, DeepLabV3+, SemSegEvaluator) needs none of the compiled ops; fmalib.segment.compat
#      supplies an absent-ops placeholder for `detectron2._C`. The only network calls are PyPI's JSON API for
#      the sdist's URL, the sdist download (SHA-256 checked), and pip fetching the pure-Python dependencies.
#      DETECTRON2_SDIST=/path/to/pb1-detectron2-0.6.tar.gz uses a local copy instead (offline machines).
# The sdist and the built wheel are kept under .cache/detectron2/ (git-ignored), so a rerun, or a fresh
# venv in the same checkout, reinstalls from the cached wheel in seconds. Non-interactive; safe in CI.
set -euo pipefail

PY=${1:?usage: bash tools/install_detectron2.sh /path/to/python}
[[ "$PY" == */* ]] && PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"
cd "$(dirname "$0")/.."

SDIST_NAME=pb1-detectron2-0.6.tar.gz
SDIST_SHA256=5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29
CACHE=.cache/detectron2
# What the pure-Python build needs at run time: setup.py's list minus black==21.4b2 (only LazyConfig.to_py;
# the old pin drags in old tooling), tensorboard (only Detectron2's TensorboardXWriter, which fmalib does not
# use), future/pydot (caffe2 export only). Pillow, matplotlib, pycocotools, tqdm come with fmalib itself.
DEPS=("fvcore>=0.1.5,<0.1.6" "iopath>=0.1.7,<0.1.10" "yacs>=0.1.8" "termcolor>=1.1" "tabulate" "cloudpickle"
      "omegaconf>=2.1" "hydra-core>=1.1" "Pillow>=7.1" "matplotlib" "pycocotools>=2.0.2" "tqdm>4.29.0")
PIP=("$PY" -m pip install --quiet --disable-pip-version-check --no-input)

log() { echo "install_detectron2: $*"; }

if found=$("$PY" -c "import detectron2, os; print(detectron2.__version__, os.path.dirname(detectron2.__file__))" 2>/dev/null); then
    log "detectron2 $found already importable in $PY; leaving it alone"
    exit 0
fi
"$PY" -c "import torch" 2>/dev/null || { log "error: torch is not importable in $PY; install torch first"; exit 1; }

if [[ -n "${DETECTRON2_SRC:-}" ]]; then
    [[ -f "$DETECTRON2_SRC/setup.py" ]] || { log "error: DETECTRON2_SRC=$DETECTRON2_SRC has no setup.py (expected a detectron2 checkout)"; exit 1; }
    log "building detectron2 from $DETECTRON2_SRC (with its C++/CUDA ops)"
    "${PIP[@]}" --no-build-isolation "$DETECTRON2_SRC"
    "$PY" -c "import detectron2; print('install_detectron2: installed detectron2', detectron2.__version__)"
    exit 0
fi

mkdir -p "$CACHE"
WHEEL=$(ls "$CACHE"/pb1_detectron2-0.6+purepy-*.whl 2>/dev/null | head -n 1 || true)
if [[ -z "$WHEEL" ]]; then
    SDIST="${DETECTRON2_SDIST:-$CACHE/$SDIST_NAME}"
    if [[ ! -f "$SDIST" ]]; then
        log "fetching $SDIST_NAME from PyPI into $CACHE/"
        "$PY" - "$SDIST" <<'EOF'
import hashlib, json, os, ssl, sys, urllib.request
dest = sys.argv[1]
cafile = os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE")
ctx = ssl.create_default_context(cafile=cafile if cafile and os.path.isfile(cafile) else None)
def get(url):
    with urllib.request.urlopen(url, timeout=120, context=ctx) as r:
        return r.read()
meta = json.loads(get("https://pypi.org/pypi/pb1-detectron2/json"))
files = [f for f in meta["releases"].get("0.6", []) if f["packagetype"] == "sdist"]
if not files:
    sys.exit("install_detectron2: PyPI lists no sdist for pb1-detectron2 0.6")
data = get(files[0]["url"])
if hashlib.sha256(data).hexdigest() != files[0]["digests"]["sha256"]:
    sys.exit("install_detectron2: downloaded sdist does not match PyPI's SHA-256")
with open(dest + ".tmp", "wb") as f:
    f.write(data)
os.replace(dest + ".tmp", dest)
EOF
    fi
    "$PY" -c "import hashlib, sys; sys.exit(hashlib.sha256(open(sys.argv[1], 'rb').read()).hexdigest() != sys.argv[2])" \
        "$SDIST" "$SDIST_SHA256" \
        || { log "error: $SDIST is not the pb1-detectron2 0.6 sdist (SHA-256 $SDIST_SHA256 expected)"; exit 1; }

    BUILD=$(mktemp -d "${TMPDIR:-/tmp}/d2build.XXXXXX")
    trap 'rm -rf "$BUILD"' EXIT
    tar -xzf "$SDIST" -C "$BUILD"
    SRC="$BUILD/pb1-detectron2-0.6"
    # Pure-Python build: no extensions, the run-time dependencies above (the original list also carries a
    # direct-URL extra that current pip refuses), and a local version tag that says what was built.
    "$PY" - "$SRC/setup.py" "${DEPS[@]}" <<'EOF'
import re, sys
path, deps = sys.argv[1], sys.argv[2:]
text = open(path).read()
subs = [
    (r"ext_modules=get_extensions\(\),", "ext_modules=[],"),
    (r"install_requires=\[.*?\n    \],", "install_requires=%r," % deps),
    (r"extras_require=\{.*?\n    \},", "extras_require={},"),
    (r"version=get_version\(\),", "version=get_version() + '+purepy',"),
]
for pattern, repl in subs:
    text, n = re.subn(pattern, lambda m: repl, text, flags=re.S)
    if n != 1:
        sys.exit(f"install_detectron2: cannot patch {path}: pattern {pattern!r} matched {n} times")
open(path, "w").write(text)
EOF
    # setup.py imports torch, so build without isolation; modern setuptools builds wheels by itself.
    "$PY" -c "import setuptools, sys; sys.exit(tuple(map(int, setuptools.__version__.split('.')[:2])) < (70, 1))" 2>/dev/null \
        || "${PIP[@]}" "setuptools>=70.1"
    log "building pb1-detectron2 0.6 as pure Python"
    "$PY" -m pip wheel --quiet --disable-pip-version-check --no-input --no-deps --no-build-isolation \
        --wheel-dir "$BUILD/dist" "$SRC"
    WHEEL="$CACHE/$(basename "$BUILD"/dist/*.whl)"
    mv "$BUILD"/dist/*.whl "$WHEEL"
fi

log "installing $WHEEL"
"${PIP[@]}" "$WHEEL"
"$PY" -c "import detectron2; print('install_detectron2: installed detectron2', detectron2.__version__, '(pure Python)')"

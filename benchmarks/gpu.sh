#!/usr/bin/env bash
# The GPU check of issue 15 in one script, about 8 minutes on an H100/H200-class machine:
#   1. an environment: the .venv already here if its torch sees the GPU; else `make install`
#      (the Makefile's own set-up, which needs PyPI); else, on a machine with no registry,
#      the image's own python3 if its torch sees the GPU, with medflow from src/ and any
#      wheels carried in .whl/ (the data stack - nibabel, monai, nilearn - may be missing
#      there: tests that need it skip or fail, saying which);
#   2. the test suite's CUDA tests (`pytest -m cuda`; skipped on a machine without CUDA);
#   3. benchmarks/gpu.py: one-step MedFlowSeg and UNet throughput at 256 x 256, eager,
#      torch.compile and CUDA graphs over batch sizes 1-256, within the time that is left.
#
#   bash benchmarks/gpu.sh [OUT_DIR]      # default benchmarks/results; writes gpu.json,
#                                         # gpu.md, cuda_tests.log, install.log there
# Exits non-zero if the CUDA tests or the benchmark failed; every step runs regardless.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=$(mkdir -p "${1:-benchmarks/results}" && cd "${1:-benchmarks/results}" && pwd)
TOTAL_S=${GPU_TOTAL_S:-480}  # the whole script's budget; the benchmark gets what is left
START=$SECONDS
export PYTHONUNBUFFERED=1

sees_gpu() {  # $1: a python; true if it imports torch and torch sees a CUDA device
    "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1
}

PY=""
if [ -x .venv/bin/python ] && sees_gpu .venv/bin/python; then
    PY=.venv/bin/python
    echo "gpu.sh: using the existing .venv"
elif [ ! -e .venv ]; then
    echo "gpu.sh: make install (log: $OUT_DIR/install.log)"
    # fail fast where no registry answers, instead of pip's minutes of retries
    if PIP_RETRIES=0 PIP_DEFAULT_TIMEOUT=15 timeout 300 make install >"$OUT_DIR/install.log" 2>&1 \
        && sees_gpu .venv/bin/python; then
        PY=.venv/bin/python
    else
        echo "gpu.sh: make install gave no CUDA torch (no registry here?); see install.log"
        rm -rf .venv  # made by this attempt: leave no half-installed environment behind
    fi
fi
if [ -z "$PY" ] && command -v python3 >/dev/null && sees_gpu python3; then
    PY=python3
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
    if ls .whl/*.whl >/dev/null 2>&1; then  # wheels carried for what the image lacks
        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/medflow-site \
            .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/medflow-site"
    fi
    echo "gpu.sh: using the image's python3 with medflow from src/"
fi
if [ -z "$PY" ]; then
    echo "gpu.sh: no Python here has a torch that sees a GPU (a CPU-only .venv? remove it" \
        "and rerun, so that make install fetches torch from PyPI)" >&2
    exit 1
fi
"$PY" -c 'import torch; print("gpu.sh: torch", torch.__version__, "CUDA", torch.version.cuda,
    torch.cuda.get_device_name(0))'

echo "gpu.sh: CUDA tests (log: $OUT_DIR/cuda_tests.log)"
# collection errors (a module whose imports the image lacks) do not stop the other tests
"$PY" -m pytest -q -ra -m cuda --continue-on-collection-errors -p no:cacheprovider tests \
    2>&1 | tee "$OUT_DIR/cuda_tests.log"
TESTS=${PIPESTATUS[0]}

LEFT=$((TOTAL_S - (SECONDS - START) - 90))  # 90 s for the last set-up to finish and the rest
[ "$LEFT" -lt 60 ] && LEFT=60
echo "gpu.sh: benchmark, new set-ups started for up to ${LEFT} s"
"$PY" benchmarks/gpu.py --out "$OUT_DIR/gpu.json" --budget-s "$LEFT" | tee "$OUT_DIR/gpu.md"
BENCH=${PIPESTATUS[0]}

echo "gpu.sh: tests exit $TESTS, benchmark exit $BENCH, $((SECONDS - START)) s in all"
[ "$TESTS" -eq 0 ] && [ "$BENCH" -eq 0 ]

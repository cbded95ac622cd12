#!/usr/bin/env bash
# The prepared GPU check (bench/gpu_check.py) on a machine with one NVIDIA GPU and a stock CUDA
# PyTorch image (torch, transformers, accelerate, peft), no network, in at most 8 minutes.
#
#   bash scripts/gpu_check.sh --fetch-wheels   # where PyPI is reachable: the wheels the image lacks, into .whl/
#   bash scripts/gpu_check.sh OUT              # on the GPU machine: installs .whl/ if present, runs the check
#   bash scripts/gpu_check.sh OUT --cpu        # the reduced check on a CPU (what tests/test_gpu_check.py runs)
#
# The wheels: pydantic (our configs) and TRL with what it needs beyond the image (datasets, dill,
# multiprocess), for CPython 3.12 on x86-64 Linux; without TRL the check measures ours alone.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.whl
if [ "${1:-}" = "--fetch-wheels" ]; then
    PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
        -d "$WHEELS" pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection \
        trl datasets dill multiprocess
    echo "wheels in $WHEELS/ (carry this folder to the GPU machine)"
    exit 0
fi
OUT="${1:?usage: bash scripts/gpu_check.sh OUT [--cpu] | --fetch-wheels}"
shift
if ls "$WHEELS"/*.whl >/dev/null 2>&1 && ! python3 -c "import pydantic" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && [ "${1:-}" = "--cpu" ] && PY=.venv/bin/python
exec timeout 480 "$PY" bench/gpu_check.py --out "$OUT" "$@"

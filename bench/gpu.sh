#!/usr/bin/env bash
# The GPU readiness run: one command that generates its data, runs `pytest -m gpu` and measures what a CPU
# cannot (DALI nvJPEG/NVDEC, bf16, torch.compile, MFU, StructSA fused, the engines), each part in a time box,
# 8 minutes in all on one H100/H200; results in bench/results/gpu-<device>-<date>.{md,json,log}.
#
#   bash bench/gpu.sh                 # on a GPU node (install as README "Installing" / "GPU clusters")
#   bash bench/gpu.sh --smoke         # CPU, tiny sizes, the same code paths (CI: tests/test_bench_gpu.py)
#   bash bench/gpu.sh --list          # the parts and their time budget
#   bash bench/gpu.sh --wheels DIR    # first install DIR/*.whl without an index (a node with no network)
#
# Python: $PYTHON, else the checkout's .venv, else python3. Options: bench/gpu/run.py (--help).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=${PYTHON:-}
if [[ -z $py ]]; then
    if [[ -x $root/.venv/bin/python ]] && "$root/.venv/bin/python" -c "" 2>/dev/null; then
        py=$root/.venv/bin/python
    else
        py=python3
    fi
fi
export PYTHONUNBUFFERED=1
exec "$py" "$root/bench/gpu/run.py" "$@"

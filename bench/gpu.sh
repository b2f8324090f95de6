#!/usr/bin/env bash
# The prepared accelerator run (bench/gpu.py): fp32/fp16/bf16 rows, memory rows, hybrid rows in <= 8 min.
#   bash bench/gpu.sh            # on a CUDA machine; results under $OUT (or bench/results)
#   bash bench/gpu.sh --quick    # tiny, passes on a CPU (tests/test_bench_smoke.py)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
limit=480  # the 8 minutes of a lent GPU
case " $* " in *" --quick "*) limit=1800 ;; esac
exec timeout "$limit" "$PY" -m bench.gpu "$@"

#!/usr/bin/env bash
# The prepared accelerator run (bench/gpu.py): fp32/fp16/bf16 rows, memory rows, issue 12's table in <= 8 min.
#   bash bench/gpu.sh            # on a CUDA machine; results under $OUT (or bench/results)
#   bash bench/gpu.sh --quick    # tiny, passes on a CPU (tests/test_bench_smoke.py)
# On the lent GPU machine itself: bench/gpu_bundle.sh here, then bench/gpu_device.sh there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
# ComfyUI's comfy_api imports PyAV at module level; a machine without it (the lent GPU's image) gets
# the import-only stand-in (bench/gpu_stubs/av: no video code runs here).
if ! "$PY" -c "import av" 2>/dev/null; then
  echo "bench/gpu.sh: no PyAV here: bench/gpu_stubs stands in for ComfyUI's imports" >&2
  export PYTHONPATH="$PWD/bench/gpu_stubs${PYTHONPATH:+:$PYTHONPATH}"
fi
limit=480  # the 8 minutes of a lent GPU
case " $* " in *" --quick "*) limit=1800 ;; esac
exec timeout "$limit" "$PY" -m bench.gpu "$@"

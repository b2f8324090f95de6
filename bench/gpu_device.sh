#!/usr/bin/env bash
# Runs on the lent GPU machine (device tool, carry [".gpu"] built by bench/gpu_bundle.sh): installs the
# carried wheels, points the bench at the carried ComfyUI tree and shared data, runs bench/gpu.sh, and
# packs every result into $OUT/gpu-results.tgz (the tool brings back at most 8 files) beside the log.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
"$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHON="$PY" PYTHONUNBUFFERED=1
export EXACT_ENCODE_COMFYUI="$PWD/.gpu/ComfyUI" EXACT_ENCODE_SHARED="$PWD/.gpu/shared"
out=/tmp/gpu-results; rm -rf "$out"; mkdir -p "$out"  # outside $OUT: only the pack comes back
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/nvidia-smi.txt" 2>&1
"$PY" -c "import torch, sys; print(sys.version, torch.__version__, torch.cuda.get_device_name(0))" >> "$out/nvidia-smi.txt" 2>&1
bash bench/gpu.sh --out "$out" "$@" 2>&1 | tee "$out/gpu-log.txt"
rc=${PIPESTATUS[0]}
tar czf "${OUT:-/tmp}/gpu-results.tgz" -C "$out" .
cp "$out/gpu-log.txt" "$out/gpu-run.json" "${OUT:-/tmp}/" 2>/dev/null
exit "$rc"

#!/usr/bin/env bash
# Builds .gpu/ (git-ignored through .git/info/exclude) for the lent GPU machine, which reaches no registry
# and gets only the working tree plus carried paths (64 MiB in all): a ComfyUI tree without its tokenizer
# data and API nodes (about 5 MB; the VAEs need neither), a copy of the shared models and photos, and
# wheels of the pure-Python packages ComfyUI imports that its image lacks (torchsde, trampoline).
# Then, with the device tool: run `bash bench/gpu_device.sh` with carry [".gpu"].
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
shared="${EXACT_ENCODE_SHARED:-../shared}"
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/shared/models .gpu/whl
"$PY" - "${EXACT_ENCODE_COMFYUI:-.host/ComfyUI}" .gpu/ComfyUI <<'PYEOF'
import shutil, sys
def skip(folder, names):  # tokenizer data (17 MB), ComfyUI's tests and API nodes: unused by a VAE run
    return {n for n in names if n in ("tests", "tests-unit", "comfy_api_nodes", "__pycache__", "sd1_tokenizer")
            or ("text_encoders" in folder and not n.endswith(".py") and ("tokenizer" in n or n.endswith(".json")))}
shutil.copytree(sys.argv[1], sys.argv[2], ignore=skip)
PYEOF
cp -r "$shared/models/taef2" "$shared/models/kl_f8_small" .gpu/shared/models/
cp -r "$shared/images" .gpu/shared/
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 -d .gpu/whl torchsde==0.2.6 trampoline==0.1.2
du -sh .gpu

#!/usr/bin/env bash
# The main job: stock VAE Encode vs VAE Exact Encode on a real headless ComfyUI server.
#   bash scripts/demo.sh [--image PNG] [--size 128] [--steps 100] [--vae taef2|kl_f8_small] [--out output/demo]
# Builds the environment first (scripts/setup_env.sh, idempotent), then runs scripts/demo.py, which
# prints the PSNR of both decodes and copies original/plain/exact PNGs to --out.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

bash "$root/scripts/setup_env.sh"

exec "$root/.venv/bin/python" "$root/scripts/demo.py" "$@"

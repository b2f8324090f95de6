"""The wheel: `pip wheel .` builds a package `exact_encode` from core/ and nothing else, and it
installs and runs in a fresh venv without ComfyUI.

"Fresh" here: `python -m venv` (no system site-packages) whose only other packages are torch,
numpy, scipy and their own requirements, linked from this venv (a .pth file) instead of downloaded
again, to keep CI fast and offline. The wheel is installed with `--no-index`, so pip must find
every requirement it declares among those; diffusers, safetensors, ComfyUI are not visible.
"""
from __future__ import annotations

import importlib.metadata as md
import os
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.support.library import REPO, exact_encode

BASE_DEPS = ("torch", "numpy", "scipy")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(REPO)], check=True, timeout=300)
    (whl,) = out.glob("*.whl")
    return whl


def test_version_is_one_value():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert exact_encode().__version__ == project["version"]


def test_wheel_holds_exact_encode_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"exact_encode"}
    sources = {p.relative_to(REPO / "core").as_posix() for p in (REPO / "core").rglob("*.py")}
    assert {n[len("exact_encode/"):] for n in names if n.endswith(".py")} == sources  # no module left out
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "exact-encode = exact_encode.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def _closure(names) -> set[str]:
    """Distribution names of `names` and everything they require (no extras)."""
    seen, todo = set(), list(names)
    while todo:
        name = re.split(r"[ ;<>=!~\[(]", todo.pop(), maxsplit=1)[0].lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        for req in md.requires(name) or []:
            if "extra ==" not in req and 'sys_platform == "win32"' not in req:
                todo.append(req)
    return seen


def _link_only(dists, into: Path) -> None:
    """Symlink the files of these installed distributions (top-level entries) into `into`."""
    into.mkdir()
    for name in dists:
        dist = md.distribution(name)
        site = Path(dist.locate_file(""))
        for top in {Path(f).parts[0] for f in dist.files or []}:
            src = site / top
            if src.exists() and not (into / top).exists() and top not in ("..", "bin"):
                (into / top).symlink_to(src)


def test_fresh_venv_installs_the_wheel_and_inverts(wheel, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}  # nothing leaks in
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = Path(subprocess.check_output([str(py), "-I", "-c",
                                         "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True, env=env).strip())
    _link_only(_closure(BASE_DEPS), tmp_path / "base")
    (site / "base_deps.pth").write_text(str(tmp_path / "base") + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-index", "-q", str(wheel)],
                   check=True, timeout=300, env=env)
    script = (
        "import importlib.util, torch, exact_encode\n"
        "from exact_encode import Codec, invert\n"
        "for absent in ('core', 'nodes', 'comfy', 'diffusers', 'safetensors', 'bench'):\n"
        "    assert importlib.util.find_spec(absent) is None, absent\n"
        "w = torch.tensor([[1.0, 0.2, 0.1], [0.3, 0.9, 0.2], [0.1, 0.3, 1.1]])\n"
        "dec = lambda z: torch.einsum('ij,bjhw->bihw', w, z)\n"
        "r = invert(Codec(lambda x: 0.9 * x, dec), dec(torch.rand(1, 3, 4, 4) * 0.5), method='forward', "
        "lr=0.8, steps=60)\n"
        "assert r.samples[0].gain_db > 20, r.summary()\n"
        "print(exact_encode.__file__, exact_encode.__version__, torch.__version__)\n")
    out = subprocess.run([str(py), "-I", "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env=env)
    assert out.returncode == 0, out.stderr
    assert str(site) in out.stdout and exact_encode().__version__ in out.stdout
    version = subprocess.run([str(venv / "bin" / "exact-encode"), "--version"], capture_output=True, text=True,
                             timeout=120, env=env, cwd=tmp_path)
    assert version.returncode == 0 and exact_encode().__version__ in version.stdout, version.stderr
    no_extra = subprocess.run([str(venv / "bin" / "exact-encode"), "encode", "a.png", "--vae", "v", "--out", "o"],
                              capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert no_extra.returncode == 2 and "comfyui-exact-encode[cli]" in no_extra.stderr, no_extra.stderr


@pytest.mark.parametrize("module", ["exact_encode.adapters.images", "exact_encode.adapters.diffusers"])
def test_adapter_doctests(module):
    import doctest
    import importlib

    exact_encode()
    if module.endswith("diffusers"):
        pytest.importorskip("diffusers")
    failed, attempted = doctest.testmod(importlib.import_module(module))
    assert failed == 0 and attempted > 0

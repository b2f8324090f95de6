"""`import exact_encode` inside the repository, without installing it.

The installed package is `core/` under the name `exact_encode` (pyproject.toml). Here a folder
outside the repository holds one symlink, `exact_encode -> <repo>/core`; it goes first on sys.path
and on PYTHONPATH, so this process, its subprocesses and Ray's worker processes all import this
checkout's core/ as `exact_encode` (nothing else of the repository becomes importable that way).
"""
from __future__ import annotations

import hashlib
import importlib
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def link_dir() -> Path:
    """The folder with the `exact_encode` symlink for this checkout (made once)."""
    folder = Path(tempfile.gettempdir()) / f"exact_encode_link_{hashlib.sha1(str(REPO).encode()).hexdigest()[:10]}"
    link = folder / "exact_encode"
    if not link.is_symlink():
        folder.mkdir(exist_ok=True)
        tmp = folder / f".link{os.getpid()}"
        tmp.symlink_to(REPO / "core", target_is_directory=True)
        os.replace(tmp, link)  # atomic: parallel test processes may race here
    return folder


def _is_ours(module) -> bool:
    return Path(getattr(module, "__file__", "") or "").resolve().parent == REPO / "core"


def exact_encode():
    """The `exact_encode` package of this checkout."""
    current = sys.modules.get("exact_encode")
    if current is not None and _is_ours(current):
        return current
    folder = str(link_dir())
    if folder not in sys.path:
        sys.path.insert(0, folder)
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if folder not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([folder] + [p for p in paths if p])
    for name in [n for n in sys.modules if n == "exact_encode" or n.startswith("exact_encode.")]:
        del sys.modules[name]  # a copy installed from another checkout must not shadow this one
    module = importlib.import_module("exact_encode")
    assert _is_ours(module), module.__file__
    return module


def readme_block(marker: str) -> str:
    """The ```python block right after `<!-- marker -->` in README.md."""
    text = (REPO / "README.md").read_text()
    tag = f"<!-- {marker} -->"
    if tag not in text:
        raise AssertionError(f"README.md has no {tag} marker")
    after = text.split(tag, 1)[1]
    start = after.index("```python\n") + len("```python\n")
    return after[start:after.index("```", start)]


def readme_commands(marker: str, replace: dict | None = None) -> list[list[str]]:
    """The `exact-encode` lines of the ```bash block after `<!-- marker -->`, as argv lists
    (comments dropped, strings in `replace` substituted), run as `python -m exact_encode.cli`."""
    import shlex

    text = (REPO / "README.md").read_text().split(f"<!-- {marker} -->", 1)[1]
    start = text.index("```bash\n") + len("```bash\n")
    commands = []
    for line in text[start:text.index("```", start)].splitlines():
        line = line.split("#", 1)[0].strip()
        for old, new in (replace or {}).items():
            line = line.replace(old, new)
        if line.startswith("exact-encode "):
            commands.append([sys.executable, "-m", "exact_encode.cli"] + shlex.split(line)[1:])
    return commands


def one_torch_thread_fixture():
    """A module fixture: torch (and subprocesses, via OMP_NUM_THREADS) on one thread. These tests
    run 32-48 px images, where a second thread buys nothing, and on a busy shared CPU a second
    thread made the solver 8x slower (measured: 4.4 s vs 0.5 s for the same 64 px run)."""
    import pytest

    @pytest.fixture(scope="module", autouse=True)
    def one_torch_thread():
        import torch

        before, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"
        yield
        torch.set_num_threads(before)
        if env is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env

    return one_torch_thread

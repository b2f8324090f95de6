"""`import exact_encode` inside the repository, without installing it.

The installed package is `core/` under the name `exact_encode` (pyproject.toml). In the repository,
`core` is importable (tests put the repo on sys.path); this registers the same module object under
the installed name too, so README examples and tests can say `from exact_encode import ...`.
An `exact_encode` that is installed from this very tree (pip install -e .) is used as it is.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _is_ours(module) -> bool:
    return Path(getattr(module, "__file__", "") or "").resolve().parent == REPO / "core"


def exact_encode():
    """The `exact_encode` package of this checkout (registers the alias on first use)."""
    current = sys.modules.get("exact_encode")
    if current is not None and _is_ours(current):
        return current
    if str(REPO) not in sys.path:
        sys.path.append(str(REPO))
    core = importlib.import_module("core")
    for name in [n for n in sys.modules if n == "exact_encode" or n.startswith("exact_encode.")]:
        del sys.modules[name]  # a copy installed from another checkout must not shadow this one
    for name, module in list(sys.modules.items()):  # one module object per file, under both names
        if name == "core" or name.startswith("core."):
            sys.modules["exact_encode" + name[4:]] = module
    return core


def readme_block(marker: str) -> str:
    """The ```python block right after `<!-- marker -->` in README.md."""
    text = (REPO / "README.md").read_text()
    tag = f"<!-- {marker} -->"
    if tag not in text:
        raise AssertionError(f"README.md has no {tag} marker")
    after = text.split(tag, 1)[1]
    start = after.index("```python\n") + len("```python\n")
    return after[start:after.index("```", start)]

"""The docstring examples of every core module run and pass (found automatically, so a new
module's examples are collected too). Plain torch: no ComfyUI."""
from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil

import pytest

import core
from tests.support.library import exact_encode

MODULES = sorted(m.name for m in pkgutil.walk_packages(core.__path__, "core."))


def test_every_core_module_is_collected():
    assert {"core.tiling", "core.temporal", "core.diagnostics", "core.solver"} <= set(MODULES)


@pytest.mark.parametrize("name", ["core"] + MODULES)
def test_docstring_examples_run(name):
    exact_encode()  # examples written for the installed package say `from exact_encode import ...`
    # import_module, not getattr: core re-exports functions named like modules (core.drift)
    module = importlib.import_module(name)
    failed, attempted = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert failed == 0, name
    assert attempted > 0 or ">>>" not in inspect.getsource(module), f"{name}: examples not collected"

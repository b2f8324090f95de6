"""Shared fixtures. Unit tests on core/ need only torch; integration fixtures boot a real
ComfyUI host in-process (tests/support/host.py) the first time one of them is used.

Tiers, as markers set from the fixtures a test uses (so they cannot be forgotten):
  host     needs ComfyUI (in-process, or the server below); `-m "not host"` runs plain torch only
  server   a real ComfyUI server in a subprocess (tests/support/server.py); also `host`
  browser  the frontend in headless chromium; also `server` and `host`
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))  # appended: ComfyUI's `nodes` must not be shadowed by ours

ARTIFACTS = REPO / "tests" / "artifacts"


TIERS = {"host": "needs the real ComfyUI host (in-process or as a server)",
         "server": "runs a real ComfyUI server in a subprocess",
         "browser": "drives the ComfyUI frontend in headless chromium"}
SLOW = "slow: over a minute in a test worker; under pytest-xdist such tests start first (pytest_collection_modifyitems)"


def pytest_configure(config):
    for name, what in TIERS.items():
        config.addinivalue_line("markers", f"{name}: {what}")
    config.addinivalue_line("markers", SLOW)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        config.pluginmanager.register(SlowFirst(), "exact-encode-slow-first")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        # Each xdist worker gets its share of the cores, and so do the processes it starts (benches, servers, the
        # CLI): one thread per core in every worker oversubscribes them, and a spinning OpenMP team then stalls
        # (the watermark bench, 151 s alone, was still running after 580 s), where two threads bought this suite's
        # convolutions only 1.36x (a TAEF2 test: 25 s with two, 34 s with one).
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        share = max(1, cores // workers)  # the cores this process may use, as `nproc` in scripts/test.sh counts
        torch.set_num_threads(share)
        os.environ["OMP_NUM_THREADS"] = str(share)  # read by torch in a process it starts, and by bench --threads


class SlowFirst:
    """In a test worker: slow tests outside a group first. xdist hands out whole groups first (the largest first),
    then single tests in collection order as workers free up, so a slow test left to the end keeps one worker busy
    while the other idles. Last among the hooks: after the tiers are marked, -m deselected, and pytest reordered by
    fixture scope."""

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items):
        def first(item):
            return bool(item.get_closest_marker("slow")) and not item.get_closest_marker("xdist_group")
        items.sort(key=lambda item: not first(item))


# Module-scoped fixtures that only import the pack's modules: as cheap in every worker as in one.
IMPORTS_ONLY = {"pack", "mods", "tiled_cls", "pack_nodes", "diag_cls", "adapter", "inversion"}


def module_fixtures(item) -> bool:
    """Whether the test shares a costly module-scoped fixture (a server, a browser, a bench run, built models)."""
    info = getattr(item, "_fixtureinfo", None)
    return info is not None and any(name not in IMPORTS_ONLY and defs and defs[-1].scope == "module"
                                    for name, defs in info.name2fixturedefs.items())


def pytest_itemcollected(item):
    # as each test is collected, so before xdist's pytest_collection_modifyitems reads the groups off the markers
    if module_fixtures(item):  # `--dist loadgroup` sends a module's such tests to one worker: one setup
        item.add_marker(pytest.mark.xdist_group(item.module.__name__))


def pytest_collection_modifyitems(items):
    for item in items:
        names = set(item.fixturenames)
        tiers = set()
        if names & {"browser", "page"}:
            tiers |= {"browser", "server", "host"}
        if "server" in names:
            tiers |= {"server", "host"}
        if "host" in names:
            tiers.add("host")
        for tier in sorted(tiers):
            item.add_marker(tier)


@pytest.fixture(scope="session")
def host():
    from tests.support import host as host_mod

    return host_mod.boot()


@pytest.fixture(scope="session")
def pack(host):
    """The pack's modules as ComfyUI loaded them: pack("nodes.exact_encode"), pack("core.tiling")."""
    import importlib

    def module(name: str):
        return importlib.import_module(f"{host.pack.__name__}.{name}")

    return module


@pytest.fixture
def cancel_at(host):
    """cancel_at(n) presses Cancel (as the browser's button does) when a node's progress bar reaches
    n, and returns the list of progress values seen; the hook is removed after the test."""
    import comfy.model_management as mm
    import comfy.utils

    seen, target = [], []

    def hook(value, total, preview, node_id=None):
        seen.append(value)
        if target and value == target[0]:
            mm.interrupt_current_processing(True)

    def arm(n: int) -> list:
        target[:] = [n]
        return seen

    comfy.utils.set_progress_bar_global_hook(hook)
    yield arm
    comfy.utils.set_progress_bar_global_hook(None)
    mm.interrupt_current_processing(False)


@pytest.fixture(scope="session")
def node_cls(pack):
    return pack("nodes.exact_encode").VAEExactEncode


@pytest.fixture(scope="session")
def stock(host):
    """ComfyUI's own nodes, called the way the executor calls them."""
    n = host.nodes

    class Stock:
        @staticmethod
        def encode(vae, image):
            with torch.inference_mode():
                return n.VAEEncode().encode(vae, image)[0]

        @staticmethod
        def decode(vae, latent):
            with torch.inference_mode():
                return n.VAEDecode().decode(vae, latent)[0]

    return Stock


@pytest.fixture(scope="session")
def taef2(host):
    from tests.support import models

    with torch.inference_mode():  # as the loader node would run it
        return models.taef2_vae()


@pytest.fixture(scope="session")
def kl_small(host):
    from tests.support import models

    with torch.inference_mode():
        return models.kl_f8_small_vae()


@pytest.fixture(scope="session")
def photos128():
    from tests.support.images import photos

    return photos(128)


@pytest.fixture(scope="session")
def photos64():
    from tests.support.images import photos

    return photos(64)


@pytest.fixture
def run_node(node_cls):
    """Execute VAE Exact Encode under inference_mode, as ComfyUI's executor does."""

    schema = node_cls.define_schema()
    default_method = next(i.default for i in schema.inputs if i.id == "method")

    def run(image, vae, steps=20, method=None, **kwargs):
        method = default_method if method is None else method
        with torch.inference_mode():
            out = node_cls.execute(image, vae, steps, method, **kwargs)
        latent, summary = out.result
        return latent, summary

    return run

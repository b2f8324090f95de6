"""Shared fixtures. Unit tests on core/ need only torch; integration fixtures boot a real
ComfyUI host in-process (tests/support/host.py) the first time one of them is used."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))  # appended: ComfyUI's `nodes` must not be shadowed by ours

ARTIFACTS = REPO / "tests" / "artifacts"


@pytest.fixture(scope="session")
def host():
    from tests.support import host as host_mod

    return host_mod.boot()


@pytest.fixture(scope="session")
def node_cls(host):
    import importlib

    return importlib.import_module(host.pack.__name__ + ".nodes.exact_encode").VAEExactEncode


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

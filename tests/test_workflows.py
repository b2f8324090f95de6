"""Every graph in workflows/ loads with zero missing node types on the real server and runs.

The graphs name the models a user would have (e.g. sdxl_vae.safetensors); here the stock
VAELoader is pointed at a seeded random TAESD-family VAE file written into the server's
models/vae (auto-detected by ComfyUI from its keys), and steps are cut, so the test checks the
plumbing of the graph as shipped, not quality.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.server import ComfyServer
from tests.support.workflow import missing_node_types, to_api

WORKFLOWS = sorted((Path(__file__).resolve().parents[1] / "workflows").glob("*.json"))
TEST_VAE = "exact_encode_test_taesd.safetensors"


@pytest.fixture(scope="module")
def server(host):
    import torch
    from safetensors.torch import save_file

    from tests.support.models import seeded_weights
    from comfy.taesd.taesd import TAESD

    with ComfyServer() as s:
        vae_dir = s.base / "models" / "vae"
        vae_dir.mkdir(parents=True, exist_ok=True)
        weights = seeded_weights(TAESD(latent_channels=4).state_dict(), seed=3)
        save_file({k: v.contiguous().to(torch.float32) for k, v in weights.items()}, str(vae_dir / TEST_VAE))
        yield s


def test_there_are_workflows():
    assert WORKFLOWS, "workflows/ must ship at least one graph"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_has_no_missing_nodes_and_runs(path, server):
    ui = json.loads(path.read_text())
    info = server.get("/object_info")
    assert missing_node_types(ui, info) == []
    small = server.add_input(server.image_source, "example.png")
    overrides = {}
    for node in ui["nodes"]:
        if node["type"] == "VAELoader":
            overrides[node["id"]] = {"vae_name": TEST_VAE}
        elif node["type"] == "LoadImage":
            overrides[node["id"]] = {"image": small}
        elif node["type"] == "VAEExactEncode":
            overrides[node["id"]] = {"steps": 2}
    prompt = to_api(ui, info, overrides)
    entry = server.run(prompt, timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]
    saved = [f for n in prompt if prompt[n]["class_type"] == "SaveImage" for f in server.output_files(entry, n)]
    assert saved and all(f.exists() for f in saved)

"""End to end on a real headless ComfyUI 0.3.75 server (a subprocess): the pack loads through
ComfyUI's own custom-node loader, shows up in /object_info, runs in an API-format workflow next to
stock nodes, and bad inputs fail the way ComfyUI reports failures (HTTP 400 validation errors,
`execution_error` in /history). The shared TAEF2 weights come in through the test-only loader in
tests/support/testkit. 64 px images and few steps keep this to seconds after the server is up.
"""
from __future__ import annotations

import pytest
from PIL import Image

from tests.support.server import ComfyServer, execution_error

SIZE = 64
STEPS = 10
ENCODER_INPUTS = {"pixels", "vae", "steps", "method", "learning_rate", "precision", "tolerance", "check_assumption",
                  "auto_stop", "time_budget", "memory_limit_mb", "select", "rival", "checkpoint"}


@pytest.fixture(scope="module")
def server():
    with ComfyServer() as s:
        yield s


def workflow(server: ComfyServer, size: int = SIZE, steps: int = STEPS, prefix: str = "exact_encode_test") -> dict:
    """LoadImage -> ImageScale (area, centre crop) -> VAEExactEncode(TAEF2) -> VAEDecode -> SaveImage,
    with the encoder's summary STRING shown by stock 'Preview as Text' (PreviewAny)."""
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": server.image_name}},
        "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "area",
                                                     "width": size, "height": size, "crop": "center"}},
        "3": {"class_type": "ExactEncodeTestVAELoader", "inputs": {"name": "taef2"}},
        "4": {"class_type": "VAEExactEncode", "inputs": {"pixels": ["2", 0], "vae": ["3", 0],
                                                         "steps": steps, "method": "adam"}},
        "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["3", 0]}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": prefix}},
        "7": {"class_type": "PreviewAny", "inputs": {"source": ["4", 1]}},
    }


def test_object_info_lists_the_node(server):
    info = server.get("/object_info")
    assert "VAEExactEncode" in info, f"pack not loaded; server log:\n{server.log_tail()}"
    node = info["VAEExactEncode"]
    assert node["display_name"] == "VAE Exact Encode (Gradient-Free)"
    inputs = {**node["input"].get("required", {}), **node["input"].get("optional", {})}
    assert set(inputs) == ENCODER_INPUTS
    assert {"pixels", "vae", "steps", "method"} <= set(node["input"]["required"])
    assert inputs["steps"][1]["min"] == 1
    assert node["output"] == ["LATENT", "STRING"]
    assert info["ExactEncodeTestVAELoader"]["display_name"] == "Test VAE Loader (exact-encode tests)"
    assert "comfyui-exact-encode" not in "".join(
        line for line in server.log_text().splitlines() if "Cannot import" in line or "IMPORT FAILED" in line)


def test_workflow_runs_and_saves_the_decode(server):
    entry = server.run(workflow(server), timeout=120)
    assert entry["status"]["status_str"] == "success", f"{entry['status']}\n{server.log_tail()}"
    assert entry["status"]["completed"] is True
    files = server.output_files(entry, "6")
    assert len(files) == 1 and files[0].is_file(), entry["outputs"]
    assert files[0].parent == server.output_dir
    with Image.open(files[0]) as img:
        assert img.size == (SIZE, SIZE)
    summary = entry["outputs"]["7"]["text"][0]  # VAEExactEncode's summary STRING, via PreviewAny
    assert "PSNR" in summary and "dB" in summary, summary


def test_steps_zero_is_a_validation_error(server):
    wf = workflow(server, steps=0)
    reply = server.post_prompt(wf)
    assert reply["http_status"] == 400, reply
    assert "prompt_id" not in reply
    assert reply["error"]["type"] == "prompt_outputs_failed_validation"
    errors = reply["node_errors"]["4"]
    assert errors["class_type"] == "VAEExactEncode"
    assert any(e["type"] == "value_smaller_than_min" and e["extra_info"]["input_name"] == "steps"
               for e in errors["errors"]), errors


def test_image_smaller_than_a_latent_cell_fails_at_execution(server):
    reply = server.post_prompt(workflow(server, size=4, prefix="too_small"))
    assert reply["http_status"] == 200 and reply["node_errors"] == {}, reply
    entry = server.wait_history(reply["prompt_id"], timeout=60)
    assert entry["status"]["status_str"] == "error"
    assert entry["status"]["completed"] is False
    error = execution_error(entry)
    assert error is not None, entry["status"]
    assert error["node_type"] == "VAEExactEncode" and error["node_id"] == "4"
    assert error["exception_type"] == "ValueError"
    message = error["exception_message"]
    # names the input (`pixels`, the IMAGE input) and what is wrong, with the numbers
    assert ("pixels" in message or "image" in message) and "latent cell" in message, message
    assert "4x4" in message, message
    assert "6" not in entry["outputs"]  # nothing was saved
    assert not list(server.output_dir.glob("too_small*"))


def test_web_extension_is_served(server):
    scripts = server.get("/extensions")
    ours = [s for s in scripts if s.endswith("/exact_encode.js")]
    assert ours, scripts
    status, body = server._request(ours[0])  # JS is not JSON: the raw text comes back
    assert status == 200 and "exact_encode.feedback" in str(body) and "exact_encode.progress" in str(body)


def test_every_node_help_page_is_served_where_the_frontend_asks(server):
    """ComfyUI frontend 1.32.9 (NodeHelpService) asks a custom node's help at
    /extensions/<pack>/docs/<node_id>/<locale>.md, then /extensions/<pack>/docs/<node_id>.md."""
    info = server.get("/object_info")
    ours = {k: v for k, v in info.items() if v.get("python_module", "").startswith("custom_nodes.")
            and not k.startswith("ExactEncodeTest")}
    assert len(ours) == 11, sorted(ours)
    base = next(s for s in server.get("/extensions") if s.endswith("/exact_encode.js")).rsplit("/", 1)[0]
    for node_id, node in ours.items():
        status, body = server._request(f"{base}/docs/{node_id}.md")
        assert status == 200 and f"`{node_id}`" in str(body), (node_id, status)
        assert str(body).startswith(f"# {node['display_name']}"), node_id

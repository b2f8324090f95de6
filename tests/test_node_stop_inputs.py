"""VAE Exact Encode's auto_stop, time_budget, memory_limit_mb and checkpoint inputs reach the solver and show
in the summary and the trace (real ComfyUI host, the shared TAEF2 VAE, 32 px)."""
from __future__ import annotations

import torch


def _trace(pack, latent):
    return pack("nodes.trace").read(latent["samples"])


def test_auto_stop_off_runs_every_step_and_on_is_the_default(run_node, taef2, photos64, pack):
    image = photos64["astronaut"][:, :32, :32]
    latent, _ = run_node(image, taef2, steps=30, method="forward", auto_stop=False, rival="off")
    off = _trace(pack, latent)
    assert off["options"]["stall_steps"] == 0 and off["options"]["rival"] == ""
    assert off["samples"][0]["iterations"] == 30
    latent, _ = run_node(image, taef2, steps=30, method="forward")
    assert _trace(pack, latent)["options"]["stall_steps"] == 20


def test_time_budget_stops_the_node_and_the_summary_says_so(run_node, taef2, photos64, pack):
    image = photos64["astronaut"][:, :32, :32]
    latent, summary = run_node(image, taef2, steps=10000, method="forward", auto_stop=False, time_budget=0.5)
    sample = _trace(pack, latent)["samples"][0]
    assert sample["stop_reason"] == "time_budget"
    assert sample["iterations"] < 10000
    assert "time" in summary.split("stop:")[1].split("\n")[0]


def test_hybrid_keeps_to_memory_limit_mb_and_says_so(run_node, taef2, photos64, pack):
    image = photos64["astronaut"][:, :32, :32]
    latent, summary = run_node(image, taef2, steps=30, method="hybrid", memory_limit_mb=1)
    extra = _trace(pack, latent)["extra"]
    assert extra["memory_limit_mb"] == 1 and extra["gradient_allowed"] is False
    assert extra["activation_estimate_mb"] > 1
    assert "gradient steps skipped" in summary
    assert torch.isfinite(latent["samples"]).all()


def test_a_negative_time_budget_is_an_error_naming_it(run_node, taef2, photos64):
    import pytest

    with pytest.raises(ValueError, match="time_budget"):
        run_node(photos64["astronaut"][:, :32, :32], taef2, steps=5, time_budget=-1.0)


def test_memory_limit_0_is_comfyuis_free_memory_on_the_cpu_too(taef2, pack):
    """The node's default cap (memory_limit_mb 0) on the hybrid's and the rival's backward pass is ComfyUI's free-memory
    estimate of the VAE's device, on the CPU as on a GPU: the host's memory is not unbounded either."""
    import comfy.model_management

    free = comfy.model_management.get_free_memory(torch.device("cpu")) / 2**20
    cap = pack("nodes.adapter").memory_cap_mb(taef2, 0)
    assert cap > 0 and abs(cap - free) < 0.05 * free
    assert pack("nodes.adapter").memory_cap_mb(taef2, 300) == 300.0


def test_checkpoint_is_the_last_input_and_reaches_the_solver(run_node, node_cls, taef2, photos64, pack):
    """checkpoint comes after rival on both encoders (saved workflows' positional widget values still land right),
    is checked against its options naming the input, and reaches InversionOptions from the node."""
    import pytest

    inputs = pack("nodes.inputs")
    tiled = pack("nodes.exact_encode_tiled").VAEExactEncodeTiled
    for cls in (node_cls, tiled):
        ids = [i.id for i in cls.define_schema().inputs]
        assert ids[-2:] == ["rival", "checkpoint"], (cls.__name__, ids)
        spec = cls.define_schema().inputs[-1]
        assert spec.default == "auto" and list(spec.options) == ["auto", "on", "off"] and spec.optional
    with pytest.raises(ValueError, match="checkpoint"):
        inputs.solver_options(node_cls, "forward", 5, checkpoint="bogus")
    assert inputs.solver_options(node_cls, "forward", 5, checkpoint="on").checkpoint == "on"
    assert inputs.solver_options(node_cls, "forward", 5).checkpoint == "auto"
    image = photos64["astronaut"][:, :32, :32]
    latent, _ = run_node(image, taef2, steps=3, method="forward", rival="off", checkpoint="on")
    assert _trace(pack, latent)["options"]["checkpoint"] == "on"
    latent, _ = run_node(image, taef2, steps=3, method="forward", rival="off")
    assert _trace(pack, latent)["options"]["checkpoint"] == "auto"
    with pytest.raises(ValueError, match="checkpoint"):  # the tiled node passes it on too
        with torch.inference_mode():
            tiled.execute(image, taef2, 64, 16, 64, 8, 3, "forward", rival="off", checkpoint="bogus")

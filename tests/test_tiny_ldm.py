"""The trained tiny latent diffusion model (tests/data/tiny_ldm/, bench/train_ldm.py) on the real host:
the committed weights load as a ComfyUI MODEL, they are a trained denoiser (their held-out loss is
far below the untrained network's), they reproduce the loss recorded in their metadata, and the
training script reproduces the committed loss curve's first steps."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FIRST_STEPS = 20


@pytest.fixture(scope="module")
def trained(host):
    from safetensors import safe_open

    from bench import train_ldm
    from tests.support.diffusion import TRAINED_WEIGHTS, trained_model
    from tests.support.models import kl_f8_small_vae

    with safe_open(str(TRAINED_WEIGHTS), "pt") as f:
        meta = f.metadata()
    maps = train_ldm.latent_maps(kl_f8_small_vae(), train_ldm.photos())
    return trained_model(), maps, meta


def _eval_loss(model, maps, meta) -> float:
    from bench import train_ldm

    schedule = train_ldm.alphas_cumprod(model.get_model_object("model_sampling"))
    return train_ldm.eval_loss(model.model.diffusion_model, maps, float(meta["scale_factor"]), schedule)


def test_committed_weights_are_a_comfyui_eps_model(trained):
    import comfy.model_patcher
    import comfy.model_sampling

    model, _, meta = trained
    assert isinstance(model, comfy.model_patcher.ModelPatcher)
    assert isinstance(model.get_model_object("model_sampling"), comfy.model_sampling.EPS)
    assert model.get_model_object("latent_format").scale_factor == pytest.approx(float(meta["scale_factor"]))
    assert (REPO / "tests/data/tiny_ldm/tiny_ldm.safetensors").stat().st_size <= 20 * 2 ** 20


def test_committed_weights_reproduce_their_recorded_eval_loss(trained):
    model, maps, meta = trained
    assert _eval_loss(model, maps, meta) == pytest.approx(float(meta["eval_loss"]), rel=1e-3)


def test_trained_model_denoises_far_better_than_its_untrained_start(trained):
    """The untrained start predicts eps = 0 (output conv zeroed): its loss is E[eps^2] = 1."""
    from bench import train_ldm

    model, maps, meta = trained
    trained_loss = _eval_loss(model, maps, meta)
    unet = model.model.diffusion_model
    saved = {k: v.clone() for k, v in unet.state_dict().items()}
    try:
        with torch.inference_mode(False):
            unet.load_state_dict(train_ldm.initial_weights(unet, int(meta["seed"])))
        untrained_loss = _eval_loss(model, maps, meta)
    finally:
        with torch.inference_mode(False):
            unet.load_state_dict(saved)
    assert untrained_loss == pytest.approx(1.0, abs=0.05)
    assert trained_loss < 0.5 * untrained_loss, (trained_loss, untrained_loss)


def _losses(path: Path) -> list[float]:
    with open(path) as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_training_script_reproduces_the_committed_loss_curve(tmp_path):
    """The first steps of `python -m bench.train_ldm` (same seed, data and warm-up) give the committed
    curve's losses: the weights come from this script. Tolerance: float sums differ in their last bits
    with the thread count, which grows a little over the steps."""
    proc = subprocess.run([sys.executable, "-m", "bench.train_ldm", "--steps", str(FIRST_STEPS), "--out",
                           str(tmp_path), "--no-samples"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = _losses(tmp_path / "loss.csv")
    committed = _losses(REPO / "tests/data/tiny_ldm/loss.csv")[:FIRST_STEPS]
    assert len(ours) == FIRST_STEPS
    assert ours == pytest.approx(committed, rel=0.02)

"""`exact-encode --ray` on a local Ray cluster started here (2 CPUs, loopback only)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.support.cli_data import kl_small_dir, make_images
from tests.support.library import exact_encode, readme_commands, one_torch_thread_fixture

ee = exact_encode()
one_torch_thread = one_torch_thread_fixture()
ray = pytest.importorskip("ray")
pytest.importorskip("diffusers")
from exact_encode.adapters.encode_job import Encoder, Settings, list_images, vae_sha256  # noqa: E402
from exact_encode.adapters.ray_data import run_on_ray  # noqa: E402
from exact_encode.adapters.vae_files import load_vae  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def settings():
    vae = kl_small_dir()
    return Settings(vae=str(vae), vae_sha256=vae_sha256(load_vae(vae).files), steps=4, device="cpu")


def latents(folder: Path) -> dict:
    from safetensors.torch import load_file

    return {p.name: load_file(str(p))["latent"] for p in sorted(folder.glob("*.safetensors"))}


def test_same_latents_as_one_process_with_an_actor_killed_mid_job(cluster, settings, tmp_path):
    """One Ray job on 8 images; the worker process of the actor that returned first is SIGKILLed
    while it works on its next batch. Ray Data restarts the actor and retries the batch."""
    make_images(tmp_path / "in", 8, sizes=((40, 32), (32, 32)))
    todo = [(str(p), n) for p, n in list_images([tmp_path / "in"])]
    Encoder(settings).run(todo, tmp_path / "single")
    rows, killed = [], []

    def on_row(row):
        rows.append(row)
        if not killed:
            os.kill(row["pid"], signal.SIGKILL)
            killed.append(row["pid"])

    run_on_ray(settings, todo, tmp_path / "ray", 1, on_row, actors=2)
    assert killed
    assert sorted(r["input"] for r in rows) == sorted(p for p, _ in todo)  # every image reported exactly once
    assert {r["status"] for r in rows} == {"ok"}
    assert len({r["pid"] for r in rows}) >= 2  # more than one actor process did the work
    single, distributed = latents(tmp_path / "single"), latents(tmp_path / "ray")  # loads each: none truncated
    assert sorted(distributed) == sorted(f"{n}.safetensors" for _, n in todo)
    for name in single:
        assert torch.allclose(single[name], distributed[name], atol=1e-5), name


def test_readme_ray_section_resumes_after_the_driver_is_killed(cluster, tmp_path):
    """The README's two Ray commands: the first is SIGKILLed once outputs appear, the second
    (--resume) finishes the job; `--ray auto` joins the cluster this test started."""
    make_images(tmp_path / "in", 8)
    out = tmp_path / "out"
    vae = kl_small_dir() / "kl_f8_small.safetensors"  # config.json beside it
    first, resume = readme_commands("test: readme-ray", {
        "/shared/photos": str(tmp_path / "in"), "/shared/ae.safetensors": str(vae), "/shared/latents": str(out),
        "--ray auto": f"--ray {cluster}"})
    extra = ["--steps", "4", "--device", "cpu", "--actors", "2"]
    driver = subprocess.Popen(first + extra, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not list(out.glob("*.safetensors")) and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert driver.poll() is None, driver.communicate()[1][-3000:]
    finally:
        driver.kill()  # SIGKILL: no clean-up code of the driver runs
        driver.communicate()
    time.sleep(2)  # Ray stops the dead driver's actors; a file being renamed lands whole or not at all
    before = set(latents(out))  # loads each: whole files only
    assert 1 <= len(before) < 8  # killed mid-job
    report = out / "report.jsonl"
    earlier = len(report.read_text().splitlines()) if report.exists() else 0
    done = subprocess.run(resume + extra, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(latents(out)) == 8
    rows = [json.loads(line) for line in report.read_text().splitlines()[earlier:]]  # the resumed run's
    assert sorted(Path(r["input"]).stem for r in rows) == [f"img{i:02d}" for i in range(8)]
    skipped = {Path(r["output"]).name for r in rows if r["status"] == "skipped"}
    redone = {Path(r["output"]).name for r in rows if r["status"] == "ok"}
    assert before <= skipped and not skipped & redone and len(skipped | redone) == 8

"""`exact-encode` (core/cli.py) on the shared kl_f8_small VAE and small seeded images."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.support.cli_data import kl_small_dir, make_images
from tests.support.library import REPO, exact_encode, readme_commands, one_torch_thread_fixture

ee = exact_encode()
one_torch_thread = one_torch_thread_fixture()
pytest.importorskip("diffusers")
from exact_encode.adapters import encode_job  # noqa: E402
from exact_encode.cli import main  # noqa: E402

STEPS = ["--steps", "3"]


def encode(capsys, inputs, out, *extra) -> tuple[int, list[dict]]:
    code = main(["encode", *map(str, inputs), "--vae", str(kl_small_dir()), "--out", str(out), "--json", *STEPS,
                 *extra])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    return code, lines


def read(path: Path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.get_tensor("latent"), f.metadata()


def test_encode_writes_latents_report_and_lists_bad_files(tmp_path, capsys):
    from exact_encode.adapters.diffusers import diffusers_codec
    from exact_encode.adapters.images import load_image
    from exact_encode.adapters.vae_files import load_vae

    images = make_images(tmp_path / "in", 2, sizes=((45, 37), (40, 32)), bad=True)
    code, lines = encode(capsys, [tmp_path / "in"], tmp_path / "out")
    summary = lines[-1]
    assert code == 1 and summary["ok"] == 2
    assert {Path(f["input"]).name for f in summary["failed"]} == {"broken.png", "tiny.png"}
    reasons = {Path(f["input"]).name: f["reason"] for f in summary["failed"]}
    assert "UnidentifiedImageError" in reasons["broken.png"] and "smaller than one latent cell" in reasons["tiny.png"]
    report = [json.loads(line) for line in (tmp_path / "out" / "report.jsonl").read_text().splitlines()]
    assert sorted(Path(r["input"]).name for r in report) == ["broken.png", "img00.png", "img01.png", "tiny.png"]
    latent, meta = read(tmp_path / "out" / "img00.safetensors")
    assert meta["cropped_size"] == "40x32" and meta["source_size"] == "45x37"  # the centre crop to 8 px cells
    assert latent.shape == (4, 4, 5)
    for key in ("method", "steps", "psnr_encoder", "psnr_exact", "vae_sha256", "tool_version", "job_key"):
        assert meta[key]
    assert float(meta["psnr_exact"]) >= float(meta["psnr_encoder"])
    # the file holds what the library computes for the same image
    codec = diffusers_codec(load_vae(kl_small_dir()).model)
    direct = ee.invert(codec, load_image(images[0]), method="anderson", steps=3).latent[0]
    assert torch.allclose(latent, direct, atol=1e-5)


def test_a_gradient_method_job_reports_the_returned_latents_residual(tmp_path, capsys):
    """Jobs encode a gradient method's residual every 4th iterate only (core.solver.REPORTED_RESIDUAL_EVERY):
    the latent is the library's every-iterate one, and the report still has its residual."""
    from exact_encode.adapters.diffusers import diffusers_codec
    from exact_encode.adapters.images import load_image
    from exact_encode.adapters.vae_files import load_vae

    images = make_images(tmp_path / "in", 1)
    code, _ = encode(capsys, [tmp_path / "in"], tmp_path / "out", "--method", "diis")
    assert code == 0
    latent, meta = read(tmp_path / "out" / "img00.safetensors")
    codec = diffusers_codec(load_vae(kl_small_dir()).model)
    direct = ee.invert(codec, load_image(images[0]), method="diis", steps=3)
    assert torch.allclose(latent, direct.latent[0], atol=1e-5)
    assert float(meta["residual_db"]) == pytest.approx(direct.samples[0].residual_db_best, abs=1e-2)
    assert encode_job.Settings(vae="v", vae_sha256="0", method="diis").options().residual_stride == 4


def test_resume_skips_by_content_and_settings_not_by_name(tmp_path, capsys, monkeypatch):
    make_images(tmp_path / "in", 3)
    out = tmp_path / "out"
    assert encode(capsys, [tmp_path / "in"], out)[0] == 0
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}
    code, lines = encode(capsys, [tmp_path / "in"], out, "--resume")
    assert code == 0 and lines[-1]["skipped"] == 3 and lines[-1]["ok"] == 0
    # new bytes under the same name, and a truncated output: exactly those two are redone
    from tests.support.cli_data import smooth_image

    smooth_image(50, 40, 32).save(tmp_path / "in" / "img01.png")
    data = (out / "img02.safetensors").read_bytes()
    (out / "img02.safetensors").write_bytes(data[: len(data) // 2])
    code, lines = encode(capsys, [tmp_path / "in"], out, "--resume")
    assert code == 0 and lines[-1]["skipped"] == 1 and lines[-1]["ok"] == 2
    assert (out / "img00.safetensors").stat().st_mtime_ns == stamps["img00.safetensors"]
    read(out / "img02.safetensors")  # whole again
    # other settings are another job
    settings = encode_job.Settings(vae="v", vae_sha256="h", steps=3)
    assert encode_job.job_key("x", settings) != encode_job.job_key("x", encode_job.Settings(vae="v", vae_sha256="h"))
    # and so are outputs made by an older image loader (one that read the same bytes into other pixels)
    older = encode_job.job_key("x", settings)
    monkeypatch.setattr(encode_job, "LOADER", "1: no EXIF orientation")
    assert encode_job.job_key("x", settings) != older


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    import safetensors.torch

    target = tmp_path / "a.safetensors"
    encode_job.write_atomic(target, torch.ones(2), {"v": 1})

    def half_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", half_write)
    with pytest.raises(OSError):
        encode_job.write_atomic(target, torch.zeros(2), {"v": 2})
    assert read(target)[1]["v"] == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]  # no temp file left behind


def test_ctrl_c_leaves_only_whole_files(tmp_path):
    # Enough work that the signal lands mid-job on an idle machine too (8 images x 20 steps
    # finished before it arrived in CI): 48 images, auto-stop cannot end them in under 20 steps.
    make_images(tmp_path / "in", 48)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "exact_encode.cli", "encode", str(tmp_path / "in"), "--vae", str(kl_small_dir()),
           "--out", str(out), "--steps", "200"]
    # A job started in the background inherits SIGINT ignored (POSIX), and Python then installs no
    # KeyboardInterrupt handler: give the child the default disposition, as a terminal user's shell does.
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 240
        while not list(out.glob("*.safetensors")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err
    done = sorted(out.glob("*.safetensors"))
    assert 1 <= len(done) < 48
    for path in done:
        assert read(path)[0].shape == (4, 4, 5)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    rows = [json.loads(line) for line in (out / "report.jsonl").read_text().splitlines()]
    assert sorted(Path(r["output"]).name for r in rows) == [p.name for p in done]


def test_inspect_prints_metadata_and_fails_on_non_outputs(tmp_path, capsys):
    make_images(tmp_path / "in", 1)
    encode(capsys, [tmp_path / "in"], tmp_path / "out")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    code = main(["inspect", str(tmp_path / "out" / "img00.safetensors"), str(tmp_path / "junk.safetensors"), "--json"])
    first, second = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert code == 1
    assert first["latent_shape"] == [4, 4, 5] and first["method"] == "anderson" and first["steps"] == "3"
    assert "error" in second
    assert main(["inspect", str(tmp_path / "out" / "img00.safetensors")]) == 0
    assert "psnr_exact" in capsys.readouterr().out


def test_readme_cli_section_runs(tmp_path):
    """The README's commands, in a folder with photos/, more.png and sdxl_vae.safetensors (the
    shared small KL VAE under that name: no config.json, so its architecture comes from the shapes)."""
    from tests.support.cli_data import smooth_image

    make_images(tmp_path / "photos", 1)
    (tmp_path / "photos" / "img00.png").rename(tmp_path / "photos" / "cat.png")
    smooth_image(7, 48, 40).save(tmp_path / "more.png")
    (tmp_path / "sdxl_vae.safetensors").symlink_to(kl_small_dir() / "kl_f8_small.safetensors")
    first, resumed, inspect = readme_commands("test: readme-cli", {"--steps 50": "--steps 2"})
    for cmd in (first, resumed):
        done = subprocess.run(cmd + ["--json"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.splitlines()[-1])
    assert (summary["ok"], summary["skipped"]) == (1, 1)  # more.png is new; cat.png was done
    shown = subprocess.run(inspect, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    meta = json.loads(shown.stdout)
    assert meta["latent_format"] == "sdxl" and float(meta["scaling_factor"]) == 0.13025
    assert meta["latent_shape"] == [4, 4, 5]


def test_time_budget_goes_to_the_solver_or_is_refused_with_the_reason(tmp_path, capsys):
    from dataclasses import fields

    settings = encode_job.Settings(vae="v", vae_sha256="h", time_budget=5.0)
    if "time_budget" in {f.name for f in fields(ee.InversionOptions)}:
        assert settings.options().time_budget == 5.0
        return
    with pytest.raises(ValueError, match="no time budget"):
        settings.options()
    make_images(tmp_path / "in", 1)
    code = main(["encode", str(tmp_path / "in"), "--vae", str(kl_small_dir()), "--out", str(tmp_path / "out"),
                 "--time-budget", "5"])
    assert code == 2 and "--time-budget" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before any work


def test_rival_flag_reaches_the_solver_and_each_output_says_what_the_rival_did(tmp_path, capsys):
    """--rival off keeps the job gradient-free (the library's rival="" latent); by default each output records
    whether the rival ran and was chosen, beside which rule picked the returned iterate."""
    from exact_encode.adapters.diffusers import diffusers_codec
    from exact_encode.adapters.images import load_image
    from exact_encode.adapters.vae_files import load_vae

    images = make_images(tmp_path / "in", 1)
    assert encode(capsys, [tmp_path / "in"], tmp_path / "default")[0] == 0
    assert encode(capsys, [tmp_path / "in"], tmp_path / "off", "--rival", "off")[0] == 0
    _, meta = read(tmp_path / "default" / "img00.safetensors")
    latent_off, meta_off = read(tmp_path / "off" / "img00.safetensors")
    codec = diffusers_codec(load_vae(kl_small_dir()).model)
    direct = ee.invert(codec, load_image(images[0]), method="anderson", steps=3)
    free = ee.invert(codec, load_image(images[0]), method="anderson", steps=3, rival="")
    assert meta["selection"] == direct.samples[0].selection and meta["rival"] == direct.rival_outcome(0)
    assert meta["rival"] in ("chosen", "not chosen")  # 3 steps stay below the noise floor: the twin decides
    assert meta_off["rival"] == "" and torch.allclose(latent_off, free.latent[0], atol=1e-5)
    assert json.loads(meta_off["options"])["rival"] == "off"  # another job for --resume
    settings = encode_job.Settings(vae="v", vae_sha256="h", rival="off", memory_limit_mb=512)
    assert (settings.options().rival, settings.options().memory_limit_mb) == ("", 512)
    for bad in (dict(rival="adam"), dict(memory_limit_mb=-1)):
        with pytest.raises(ValueError, match="--rival|--memory-limit-mb"):
            encode_job.Settings(vae="v", vae_sha256="h", **bad).options()


def test_checkpoint_and_backward_rows_flags_reach_the_solver_or_fail_before_any_work(tmp_path, capsys):
    """--checkpoint and --backward-rows become InversionOptions.checkpoint / backward_rows (and part of the job key:
    another job for --resume); a bad value is refused naming the flag, before the output folder exists."""
    from exact_encode.cli import build_parser, plan

    make_images(tmp_path / "in", 1)
    base = ["encode", str(tmp_path / "in"), "--vae", str(kl_small_dir()), "--out", str(tmp_path / "out")]
    settings, todo, _ = plan(build_parser().parse_args(base + ["--checkpoint", "on", "--backward-rows", "1"]))
    options = settings.options()
    assert (options.checkpoint, options.backward_rows) == ("on", 1) and len(todo) == 1
    default = plan(build_parser().parse_args(base))[0].options()
    assert (default.checkpoint, default.backward_rows) == ("auto", 0)
    assert encode_job.job_key("x", settings) != encode_job.job_key("x", plan(build_parser().parse_args(base))[0])
    assert main(base + ["--backward-rows", "-1"]) == 2
    assert "--backward-rows" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse's choices: usage error (exit 2) naming the flag
        main(base + ["--checkpoint", "sometimes"])
    assert "--checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before any work
    for bad in (dict(checkpoint="sometimes"), dict(backward_rows=-1), dict(backward_rows=1.5)):
        with pytest.raises(ValueError, match="--checkpoint|--backward-rows"):
            encode_job.Settings(vae="v", vae_sha256="h", **bad).options()

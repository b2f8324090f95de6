"""`python -m bench.run --quick` end to end, in a subprocess: the documented keys and sane values;
bench.memory's live-tensor peak against known allocations. No timing assertions (CI machines are
shared and slow)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

ROW_KEYS = {"method", "model", "size", "dtype", "image", "steps", "nmse_db", "psnr_db", "iters", "seconds",
            "peak_mb", "residual_db", "peak_memory_method", "accuracy_meaningful"}
SUMMARY_KEYS = {"speedup_to_grad100", "mem_ratio_vs_grad", "overhead_vs_floor", "bf16_mem_ratio",
                "bf16_nmse_delta_db", "targets", "by_size", "grad_ref", "size", "floor_peak_mb", "loop_extra_mb"}
META_KEYS = {"torch", "device", "cpu_count", "date", "quick", "steps", "sizes", "dtypes", "models",
             "memory_method", "isolation", "configs"}
TARGETS = {"speed_6x", "memory_10pct", "overhead_1p10", "bf16"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    files = sorted(out.glob("*.json"))
    assert len(files) == 1, list(out.iterdir())
    return json.loads(files[0].read_text()), files[0].with_suffix(".md").read_text()


def bench_json(module: str, args: list[str], out: Path, pattern: str, timeout: int = 900) -> dict:
    """`python -m bench.<module> <args> --out <out>` from the repository root, which must succeed: its one result JSON
    (the file in `out` matching `pattern`)."""
    proc = subprocess.run([sys.executable, "-m", f"bench.{module}", *args, "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    (path,) = out.glob(pattern)
    return json.loads(path.read_text())


def finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def test_quick_json_has_the_documented_keys(quick):
    result, _ = quick
    assert set(result) == {"summary", "rows", "meta"}
    meta = result["meta"]
    assert META_KEYS <= set(meta), META_KEYS - set(meta)
    assert meta["quick"] is True and meta["errors"] == 0
    assert set(result["summary"]) == {"taef2", "kl_f8_small"}
    for model, s in result["summary"].items():
        assert SUMMARY_KEYS <= set(s), (model, SUMMARY_KEYS - set(s))
        assert set(s["targets"]) == TARGETS
        for t in s["targets"].values():
            assert t["met"] in (True, False, None)
    for r in result["rows"]:
        assert not r.get("error"), r.get("error")
        assert ROW_KEYS <= set(r), (r["method"], ROW_KEYS - set(r))


def test_quick_has_a_row_for_every_method_and_model(quick):
    result, _ = quick
    methods = set(result["meta"]["configs"])  # encoder, paper, ours, forward, km, ..., 4 gradient settings
    assert {"encoder", "paper", "ours", "forward", "km", "grad-lr0.1-cos", "grad-lr0.1-const",
            "grad-lr0.01-cos", "grad-lr0.01-const"} <= methods
    for model in ("taef2", "kl_f8_small"):
        fp32 = {r["method"] for r in result["rows"] if r["model"] == model and r["dtype"] == "fp32"}
        assert fp32 == methods, (model, methods - fp32)
        bf16 = {r["method"] for r in result["rows"] if r["model"] == model and r["dtype"] == "bf16"}
        assert "ours" in bf16


def test_quick_values_are_sane(quick):
    result, md = quick
    steps = result["meta"]["steps"]
    for r in result["rows"]:
        assert finite(r["nmse_db"]) and r["nmse_db"] < 0, r  # real models: the latent is close to z_gt
        assert finite(r["psnr_db"]) and r["psnr_db"] > 15, r
        assert finite(r["seconds"]) and r["seconds"] > 0, r
        assert finite(r["peak_mb"]), r
        if r["method"] == "encoder":
            assert r["iters"] == 0 and finite(r["decode_peak_mb"])
        elif r["method"] == "ours-restart":  # a restarted sample counts both runs' iterations (core.unstable)
            assert r["iters"] in (steps, 2 * steps), r["iters"]
        elif r["method"] == "ours":  # where the diis rival's pick is returned, its iterations follow the first run's
            assert r["iters"] in (steps, 2 * steps + 1) and len(r["trace"]["nmse_db"]) == steps + 1, r["iters"]
            assert r["psnr_db"] >= r["psnr_encoder_db"] - 1e-4, r  # the tracer sees the fixed-point run's iterates
        else:
            assert r["iters"] == steps and len(r["trace"]["nmse_db"]) == steps + 1, r["method"]
            # the solver never returns worse than the plain encoder (by pixel error)
            assert r["psnr_db"] >= r["psnr_encoder_db"] - 1e-4, r
        if r["method"].startswith("grad-"):
            assert [c["steps"] for c in r["checkpoints"]] == [2, 5, steps]
    for model, s in result["summary"].items():
        assert finite(s["mem_ratio_vs_grad"]) and s["mem_ratio_vs_grad"] >= 0
        assert finite(s["overhead_vs_floor"]) and s["overhead_vs_floor"] > 0
        assert finite(s["bf16_mem_ratio"])
        assert finite(s["bf16_nmse_delta_db"]) and abs(s["bf16_nmse_delta_db"]) < 3, s
        sp = s["speedup_to_grad100"]
        assert (finite(sp) and sp > 0) or s["speedup_to_grad100_reason"], s
    assert "## Targets" in md and "taef2" in md and "kl_f8_small" in md


def test_live_tensor_peak_counts_the_tensors_a_block_keeps_alive_at_once():
    """4 MiB kept + 8 MiB freed + 2 MiB kept: the peak is 12 MiB (both alive), not the 14 MiB
    allocated in total nor the 6 MiB left at the end."""
    import torch

    from bench.memory import LiveTensorPeak

    with LiveTensorPeak("cpu") as live:
        a = torch.empty(2**20)
        b = torch.empty(2**21)
        del b
        c = torch.empty(2**19)
    assert 12 <= live.peak_mb < 12.05, live.peak_mb
    del a, c


def test_inprocess_isolation_measures_what_a_forked_row_does(tmp_path):
    """--isolation inprocess (CUDA's default, where fork is impossible) on this CPU: the same rows as the
    forked default, with the same latents, and no .partial.json left once the run is written."""
    results = {}
    for isolation in ("inprocess", "fork"):
        out = tmp_path / isolation
        args = ["--quick", "--models", "taef2", "--dtypes", "fp32", "--steps", "2", "--repeats", "1",
                "--methods", "encoder", "ours", "grad-lr0.1-cos", "--isolation", isolation, "--out", str(out)]
        proc = subprocess.run([sys.executable, "-m", "bench.run", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-4000:]
        (result,) = [json.loads(f.read_text()) for f in out.glob("*.json")]
        assert result["meta"]["isolation"] == isolation and not list(out.glob("*.partial.json"))
        results[isolation] = {r["method"]: r["nmse_db"] for r in result["rows"]}
    assert set(results["inprocess"]) == {"encoder", "ours", "grad-lr0.1-cos"}
    assert results["inprocess"] == pytest.approx(results["fork"], abs=1e-4)


@pytest.mark.slow
def test_gpu_script_quick_mode_passes_here(tmp_path):
    """bench/gpu.sh --quick: the GPU run's stages, tiny, on this machine's device (CPU in CI):
    precision rows in fp32 and bf16, the memory rows with a live-tensor ratio, issue 12's table
    stage with its convergence table (the hybrid row in it)."""
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh"), "--quick", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=2000)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = json.loads((tmp_path / "gpu-run.json").read_text())
    names = [s["name"] for s in run["stages"]]
    assert {"precision rows", "memory rows", "node check", "issue 12 table taef2"} <= set(names)
    assert all(s["returncode"] == 0 for s in run["stages"]), run["stages"]
    check = json.loads(next(tmp_path.glob("*-node-check.json")).read_text())
    assert {(r["path"], r["precision"]) for r in check["rows"]} == {(p, q) for p in ("node", "library")
                                                                    for q in ("auto", "fp32")}
    assert all("error" not in r and r["exact_psnr_db"] >= r["stock_psnr_db"] for r in check["rows"]), check["rows"]
    table = next(tmp_path.glob("*-gpu-table-taef2-convergence.md")).read_text()
    assert "| taef2 | stars |" in table and "hybrid" in table
    precision = json.loads(next(tmp_path.glob("*-gpu-precision.json")).read_text())
    assert {r["dtype"] for r in precision["rows"] if r["method"] == "ours"} >= {"fp32", "bf16"}
    assert precision["meta"]["errors"] == 0
    memory = json.loads(next(tmp_path.glob("*-memory-live-gpu.json")).read_text())
    assert {r["method"] for r in memory["rows"]} == {"encoder", "ours", "ours-free", "gradient", "ours-ckpt",
                                                     "gradient-ckpt"}
    ratio = memory["ratios"]["32"]["ours-free / gradient"]["live"]
    assert finite(ratio) and 0 < ratio < 1, memory["ratios"]  # gradient-free: no backprop activations kept
    assert finite(memory["ratios"]["32"]["ours / gradient"]["live"])  # the default's rival keeps them
    assert finite(memory["ratios"]["32"]["ours-ckpt / gradient-ckpt"]["live"])


@pytest.mark.slow
def test_watermark_quick_measures_every_cell(tmp_path):
    """`python -m bench.watermark --quick --n 2` on the trained tiny model: one row per attack x encoder x
    inversion, every measure present and in range, the markdown table written. Two images per set, not the quick
    mode's four: 147 s instead of 242 s in a one-thread test worker (two clean-clone runs), most of it the default's
    rival, which runs one image at a time."""
    proc = subprocess.run([sys.executable, "-m", "bench.watermark", "--quick", "--n", "2", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    files = sorted(tmp_path.glob("*-watermark-quick.json"))
    assert len(files) == 1, list(tmp_path.iterdir())
    result = json.loads(files[0].read_text())
    assert result["meta"]["complete"] is True
    cells = {(r["attack"], r["encoder"], r["inversion"]) for r in result["rows"]}
    assert cells == {(a, e, i) for a in ("none", "jpeg90", "resize0.75", "noise2")
                     for e in ("stock", "default", "adam", "gradient", "hybrid") for i in ("naive", "exact")}
    for r in result["rows"]:
        for k in ("ring_auc", "ring_tpr_at_1pct_fpr", "rand_auc", "rand_tpr_at_1pct_fpr", "key_accuracy_l1",
                  "key_accuracy_p", "clean_p_below_001"):
            assert 0.0 <= r[k] <= 1.0, (k, r)
        assert finite(r["latent_nmse_db"]) and finite(r["noise_nmse_db"]) and r["encode_s_per_image"] > 0
    table = files[0].with_suffix(".md").read_text()
    assert table.count("| VAE Encode (stock) |") == 8 and "## attack: resize0.75" in table


def test_residual_every_bench_returns_the_same_latent_at_every_setting(tmp_path):
    """`python -m bench.residual_every` on one small cell: it exits non-zero unless the latent of every
    residual setting is the identical tensor; one row per method, the table written."""
    proc = subprocess.run([sys.executable, "-m", "bench.residual_every", "--models", "kl_f8_small", "--images",
                           "astronaut", "--methods", "gradient", "diis", "--size", "32", "--steps", "6",
                           "--repeats", "1", "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    (result,) = [json.loads(f.read_text()) for f in tmp_path.glob("*-residual-every.json")]
    assert [r["method"] for r in result["rows"]] == ["gradient", "diis"]
    assert all(r["same_latent"] and all(s > 0 for s in r["seconds"].values()) for r in result["rows"])
    assert "| kl_f8_small | astronaut | diis |" in (
        tmp_path / f"{result['meta']['date']}-cpu-residual-every.md").read_text()


def test_linear_probe_math_on_known_linear_maps():
    """bench.linear_probe's Jacobians, CGLS and Adam on maps whose answers are known exactly."""
    from bench import linear_probe as lp

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(48, 12, generator=gen, dtype=torch.float64)

    def decode(z):
        return (z.reshape(z.shape[0], -1).double() @ a.T).float().reshape(z.shape[0], 3, 4, 4)
    z0 = torch.randn(1, 3, 2, 2, generator=gen)
    assert torch.allclose(lp.decoder_jacobian(decode, z0), a, atol=2e-3)

    def encode(p):
        return (p.reshape(p.shape[0], -1) @ a.float()).reshape(p.shape[0], 3, 2, 2)
    assert torch.allclose(lp.encoder_jacobian(encode, torch.rand(1, 3, 4, 4), 12, chunk=5), a.T, atol=1e-5)
    r0 = torch.randn(48, generator=gen, dtype=torch.float64) * 0.1
    optimum = lp.psnr_of(r0 - a @ torch.linalg.lstsq(a, r0).solution)
    curve = lp.cgls_psnrs(a, r0, 12)  # exact in n = 12 iterations, never worse along the way
    assert curve[0] == pytest.approx(lp.psnr_of(r0)) and curve[-1] == pytest.approx(optimum, abs=1e-6)
    assert all(later >= earlier - 1e-9 for earlier, later in zip(curve, curve[1:]))
    assert lp.psnr_of(r0) < lp.adam_on_linear_model(a, r0, 0.01) <= optimum + 1e-9
    spd = a.T @ a
    assert torch.allclose(lp.symmetric_sqrt(spd) @ lp.symmetric_sqrt(spd), spd, atol=1e-8)


def test_linear_probe_runs_on_a_real_vae():
    """`python -m bench.linear_probe` on kl_f8_small at 32 px: one table row whose finite-difference
    Jacobian agrees with autograd's gradient and whose linear optimum is above the encoder's PSNR."""
    proc = subprocess.run([sys.executable, "-m", "bench.linear_probe", "kl_f8_small", "astronaut", "32"], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    header, _, row = [line for line in proc.stdout.splitlines() if line.startswith("|")][-3:]

    def split(line):
        return [c.strip() for c in line.strip().strip("|").split("|")]
    cells = dict(zip(split(header), split(row)))
    assert cells["VAE"] == "kl_f8_small" and int(cells["latent entries"]) == 64
    assert float(cells["J_D check"]) < 0.05
    assert float(cells["linear LS optimum"]) > float(cells["PSNR E(x)"])


def test_bench_table_doctest():
    import doctest

    from bench import table

    assert doctest.testmod(table).attempted and not doctest.testmod(table).failed


def test_autostop_counts_iterations_saved_against_the_full_runs_own():
    """With the default's rival a run has more iterations than --steps (the rival's follow the fixed point's): the
    share saved is against the full run's iterations, not --steps
    (bench/results/2026-12-05-cpu-autostop-rival-64px.md)."""
    from bench.autostop import iterations_saved_pct

    cases = [dict(full_iterations=200, auto_iterations=139, psnr=[]),
             dict(full_iterations=100, auto_iterations=100, psnr=[])]
    assert iterations_saved_pct(cases) == round(100 * 61 / 300, 1)
    assert iterations_saved_pct([dict(psnr=[0.0] * 101, auto_iterations=50)]) == 50.0  # older files: the trace's length


def test_rival_race_bench_stops_a_losing_rival_and_returns_the_same_latent(tmp_path):
    """`python -m bench.rival_race` on one small cell where the rival loses (TAEF2 stars, 32 px: stopped at its 20th
    iteration in bench/results/2026-12-05-cpu-rival-race-paper-32px.md); it exits non-zero if the latents differ."""
    result = bench_json("rival_race", ["--models", "taef2", "--images", "stars", "--sizes", "32"], tmp_path,
                        "*-rival-race-paper-32px.json")
    (row,) = result["rows"]
    assert row["same_latent"] and row["rival_ran"] and not row["rival_chosen"] and 20 <= row["stopped_at"] < 100
    assert "Same latent on 1 of 1" in next(tmp_path.glob("*-rival-race-paper-32px.md")).read_text()


def test_pick_probe_reports_the_twins_pick_and_the_pixel_best(tmp_path):
    """`python -m bench.pick_probe` on one small TAEF2 cell where the twin decides and its pick comes first (TAEF2
    stars, 32 px: the drift lowers the pixel error after the pick); the default returned the pick."""
    result = bench_json("pick_probe", ["--models", "taef2", "--images", "stars", "--sizes", "32", "--steps", "30"],
                        tmp_path, "*-pick-probe-32px.json")
    (row,) = result["rows"]
    assert row["why"] == "twin" and row["twin_pick"] < row["pixel_best"]
    assert row["nmse_returned_db"] == row["nmse_twin_pick_db"] < row["nmse_encoder_db"]
    assert all(0 < row[k] < 10
               for k in ("gain_encoder_to_pick", "gain_pick_to_pixel_best", "twin_gain_pick_to_pixel_best"))
    assert "The twin decided 1 of 1" in next(tmp_path.glob("*-pick-probe-32px.md")).read_text()


def test_rival_start_bench_runs_the_default_at_each_start(tmp_path):
    """`python -m bench.rival_start` on one small cell where the rival runs (TAEF2 texture, 32 px), K = 0 and 1:
    one row per K with the returned latent's error, the rival's verdict and its twin's error."""
    result = bench_json("rival_start", ["--models", "taef2", "--images", "texture", "--sizes", "32", "--early", "0",
                                        "1", "--threads", "1"], tmp_path, "*-rival-start.json")
    rows = result["rows"]
    assert [r["early"] for r in rows] == [0, 1] and all(r["rival_ran"] and r["why"] for r in rows)
    assert all(math.isfinite(r["nmse_db"]) and r["twin_rival_db"] is not None for r in rows)
    assert "| taef2 | 32 | texture | 1 |" in next(tmp_path.glob("*-rival-start.md")).read_text()


def test_rival_photos_bench_runs_the_three_defaults_side_by_side(tmp_path):
    """`python -m bench.rival` on one photo as a node gets it (TAEF2 astronaut, 32 px): without the rival, with the
    rival from its early start only, and the default (which also runs it from the first run's pixel-best)."""
    result = bench_json("rival", ["--models", "taef2", "--photos", "astronaut", "--sizes", "32", "--threads", "1"],
                        tmp_path, "*-rival-photos.json")
    (row,) = result["rows"]
    assert row["rival_ran"] and isinstance(row["again_ran"], bool)
    # a real photo is not in the decoder's range: the pick standing after the first rival was not stood for by its
    # twin, so the second run (from the first run's pixel-best) is not made (core.rival.with_rival)
    assert row["again_unjudged"] and not row["again_ran"], row
    assert all(row[k] >= row["psnr_encoder"] for k in ("psnr_free", "psnr_one_rival", "psnr_default"))
    assert all(row[k] > 0 for k in ("seconds_free", "seconds_one_rival", "seconds_default"))
    assert "| taef2 | 32 | astronaut |" in next(tmp_path.glob("*-rival-photos.md")).read_text()


def test_floor_methods_bench_scores_every_method_and_the_default(tmp_path):
    """`python -m bench.floor_methods` on one kl-f8 case at 32 px: each fixed-point method's pixel-best and selected
    latent, their mean and the default, scored against the true latent, never worse than E(x) for the default."""
    result = bench_json("floor_methods", ["--models", "kl_f8_small", "--cases", "coffee", "--sizes", "32",
                                          "--threads", "1"], tmp_path, "*-floor-methods.json")
    (row,) = result["rows"]
    scores = [row[p + m] for p in ("plain_", "selected_") for m in ("paper", "forward", "km", "anderson")]
    assert all(math.isfinite(v) for v in scores + [row["mean_fixed_point"], row["default"]])
    assert row["default"] <= row["encoder"] and row["best_plain"] in ("paper", "forward", "km", "anderson")
    assert row["why_default"] in ("floor", "noise level", "past noise level", "twin", "decoded worse",
                                  "pixel best first")
    assert "| kl_f8_small | 32 | coffee |" in next(tmp_path.glob("*-floor-methods.md")).read_text()


def test_floor_draws_bench_runs_every_method_once_per_draw(tmp_path):
    """`python -m bench.floor_draws` on one kl-f8 case at 32 px, two draws (x, then x nudged): every plain method and
    the default scored per draw, the gap taken between means, the default never worse than E(x) in any draw."""
    result = bench_json("floor_draws", ["--models", "kl_f8_small", "--cases", "coffee", "--sizes", "32", "--draws", "2",
                                        "--threads", "1"], tmp_path, "*-floor-draws.json")
    (row,) = result["rows"]
    for m in ("paper", "forward", "km", "anderson", "default", "no_polish"):
        assert len(row[m]["draws"]) == 2 and row[m]["low"] <= row[m]["mean"] <= row[m]["high"]
    assert row["gap_mean"] == round(row["default"]["mean"] - row[row["best_plain"]]["mean"], 2)
    assert max(row["default"]["draws"]) < row["encoder"]
    assert "| kl_f8_small | 32 | coffee |" in next(tmp_path.glob("*-floor-draws.md")).read_text()


def test_convergence_table_takes_a_changed_defaults_rows_from_another_run(tmp_path):
    """bench.convergence --rows-from: a new run's `ours` rows replace an earlier run's (same VAE, image, size, dtype)
    beside that run's plain rows, and the table says where they came from."""
    from bench import convergence

    def row(method, nmse):
        return {"method": method, "model": "taef2", "image": "stars", "size": 64, "dtype": "fp32", "nmse_db": nmse,
                "psnr_db": 40.0, "seconds": 1.0}

    meta = {"date": "d", "command": "first", "steps": 100, "sizes": [64]}
    first = tmp_path / "first.json"
    first.write_text(json.dumps({"rows": [row("encoder", -20.0), row("ours", -18.0), row("anderson", -25.0)],
                                 "meta": meta}))
    second = tmp_path / "second.json"
    second.write_text(json.dumps({"rows": [row("encoder", -20.0), row("ours", -24.8)],
                                  "meta": dict(meta, command="second")}))
    assert convergence.main([str(first), "--rows-from", str(second)]) == 0
    out = json.loads((tmp_path / "second-convergence.json").read_text())
    default = out["cells"][0]["default"]
    assert default["best_free"] == "anderson" and default["gap_db"] == pytest.approx(0.2) and default["within_0p5_db"]
    assert out["rows_from"][0]["methods"] == ["encoder", "ours"]
    assert "from `second.json` (`second`" in (tmp_path / "second-convergence.md").read_text()


def test_checkpoint_probe_keeps_fewer_live_tensors_for_the_same_gradient():
    """bench.checkpoint_probe on the full-size random SD decoder at 64 px: recomputing each block's activations in the
    backward keeps fewer tensors alive at once and gives the same gradient."""
    proc = subprocess.run([sys.executable, "-m", "bench.checkpoint_probe", "64"], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["blocks"] > 10 and row["same_gradient"] is True
    assert row["checkpointed_live_mb"] < 0.8 * row["plain_live_mb"]


@pytest.mark.parametrize("value", ["abc", "0", "-1", ",2"])
def test_a_bad_omp_num_threads_fails_naming_the_variable(value):
    import doctest

    from bench import environment

    assert not doctest.testmod(environment).failed  # unset, a count, a per-level list
    with pytest.raises(ValueError, match=r"OMP_NUM_THREADS=.*positive integer"):
        environment.threads_from_env(value)

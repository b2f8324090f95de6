"""`exact-encode`: exact latents for folders of images, without ComfyUI.

    exact-encode encode photos/ --vae ae.safetensors --out latents/ [--resume] [--ray [ADDRESS]]
    exact-encode inspect latents/cat.safetensors [--json]

Per image: `<out>/<name>.safetensors` with the latent (C, h, w) and its metadata, a line in
`<out>/report.jsonl`; at the end a summary, and exit code 1 when any image failed (listed).
Needs the `cli` extra (tqdm, Pillow, safetensors, diffusers); `--ray` the `ray` extra.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from . import __version__
from .solver import CHECKPOINTS, METHODS, RIVAL_NAMES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="exact-encode", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"exact-encode {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    enc = sub.add_parser("encode", help="exact latents for image files and folders")
    enc.add_argument("inputs", nargs="+", help="image files or folders (searched recursively)")
    enc.add_argument("--vae", required=True, help="VAE file (.safetensors: SD/SDXL/SD3/FLUX.1, TAESD) or folder "
                                                  "(diffusers, TAESD encoder/decoder pair, file + config.json)")
    enc.add_argument("--out", required=True, help="output folder")
    enc.add_argument("--method", default="anderson", choices=METHODS)
    enc.add_argument("--steps", type=int, default=50)
    enc.add_argument("--tolerance", type=float, default=0.0, help="stop an image at this relative residual (0: off)")
    enc.add_argument("--time-budget", type=float, default=None, help="seconds per batch (needs a solver with it)")
    enc.add_argument("--rival", default="diis", choices=tuple(RIVAL_NAMES),
                     help="where the fixed point's decode stays below the image's noise floor, also run this "
                          "gradient method and keep the run a twin problem vouches for (2-6x the time on those "
                          "images; docs/convergence.md); off: gradient-free throughout")
    enc.add_argument("--memory-limit-mb", type=float, default=0.0,
                     help="cap on the backward-pass activations of the rival / hybrid; above it the image stays "
                          "gradient-free (0: the device's free memory)")
    enc.add_argument("--checkpoint", default="auto", choices=CHECKPOINTS,
                     help="gradient steps' decoder activations: on recomputes each decoder block's in the backward "
                          "(SD decoder at 512 px: 0.43x the memory, the same gradient, +15-25 %% backward time); "
                          "off keeps them all; auto keeps them unless that exceeds --memory-limit-mb's cap and "
                          "recomputing fits")
    enc.add_argument("--backward-rows", type=int, default=0, metavar="N",
                     help="gradient methods / hybrid backpropagate N images of a batch at a time (0: the whole "
                          "batch): fewer activations kept, the same result")
    enc.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"))
    enc.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:1, ...")
    enc.add_argument("--batch-size", type=int, default=1, help="images of one size per solver call")
    enc.add_argument("--latent-format", default="auto", choices=("auto", "sd1", "sdxl", "sd3", "flux", "raw"),
                     help="scaling/shift for single-file VAEs (diffusers folders use their config)")
    enc.add_argument("--resume", action="store_true", help="skip images whose output matches bytes + settings")
    enc.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                     help="run on Ray Data: no value starts a local cluster; 'auto' or host:port joins one")
    enc.add_argument("--actors", type=int, default=None, help="Ray: actor pool size (default: CPUs or GPUs)")
    enc.add_argument("--json", action="store_true", help="one JSON line per image and a JSON summary on stdout")
    ins = sub.add_parser("inspect", help="print an output's metadata")
    ins.add_argument("files", nargs="+")
    ins.add_argument("--json", action="store_true")
    return parser


def plan(args):
    """Settings, the work still to do and the rows for skipped images (resume)."""
    from .adapters.encode_job import Settings, finished, job_key, list_images, output_path, sha256_file, vae_sha256
    from .adapters.vae_files import load_vae

    if args.steps < 1 or args.batch_size < 1:
        raise ValueError("--steps and --batch-size must be >= 1")
    files = load_vae(args.vae, args.latent_format).files  # also checks the VAE before any image work
    settings = Settings(vae=str(args.vae), vae_sha256=vae_sha256(files), latent_format=args.latent_format,
                        method=args.method, steps=args.steps, tolerance=args.tolerance,
                        time_budget=args.time_budget, precision=args.precision, device=args.device,
                        rival=args.rival, memory_limit_mb=args.memory_limit_mb, checkpoint=args.checkpoint,
                        backward_rows=args.backward_rows)
    settings.options()  # a bad flag fails here, before any work
    todo, skipped = [], []
    for path, name in list_images(args.inputs):
        out = output_path(args.out, name)
        if args.resume and path.is_file() and finished(out, job_key(sha256_file(path), settings)):
            skipped.append({"input": str(path), "output": str(out), "status": "skipped", "reason": "done (resume)"})
        else:
            todo.append((str(path), name))
    return settings, todo, skipped


class Reporter:
    """report.jsonl, the progress bar (stderr) and --json lines (stdout)."""

    def __init__(self, out_dir: Path, total: int, as_json: bool):
        from tqdm import tqdm

        out_dir.mkdir(parents=True, exist_ok=True)
        self.report = open(out_dir / "report.jsonl", "a")
        self.as_json, self.rows, self.start = as_json, [], time.perf_counter()
        self.bar = tqdm(total=total, unit="img", file=sys.stderr, disable=as_json or None, dynamic_ncols=True)

    def add(self, row: dict) -> None:
        row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self.rows.append(row)
        line = json.dumps(row)
        self.report.write(line + "\n")
        self.report.flush()
        if self.as_json:
            print(line, flush=True)
        if row["status"] != "skipped":
            self.bar.update(1)
        if row["status"] == "ok":
            self.bar.set_postfix_str(f"{Path(row['input']).name}: {row['gain_db']:+.2f} dB")
        elif row["status"] == "failed":
            self.bar.write(f"failed: {row['input']}: {row['reason']}", file=sys.stderr)

    def close(self) -> dict:
        self.bar.close()
        self.report.close()
        ok = [r for r in self.rows if r["status"] == "ok"]
        mean = (lambda key: round(sum(r[key] for r in ok) / len(ok), 3) if ok else None)
        seconds = time.perf_counter() - self.start
        return {"ok": len(ok), "skipped": sum(r["status"] == "skipped" for r in self.rows),
                "failed": [{"input": r["input"], "reason": r["reason"]} for r in self.rows if r["status"] == "failed"],
                "mean_psnr_encoder": mean("psnr_encoder"), "mean_psnr_exact": mean("psnr_exact"),
                "mean_gain_db": mean("gain_db"), "seconds": round(seconds, 2),
                "images_per_second": round(len(ok) / seconds, 3) if seconds > 0 else None}


def print_summary(summary: dict) -> None:
    rows = [("encoded", summary["ok"]), ("skipped (resume)", summary["skipped"]), ("failed", len(summary["failed"])),
            ("mean PSNR, plain encoder", summary["mean_psnr_encoder"]),
            ("mean PSNR, exact", summary["mean_psnr_exact"]),
            ("mean gain (dB)", summary["mean_gain_db"]), ("wall time (s)", summary["seconds"]),
            ("images / s", summary["images_per_second"])]
    for label, value in rows:
        print(f"{label:<26} {'-' if value is None else value}")
    for f in summary["failed"]:
        print(f"FAILED {f['input']}: {f['reason']}")


def require_extra(modules, extra: str) -> None:
    """A missing optional dependency is an error that names the extra to install."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"{', '.join(missing)} not installed: pip install 'comfyui-exact-encode[{extra}]'")


def cmd_encode(args) -> int:
    from .adapters.encode_job import Encoder

    require_extra(("tqdm", "PIL", "safetensors", "diffusers"), "cli")
    if args.ray is not None:
        require_extra(("ray",), "ray")
    settings, todo, skipped = plan(args)
    reporter = Reporter(Path(args.out), len(todo), args.json)
    try:
        for row in skipped:
            reporter.add(row)
        if args.ray is not None:
            from .adapters.ray_data import run_on_ray

            run_on_ray(settings, todo, args.out, args.batch_size, reporter.add, args.ray, args.actors)
        else:
            Encoder(settings).run(todo, args.out, args.batch_size, on_row=reporter.add)
    finally:
        summary = reporter.close()
    print(json.dumps(summary)) if args.json else print_summary(summary)
    return 1 if summary["failed"] else 0


def cmd_inspect(args) -> int:
    require_extra(("safetensors",), "cli")
    from safetensors import safe_open

    failed = 0
    for name in args.files:
        try:
            with safe_open(name, "pt") as f:
                info = dict(f.metadata() or {}, file=name, latent_shape=list(f.get_slice("latent").get_shape()))
        except Exception as e:
            info, failed = {"file": name, "error": f"{type(e).__name__}: {e}"}, failed + 1
        if args.json:
            print(json.dumps(info))
        else:
            print(name)
            for k, v in sorted(info.items()):
                if k != "file":
                    print(f"  {k:<16} {v}")
    return 1 if failed else 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return cmd_encode(args) if args.command == "encode" else cmd_inspect(args)
    except KeyboardInterrupt:
        print("exact-encode: interrupted; finished outputs are complete, none is partial", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"exact-encode: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Demo: stock VAE Encode vs VAE Exact Encode, on a real headless ComfyUI server.

Starts ComfyUI 0.3.75 headless (tests/support/server.py) with this pack and the test VAE loader,
runs one API-format workflow on a photo:

    LoadImage -> ImageScale (area, centre crop to --size) -> VAEEncode      -> VAEDecode -> SaveImage
                                                          -> VAEExactEncode -> VAEDecode -> SaveImage
                                                          -> SaveImage (the scaled original)

then measures the PSNR of both decodes against the scaled original and copies the three PNGs to
--out. Run it through scripts/demo.sh, which builds the environment first.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))  # appended, never prepended (the repo's nodes/ vs ComfyUI's nodes)

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from tests.support.paths import require  # noqa: E402
from tests.support.server import ComfyServer, ServerError, execution_error  # noqa: E402

VAES = ("taef2", "kl_f8_small")
SAVES = {"original": "8", "plain": "9", "exact": "10"}  # role -> SaveImage node id


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--image", type=Path, default=None,
                   help="photo to encode (default: astronaut.png from the shared images, $EXACT_ENCODE_SHARED)")
    p.add_argument("--size", type=int, default=128, help="side of the centre-cropped square, px")
    p.add_argument("--steps", type=int, default=100, help="VAE Exact Encode iterations")
    p.add_argument("--method", default="anderson",
                   help="VAE Exact Encode method (the node's default; adam = the paper's)")
    p.add_argument("--vae", choices=VAES, default="taef2", help="shared test VAE")
    p.add_argument("--out", type=Path, default=Path("output/demo"), help="where the PNGs are copied")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds to wait for the workflow (default: scaled with size and steps)")
    args = p.parse_args(argv)
    if args.size < 8:
        p.error("--size must be at least 8 (one latent cell)")
    if args.steps < 1:
        p.error("--steps must be at least 1")
    return args


def workflow(image_name: str, size: int, steps: int, method: str, vae: str) -> dict:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image_name}},
        "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "area",
                                                     "width": size, "height": size, "crop": "center"}},
        "3": {"class_type": "ExactEncodeTestVAELoader", "inputs": {"name": vae}},
        "4": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["3", 0]}},
        "5": {"class_type": "VAEExactEncode", "inputs": {"pixels": ["2", 0], "vae": ["3", 0],
                                                         "steps": steps, "method": method}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["3", 0]}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["3", 0]}},
        SAVES["original"]: {"class_type": "SaveImage",
                            "inputs": {"images": ["2", 0], "filename_prefix": "demo_original"}},
        SAVES["plain"]: {"class_type": "SaveImage",
                         "inputs": {"images": ["6", 0], "filename_prefix": "demo_plain_vae_encode"}},
        SAVES["exact"]: {"class_type": "SaveImage",
                         "inputs": {"images": ["7", 0], "filename_prefix": "demo_exact_encode"}},
        "11": {"class_type": "PreviewAny", "inputs": {"source": ["5", 1]}},  # the node's summary
    }


def load_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.float64) / 255.0


def center_crop(a: np.ndarray, h: int, w: int) -> np.ndarray:
    """Crop like ComfyUI's vae_encode_crop_pixels (offset = remainder // 2) when sizes differ."""
    top, left = (a.shape[0] - h) // 2, (a.shape[1] - w) // 2
    return a[top:top + h, left:left + w]


def psnr(reference: np.ndarray, decoded: np.ndarray) -> float:
    reference = center_crop(reference, *decoded.shape[:2])
    mse = float(np.mean((reference - decoded) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)


def main(argv=None) -> int:
    args = parse_args(argv)
    image = args.image.resolve() if args.image else require("images/astronaut.png")
    timeout = args.timeout or 180.0 + 2.0 * args.steps * (args.size / 64) ** 2
    print(f"demo: {image.name}, {args.size}x{args.size} px, {args.vae}, {args.method}, {args.steps} steps")
    t0 = time.monotonic()
    try:
        with ComfyServer(image=image) as server:
            print(f"demo: ComfyUI up at {server.url} in {time.monotonic() - t0:.1f} s (log {server.log_path})")
            reply = server.post_prompt(workflow(server.image_name, args.size, args.steps, args.method, args.vae))
            if reply["http_status"] != 200:
                server.failed = True  # keeps the server log
                print(f"demo: prompt rejected (HTTP {reply['http_status']}):\n{json.dumps(reply, indent=1)}\n"
                      f"server log: {server.log_path}", file=sys.stderr)
                return 1
            t1 = time.monotonic()
            entry = server.wait_history(reply["prompt_id"], timeout=timeout)
            if entry["status"]["status_str"] != "success":
                server.failed = True
                error = execution_error(entry) or entry["status"]
                print(f"demo: workflow failed: {json.dumps(error, indent=1)}\nserver log: {server.log_path}",
                      file=sys.stderr)
                return 1
            print(f"demo: workflow ran in {time.monotonic() - t1:.1f} s")
            files = {}
            for role, node in SAVES.items():
                found = server.output_files(entry, node)
                if len(found) != 1 or not found[0].is_file():
                    server.failed = True
                    print(f"demo: SaveImage {node} ({role}) wrote {found}; server log: {server.log_path}",
                          file=sys.stderr)
                    return 1
                files[role] = found[0]
            summary = entry["outputs"].get("11", {}).get("text", [""])[0]
            original = load_rgb(files["original"])
            plain = psnr(original, load_rgb(files["plain"]))
            exact = psnr(original, load_rgb(files["exact"]))
            args.out.mkdir(parents=True, exist_ok=True)
            copies = {role: args.out / f"{role}.png" for role in files}
            for role, path in files.items():
                shutil.copyfile(path, copies[role])
    except (ServerError, FileNotFoundError, OSError) as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1
    if summary:
        print("VAE Exact Encode summary:\n  " + summary.replace("\n", "\n  "))
    print(f"plain VAE Encode: {plain:.2f} dB, exact encode: {exact:.2f} dB, gain {exact - plain:+.2f} dB")
    print(f"images: {', '.join(str(p) for p in copies.values())}")
    print(f"demo: done in {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How small may a tile be? Measures, on the real TAEF2 and the four photos (256 px), how far the
decode of one tile is from the whole image's decode inside the tile's interior (the tile minus the
feather zone a tiled decode with overlap = tile/4 blends away), for a range of tile sizes:

  * receptive field alone: TAEF2's GroupNorm layers use the whole image's statistics in both
    decodes, so the only difference is the zero padding the tile's border brings in;
  * as tiled: the tile decoded as the tiled codec does it (GroupNorm statistics of the tile).

    .venv/bin/python -m bench.tile_floor          # writes bench/results/tile-floor-<date>-cpu.md

The tile sits at the centre of the 32 x 32 latent. PSNR (and max |error| in 8-bit steps) per photo.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import math
import sys
from pathlib import Path

import torch

from .environment import DEFAULT_THREADS, REPO
from torch import nn

CELLS = (4, 6, 8, 10, 12, 14, 16, 20, 24)  # tile sides in latent cells (8 px each)


class SharedStatsGroupNorm(nn.Module):
    """GroupNorm that keeps the statistics of the last pass with `record` on and reuses them."""

    def __init__(self, gn: nn.GroupNorm):
        super().__init__()
        self.gn, self.stats, self.record = gn, None, True

    def forward(self, x):
        xg = x.reshape(x.shape[0], self.gn.num_groups, -1)
        if self.record:
            self.stats = xg.mean(-1, keepdim=True), xg.var(-1, unbiased=False, keepdim=True)
        mean, var = self.stats
        y = ((xg - mean) / torch.sqrt(var + self.gn.eps)).reshape_as(x)
        return y * self.gn.weight[None, :, None, None] + self.gn.bias[None, :, None, None]


def shared_stats_decoder(model: nn.Module):
    model = copy.deepcopy(model)
    norms = []
    for seq in model.taesd_decoder.modules():
        for i, sub in (enumerate(seq) if isinstance(seq, nn.Sequential) else ()):
            if isinstance(sub, nn.GroupNorm):
                seq[i] = SharedStatsGroupNorm(sub)
                norms.append(seq[i])
    return model, norms


def interior_error(decode, z, full, cells):
    a = (z.shape[-1] - cells) // 2
    m = 8 * (cells // 4)
    piece = decode(z[..., a:a + cells, a:a + cells])
    ref = full[..., a * 8:(a + cells) * 8, a * 8:(a + cells) * 8]
    d = (piece - ref)[..., m:8 * cells - m, m:8 * cells - m]
    mse = d.pow(2).mean().item()
    return (10 * math.log10(1 / mse) if mse > 0 else math.inf), d.abs().max().item() * 255


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="output folder")
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    args = p.parse_args(argv)
    from tests.support import host, models
    from tests.support.images import load_photo
    from tests.support.paths import image_paths

    host.boot()
    torch.set_num_threads(args.threads)
    lines = ["| photo | decode | " + " | ".join(f"{8 * c} px" for c in CELLS) + " |",
             "|---|---|" + "---|" * len(CELLS)]
    with torch.inference_mode():
        vae = models.taef2_vae()
        shared, norms = shared_stats_decoder(vae.first_stage_model)

        def as_tiled(z):
            return vae.process_output(vae.first_stage_model.decode(z))

        def rf_only(z):
            return vae.process_output(shared.decode(z))
        for path in image_paths():
            x = load_photo(path, 256).movedim(-1, 1)
            z = vae.first_stage_model.encode(vae.process_input(x))
            for n in norms:
                n.record = True
            full = rf_only(z)  # records the whole image's statistics
            for n in norms:
                n.record = False
            for name, fn in (("receptive field alone", rf_only), ("as tiled", as_tiled)):
                cols = [interior_error(fn, z, full, c) for c in CELLS]
                lines.append(f"| {path.stem} | {name} | " + " | ".join(f"{p:.1f} dB ({e:.0f})" for p, e in cols) + " |")
                print(lines[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"tile-floor-{datetime.date.today()}-cpu.md"
    out.write_text("# Tile interior vs the whole decode, TAEF2, 256 px photos (python -m bench.tile_floor)\n\n"
                   "PSNR of the tile's interior against the whole image's decode (max |error| in 8-bit steps).\n\n"
                   + "\n".join(lines) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Issue 12, offline: how the twin's pick is carried over to the real run (docs/convergence.md). Reads a
`bench.twin_probe` JSON (real and twin traces per VAE x image x method, each run alone) and scores, per
method, selection rules on issue 12's item 2 (latent NMSE no worse than the encoder's and within 0.5 dB
of the best plain method's pixel-best iterate, over the methods in the JSON):

- `pixel`: the best pixel iterate (what the plain methods return);
- `auto`: what `select="auto"` does: pixel-best where the decode reached the noise floor, else the
  iterate at the twin's lowest latent error (same iteration number), E(x) if that decodes worse;
- `residual`: the twin's pick carried over by *residual level* instead of iteration number: the first
  real iterate whose latent residual is at or below the twin's residual at its pick (a twin that is
  the easier problem gets there in fewer iterations); pixel-best if never reached, E(x) if worse;
- `auto+residual`: `auto`, with the residual-level carry-over below the floor.

    .venv/bin/python -m bench.twin_probe 64 100 kl_f8_small,taef2 astronaut,stars anderson,km /tmp/twin64.json
    .venv/bin/python -m bench.twin_rules 64 /tmp/twin64.json
"""
from __future__ import annotations

import importlib
import json
import sys

from .environment import boot
from .twin_faithful import floors

RULES = ("pixel", "auto", "residual", "auto+residual")
WITHIN_DB = 0.5


def pixel_best(trace: dict) -> int:
    return trace["psnr"].index(max(trace["psnr"]))


def residual_carry(real: dict, twin: dict) -> int:
    """The first real iterate at or below the twin's residual where the twin's latent error was lowest."""
    level = twin["res"][twin["nmse"].index(min(twin["nmse"]))]
    return next((k for k, r in enumerate(real["res"]) if r <= level), pixel_best(real))


def pick(rule: str, real: dict, twin: dict, floor_psnr: float) -> int:
    """The iterate `rule` returns (0 = E(x))."""
    if rule == "pixel" or (rule.startswith("auto") and max(real["psnr"]) >= floor_psnr):
        return pixel_best(real)
    k = residual_carry(real, twin) if "residual" in rule else twin["nmse"].index(min(twin["nmse"]))
    return k if real["psnr"][k] >= real["psnr"][0] else 0


def main(argv=None) -> int:
    size, path = (argv or sys.argv[1:])[:2]
    ctx = boot(2)
    margin = importlib.import_module(ctx.core.__name__ + ".twin").FLOOR_MARGIN_DB
    probe = json.loads(open(path).read())
    floor = floors(ctx, int(size), list(probe))
    best: dict[str, float] = {}
    for key, v in probe.items():
        pair = "/".join(key.split("/")[:2])
        best[pair] = min(best.get(pair, float("inf")), v["real"]["nmse"][pixel_best(v["real"])])
    print("| pair/method | encoder | best plain | " + " | ".join(RULES) + " |")
    print("|---" * (len(RULES) + 3) + "|")
    misses = {}
    for key, v in probe.items():
        pair, method = "/".join(key.split("/")[:2]), key.split("/")[2]
        enc, cells = v["real"]["nmse"][0], []
        for rule in RULES:
            k = pick(rule, v["real"], v["sim"], floor[pair] - margin)
            nmse = v["real"]["nmse"][k]
            miss = nmse > enc or nmse > best[pair] + WITHIN_DB
            misses.setdefault((method, rule), []).append(miss)
            cells.append(f"{nmse:.2f} @{k}" + (" **x**" if miss else ""))
        print(f"| {key} | {enc:.2f} | {best[pair]:.2f} | " + " | ".join(cells) + " |")
    print("\nmisses (worse than the encoder, or more than 0.5 dB from the best plain method):")
    for (method, rule), m in misses.items():
        print(f"- {method} / {rule}: {sum(m)} of {len(m)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One exact-encode job over image files: what the command line runs in one process and what each
Ray actor runs on its share. Outputs are one .safetensors per image (latent + metadata), written
atomically; a job key (hash of the image bytes and every setting that changes the latent) lets a
resumed run skip what is already done."""
from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import torch

from .. import __version__
from ..solver import REPORTED_RESIDUAL_EVERY, RIVAL_NAMES, InversionOptions, invert
from .images import LOADER

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
_UMASK = os.umask(0o022)
os.umask(_UMASK)
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Settings:
    """Everything that decides the latent (plus where the VAE lives); picklable for Ray actors."""

    vae: str
    vae_sha256: str
    latent_format: str = "auto"
    method: str = "anderson"
    steps: int = 50
    tolerance: float = 0.0
    time_budget: Optional[float] = None
    precision: str = "fp32"
    device: str = "auto"  # resolved where the VAE is loaded (a Ray actor may have a GPU the driver lacks)
    rival: str = "diis"  # a name of RIVAL_NAMES: the default's gradient rival, or "off" (gradient-free throughout)
    memory_limit_mb: float = 0.0  # cap on the rival's / hybrid's backward-pass activations (0: InversionOptions')
    checkpoint: str = "auto"  # a name of CHECKPOINTS: recompute the decoder's blocks in the backward (InversionOptions)
    backward_rows: int = 0  # images of a batch one backward pass takes (0: all)

    def options(self) -> InversionOptions:
        extra = {}
        if self.time_budget is not None:
            if "time_budget" not in {f.name for f in fields(InversionOptions)}:
                raise ValueError("--time-budget: this version of exact_encode's solver has no time budget "
                                 "(InversionOptions.time_budget); use --steps / --tolerance instead")
            extra["time_budget"] = self.time_budget
        if self.rival not in RIVAL_NAMES:
            raise ValueError(f"--rival must be one of {', '.join(RIVAL_NAMES)}; got {self.rival!r}")
        if not self.memory_limit_mb >= 0:
            raise ValueError(f"--memory-limit-mb must be >= 0 (0: the default cap); got {self.memory_limit_mb}")
        # the report has the returned latent's residual only: gradient methods need not encode every iterate
        options = InversionOptions(method=self.method, steps=self.steps, tolerance=self.tolerance,
                                   residual_every=REPORTED_RESIDUAL_EVERY, rival=RIVAL_NAMES[self.rival],
                                   memory_limit_mb=self.memory_limit_mb, checkpoint=self.checkpoint,
                                   backward_rows=self.backward_rows, **extra)
        try:
            return options.validate()
        except ValueError as error:
            raise ValueError(_named_as_flag(str(error))) from None

    def key_fields(self) -> dict:
        """What a finished output must have been made with for --resume to skip it. The device is
        left out: CPU and GPU give the same latent up to fp rounding."""
        d = asdict(self)
        for k in ("vae", "device"):
            d.pop(k)
        return dict(d, tool_version=__version__, loader=LOADER)


def _named_as_flag(message: str) -> str:
    """InversionOptions' error, which starts with the field's name, with the command line's flag instead."""
    name, _, rest = message.partition(" ")
    return f"--{name.replace('_', '-')} {rest}" if name in {f.name for f in fields(InversionOptions)} else message


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def vae_sha256(files) -> str:
    """One hash over the VAE's weight files (in a stable order)."""
    h = hashlib.sha256()
    for f in sorted(str(p) for p in files):
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def job_key(image_sha256: str, settings: Settings) -> str:
    blob = json.dumps({"image": image_sha256, **settings.key_fields()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def list_images(inputs) -> list[tuple[Path, str]]:
    """(path, output name) for files and folders (searched recursively) in the given order. Output
    names keep a folder's relative layout; a name clash gets the parent folders prefixed."""
    found = []
    for item in map(Path, inputs):
        if item.is_dir():
            found += [(p, p.relative_to(item).with_suffix("").as_posix()) for p in sorted(item.rglob("*"))
                      if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
        else:
            found.append((item, item.stem))  # missing or non-image files fail later, with a reason
    seen: dict[str, Path] = {}
    out = []
    for path, name in found:
        if name in seen and seen[name] != path:
            name = path.with_suffix("").as_posix().lstrip("/").replace("../", "")
        seen[name] = path
        out.append((path, name))
    return out


def output_path(out_dir, name: str) -> Path:
    return Path(out_dir) / f"{name}.safetensors"


def finished(out_path: Path, key: str) -> bool:
    """An output exists and was made from these very bytes with these settings."""
    if not out_path.exists():
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(out_path), "pt") as f:
            return (f.metadata() or {}).get("job_key") == key
    except Exception:  # unreadable or truncated: do it again
        return False


def write_atomic(out_path: Path, latent: torch.Tensor, metadata: dict) -> None:
    """Temp file in the same folder, fsync, rename: a reader sees the whole file or none."""
    from safetensors.torch import save_file

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        save_file({"latent": latent.contiguous()}, str(tmp), metadata={k: str(v) for k, v in metadata.items()})
        os.chmod(tmp, 0o666 & ~_UMASK)  # like any new file, not the temp file's 0600
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)


class Encoder:
    """The VAE loaded once (per process or per Ray actor) and the loop over images."""

    def __init__(self, settings: Settings):
        from .diffusers import diffusers_codec, latent_factors
        from .vae_files import load_vae

        self.settings, self.options = settings, settings.options()
        loaded = load_vae(settings.vae, settings.latent_format)
        device = ("cuda" if torch.cuda.is_available() else "cpu") if settings.device == "auto" else settings.device
        model = loaded.model.to(device)
        self.codec = diffusers_codec(model, dtype=PRECISIONS[settings.precision])
        self.scale, self.shift = latent_factors(model)
        self.latent_format = loaded.latent_format
        cfg = model.config
        widths = cfg.block_out_channels if loaded.kind == "kl" else cfg.encoder_block_out_channels
        self.cell = 2 ** (len(widths) - 1)

    def _load(self, path: Path):
        from .images import load_image, upright_size

        width, height = upright_size(path)  # as shown: cropped_size is the crop of this, not of the stored pixels
        return load_image(path, self.cell), sha256_file(path), f"{width}x{height}"

    def _write(self, path: Path, name: str, out_dir, image_hash: str, size: str, pixels, s, latent, seconds,
               rival: str) -> dict:
        key = job_key(image_hash, self.settings)
        meta = {"job_key": key, "source": str(path), "source_sha256": image_hash, "source_size": size,
                "cropped_size": f"{pixels.shape[-1]}x{pixels.shape[-2]}", "method": self.options.method,
                "steps": self.options.steps, "iterations": s.iterations, "stop_reason": s.stop_reason,
                "psnr_encoder": round(s.psnr_initial, 4), "psnr_exact": round(s.psnr_best, 4),
                "gain_db": round(s.gain_db, 4), "residual_db": round(s.residual_db_best, 4),
                "selection": s.selection, "rival": rival,
                "vae": Path(self.settings.vae).name, "vae_sha256": self.settings.vae_sha256,
                "latent_format": self.latent_format, "scaling_factor": self.scale, "shift_factor": self.shift,
                "precision": self.settings.precision, "options": json.dumps(self.settings.key_fields()),
                "tool": "exact_encode", "tool_version": __version__}
        out = output_path(out_dir, name)
        write_atomic(out, latent.float().cpu(), meta)
        return {"input": str(path), "output": str(out), "status": "ok", "gain_db": s.gain_db,
                "psnr_encoder": s.psnr_initial, "psnr_exact": s.psnr_best, "iterations": s.iterations,
                "selection": s.selection, "rival": rival, "seconds": round(seconds, 3), "job_key": key,
                "pid": os.getpid()}

    def run(self, items, out_dir, batch_size: int = 1, on_row=None) -> list[dict]:
        """Rows for (path, name) items, `batch_size` images of one size per invert call; a failure
        is a row with its reason, never an exception. `on_row(row)` sees each row as it is done."""
        rows = []

        def emit(row):
            rows.append(row)
            if on_row is not None:
                on_row(row)

        items = [(Path(p), n) for p, n in items]
        for i in range(0, len(items), batch_size):
            loaded = {}  # shape -> [(path, name, pixels, hash, size)]
            for path, name in items[i:i + batch_size]:
                try:
                    pixels, image_hash, size = self._load(path)
                    loaded.setdefault(tuple(pixels.shape), []).append((path, name, pixels, image_hash, size))
                except Exception as e:  # unreadable / not an image / too small: report and go on
                    emit({"input": str(path), "status": "failed", "reason": f"{type(e).__name__}: {e}"})
            for group in loaded.values():
                start = time.perf_counter()
                try:
                    result = invert(self.codec, torch.cat([g[2] for g in group]), self.options)
                except Exception as e:
                    for g in group:
                        emit({"input": str(g[0]), "status": "failed", "reason": f"{type(e).__name__}: {e}"})
                    continue
                seconds = (time.perf_counter() - start) / len(group)
                for j, (path, name, pixels, image_hash, size) in enumerate(group):
                    try:
                        emit(self._write(path, name, out_dir, image_hash, size, pixels, result.samples[j],
                                         result.latent[j], seconds, result.rival_outcome(j)))
                    except OSError as e:  # disk full, permissions: this image failed, the job goes on
                        emit({"input": str(path), "status": "failed", "reason": f"{type(e).__name__}: {e}"})
        return rows

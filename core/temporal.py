"""Inverting a causal video VAE chunk by chunk along time, in bounded memory (pure PyTorch).

Causal video VAEs (Wan 2.1/2.2 and most video VAEs ComfyUI loads) compress time by a factor s
with the first frame on its own: latent frame 0 <- pixel frame 0, latent frame j >= 1 <- pixel
frames s(j-1)+1 .. sj, so L latent frames decode to 1 + s(L-1) pixel frames, and both the encoder
and the decoder are causal: latent j depends on pixel frames <= sj, decoded frame f on latents
up to the one that holds f. Hence in the gradient-free iteration the residual of latent frames
[a, b) depends only on latents [0, b): the time axis can be split into chunks solved in order.

Chunk [a, b) is solved with the latents before it frozen at their solved values. To bound memory,
only `context` frozen latent frames are kept in front of it. A clip that starts at pixel frame
s*m (the last frame of latent m) encodes to [one lead latent for that frame] + latents m+1, m+2,
..., aligned with the whole video's latents, so the chunk sees the clip
    lead (frozen, E of pixel frame sm) | context latents m+1 .. a-1 (frozen) | chunk a .. b-1 (free)
with m = a - context - 1 (m < 0: the clip starts at frame 0 and the context is the whole past).
The iterate decodes the whole clip and keeps the chunk's frames; its encoder input is the decoded
context followed by the decoded chunk; the target is the encoder of the *true* pixels of the clip.
That is exactly the whole-video residual restricted to the chunk, truncated to the context: with
context >= a the chunk's target and residual map equal the whole run's; the only difference from
the whole-video iteration is then that the past is fixed at its final value instead of moving with
the chunk (and the per-chunk RMS scale and best-iterate choice). Memory is that of a clip of
context + chunk latent frames, independent of the video's length.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from .checkpointing import wrapping
from .codec import Codec
from .metrics import per_sample_mse, psnr_from_mse
from .result import InversionResult
from .solver import InversionOptions, invert

Tensor = torch.Tensor


def latent_frames(frames: int, factor: int) -> int:
    """Latent frames of a clip of `frames` pixel frames; an error when the VAE cannot reproduce that
    count (it decodes L latents to 1 + factor (L - 1) frames)."""
    if frames < 1 or (frames - 1) % factor:
        lo = 1 + (max(frames, 1) - 1) // factor * factor
        raise ValueError(
            f"pixels: {frames} frames, but this video VAE decodes 1 + {factor}k frames (1, {1 + factor}, "
            f"{1 + 2 * factor}, ...), so no latent reproduces {frames}; trim the video to {lo} frames "
            f"or extend it to {lo + factor}.")
    return 1 + (frames - 1) // factor


def pixel_range(a: int, b: int, factor: int) -> tuple[int, int]:
    """Pixel frames [start, end) held by latent frames [a, b)."""
    return (0 if a == 0 else factor * (a - 1) + 1), factor * (b - 1) + 1


@dataclass(frozen=True)
class Chunk:
    a: int  # first free latent frame
    b: int  # end (exclusive)
    m: int  # the lead latent's global index (-1: the clip starts at frame 0, no lead)

    def clip_pixels(self, factor: int) -> tuple[int, int]:
        return (0 if self.m < 0 else factor * self.m), factor * (self.b - 1) + 1

    @property
    def frozen(self) -> int:
        """Latent frames in front of the free ones in the clip (lead + context, or the whole past)."""
        return self.a if self.m < 0 else self.a - self.m


def chunk_plan(latents: int, chunk: int, context: int) -> list[Chunk]:
    """Chunks of `chunk` latent frames with `context` frozen latent frames in front of each.

    >>> [(c.a, c.b, c.m) for c in chunk_plan(7, 3, 1)]
    [(0, 3, -1), (3, 6, 1), (6, 7, 4)]
    """
    if chunk < 1:
        raise ValueError(f"temporal chunk must be >= 1 latent frame; got {chunk}")
    if context < 0:
        raise ValueError(f"temporal context must be >= 0 latent frames; got {context}")
    out = []
    for a in range(0, latents, chunk):
        m = a - context - 1
        out.append(Chunk(a, min(a + chunk, latents), m if m >= 0 else -1))
    return out


@dataclass
class ChunkedResult:
    """The stitched latent and one InversionResult per chunk (frames are pixel-frame ranges)."""

    latent: Tensor
    chunks: list[tuple[tuple[int, int], InversionResult]]
    seconds: float
    method: str
    options: dict = field(default_factory=dict)

    def summary(self) -> str:
        lines = []
        for (f0, f1), r in self.chunks:
            for i, s in enumerate(r.samples):
                lines.append(f"video {i + 1} frames {f0}-{f1 - 1}: PSNR {s.psnr_initial:.2f} -> {s.psnr_best:.2f} dB "
                             f"({s.gain_db:+.2f} dB); best at iteration {s.best_iteration}/{s.iterations}, "
                             f"stop: {s.stop_reason}")
        lines.append(f"{self.method}, {len(self.chunks)} temporal chunk(s), {self.seconds:.2f} s")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-ready: one InversionResult.to_dict() per chunk, with its pixel-frame range."""
        return {"kind": "chunked", "method": self.method, "seconds": self.seconds, "options": self.options,
                "chunks": [dict(r.to_dict(), frames=[f0, f1]) for (f0, f1), r in self.chunks]}


def chunk_codec(codec: Codec, frozen: Tensor, context_pixels: Tensor) -> Codec:
    """The codec of one chunk: latents and pixels of the chunk only, the frozen past in front."""
    n_ctx = context_pixels.shape[2]

    def decode(z):
        return codec.decode(torch.cat([frozen.to(z.dtype), z], 2))[:, :, n_ctx:]

    def encode(x):
        return codec.encode(torch.cat([context_pixels.to(x.dtype), x], 2))[:, :, frozen.shape[2]:]

    grad = None
    if codec.grad_decode is not None:
        def grad():
            dec = codec.grad_decode()
            with torch.inference_mode(False):
                past = frozen.float().clone()  # an ordinary tensor autograd may save
            return wrapping(lambda z: dec(torch.cat([past, z], 2))[:, :, n_ctx:], dec)
    return Codec(encode=encode, decode=decode, dtype=codec.dtype, device=codec.device, grad_decode=grad)


def invert_chunked(codec: Codec, video: Tensor, options: InversionOptions | None = None, *,
                   factor: int, chunk: int, context: int,
                   callback: Callable[[int, int, dict], None] | None = None,
                   on_chunk: Callable[[int, int], None] | None = None, **overrides) -> ChunkedResult:
    """Invert a causal video codec at `video` (B, 3, T, H, W) chunk by chunk (see the module doc).

    `chunk` and `context` are in latent frames; `factor` is the VAE's temporal compression.
    `callback` is passed to each chunk's `invert`; `on_chunk(i, n)` runs before chunk i of n.
    """
    start = time.perf_counter()
    if video.ndim != 5:
        raise ValueError(f"video must be (B, 3, T, H, W); got shape {tuple(video.shape)}")
    opts = replace(options or InversionOptions(), **overrides).validate()
    n_lat = latent_frames(video.shape[2], factor)
    plan = chunk_plan(n_lat, chunk, context)
    solved: Tensor | None = None  # (B, C, a, h, w) latents solved so far, fp32 on the codec's device
    results = []
    for i, c in enumerate(plan):
        if on_chunk is not None:
            on_chunk(i, len(plan))
        p0, p1 = c.clip_pixels(factor)
        f0, f1 = pixel_range(c.a, c.b, factor)
        clip = video[:, :, p0:p1].to(codec.device)
        if c.a == 0:
            r = invert(codec, clip, opts, callback=callback)
        else:
            with torch.inference_mode():
                if c.m < 0:
                    frozen = solved
                else:  # lead latent: the encoder's latent of the clip's single first frame
                    lead = codec.encode(clip[:, :, :1].to(codec.dtype)).float()
                    frozen = torch.cat([lead, solved[:, :, c.m + 1:c.a]], 2)
                frozen = frozen.to(codec.dtype)
                context_pixels = codec.decode(frozen)  # causal: the decoded past, as in the whole run
                n_ctx = f0 - p0
                if context_pixels.shape[2] != n_ctx:
                    raise ValueError(f"the video VAE decoded {context_pixels.shape[2]} context frames where "
                                     f"{n_ctx} were expected: it is not causal with temporal factor {factor}")
            sub = chunk_codec(codec, frozen, context_pixels)
            with torch.inference_mode():  # the target: the true pixels of the whole clip, encoded
                target = codec.encode(clip.to(codec.dtype))[:, :, frozen.shape[2]:]
            r = invert(sub, clip[:, :, n_ctx:], opts, callback=callback, target_latent=target)
        latent = r.latent.float()
        solved = latent if solved is None else torch.cat([solved, latent], 2)
        results.append(((f0, f1), r))
        del clip
    return ChunkedResult(latent=solved, chunks=results, seconds=time.perf_counter() - start,
                         method=opts.method, options=dict(results[0][1].options, chunk=chunk, context=context))


def video_psnr(decode: Callable[[Tensor], Tensor], latent: Tensor, video: Tensor) -> list[float]:
    """PSNR of decode(latent) against `video`, per sample (a helper for tests and benchmarks)."""
    with torch.inference_mode():
        return [float(v) for v in psnr_from_mse(per_sample_mse(decode(latent), video)).tolist()]


__all__ = ["latent_frames", "pixel_range", "chunk_plan", "Chunk", "ChunkedResult", "invert_chunked",
           "chunk_codec", "video_psnr"]

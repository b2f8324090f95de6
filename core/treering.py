"""Tree-Ring watermarks (Wen et al., NeurIPS 2023) for any latent shape, in pure PyTorch + scipy.

A key fixes a pattern K in the centred 2-D Fourier spectrum of the initial Gaussian noise of a
diffusion sampler, inside a disc of `radius` frequency bins around the zero frequency, on one or
all latent channels. Embedding overwrites the noise's spectrum inside that disc with K; reading
it back needs the noise, i.e. an accurate inversion of the decoder and of the sampler.

Conventions (fixed by the key's JSON `fft` field):

* spectrum = ``fftshift(fft2(x, norm="ortho"))`` over the last two dims; bin (i, j) sits at
  offset (i - H//2, j - W//2) from the zero frequency. With the orthonormal FFT, the
  coefficients of N(0, 1) noise have E|F|^2 = 1 whatever the latent size, so keys, distances
  and sigmas mean the same for 8x8 and 128x128 latents.
* mask = offsets with (di^2 + dj^2) <= radius^2. radius < min(H, W) / 2 keeps the disc away
  from the Nyquist row/column, so the disc is conjugate-symmetric.
* every key is Hermitian (K at -f is the conjugate of K at f), so the watermarked noise is
  real with the key exactly in its spectrum (no information is lost by taking the real part):
  ``ring`` = concentric rings of one real value each (the paper's setting; ring i holds the
  bins with i-1 < |f| <= i, the zero frequency belongs to ring 1; values are the real parts of
  the seeded noise spectrum at offsets (0, i), as in the authors' code), ``rand`` = the whole
  spectrum of a seeded Gaussian noise, ``zeros`` = all zero.

Detection (the non-central chi-square test of the Tree-Ring authors' later code): y = the
spectrum of the inverted noise inside the mask, real and imaginary parts concatenated, K likewise;

    lambda = sum K^2 / sigma^2,  S = sum ((y - K) / sigma)^2,  p = ncx2.cdf(S, df = 2|M|, lambda)

Under "no watermark" y is white noise N(0, sigma^2) and S ~ ncx2(2|M|, lambda), so p is uniform;
with the watermark y ~ K and p is tiny. For a real latent, the two halves of a conjugate pair
carry the same number and the zero frequency has no imaginary part, so M here is one bin of
each conjugate pair (the zero frequency left out) -- otherwise the degrees of freedom are wrong.
sigma comes from one of three estimators (`SIGMA_ESTIMATORS`):

* ``outside`` (default): from the key channels' independent bins outside the mask (m real
  numbers, independent of y under the null); the p-value integrates the chi-square(m)/m
  uncertainty of that estimate, so it is exact for white Gaussian noise at any latent size;
* ``prior``: sigma^2 = 1/2, the value for N(0, 1) noise in the orthonormal FFT;
* ``mask``: the authors' recipe verbatim -- sigma = std of y itself, over the full disc (both
  halves of each conjugate pair), df = 2|M| of the full disc. Kept for comparison with published
  numbers. Estimating sigma from y removes most of the variance of S, and the duplicated
  conjugate halves add it back, so its null p-values come out roughly uniform (measured KS
  p = 0.66 / 0.12 on 1000 draws of 16x16 / 64x64 noise); the same estimate on the independent
  half alone is not calibrated (KS p = 3e-5 on 400 draws).

Ring keys have real values, so a ring-watermarked noise has zero imaginary parts in the whole
disc: the test then fires for *any* ring key of the same radius and channels (measured: 50 of
50 noises marked with one ring key are "detected" with another). A ``rand`` key is specific
(0 of 50 with another rand key). Use ``rand`` when the key must identify its owner.

    >>> import torch
    >>> key = TreeRingKey((4, 16, 16), pattern="ring", radius=4, channel=-1, seed=7)
    >>> noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    >>> marked = inject(noise, key)
    >>> [d.watermarked for d in detect(marked, key)], [d.watermarked for d in detect(noise, key)]
    ([True, True], [False, False])
    >>> detect(marked, key)[0].p_value < 1e-6
    True
    >>> TreeRingKey.from_json(key.to_json()) == key
    True
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import torch

PATTERNS = ("ring", "rand", "zeros")
SIGMA_ESTIMATORS = ("outside", "prior", "mask")
KEY_FORMAT = "tree-ring-key"
KEY_VERSION = 1
FFT_CONVENTION = "fftshift(fft2(x, norm='ortho')), zero frequency at (H//2, W//2)"
_QUADRATURE = 256  # nodes of the chi-square(m)/m mixture in the `outside` p-value


class WatermarkKeyError(ValueError):
    """A key that cannot be built, parsed or applied; the message names the fix."""


def spectrum(x: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal 2-D FFT over the last two dims (complex64 for float32 input).

        >>> spectrum(torch.ones(1, 4, 4))[0, 2, 2].real.item()  # all energy at the zero frequency
        4.0
    """
    return torch.fft.fftshift(torch.fft.fft2(x.float(), norm="ortho"), dim=(-2, -1))


def inverse_spectrum(f: torch.Tensor) -> torch.Tensor:
    return torch.fft.ifft2(torch.fft.ifftshift(f, dim=(-2, -1)), norm="ortho")


def _offsets(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    di = (torch.arange(h) - h // 2)[:, None].expand(h, w)
    dj = (torch.arange(w) - w // 2)[None, :].expand(h, w)
    return di, dj


def _half_plane(h: int, w: int) -> torch.Tensor:
    """One bin of each conjugate pair (zero frequency excluded), as a (H, W) bool mask."""
    di, dj = _offsets(h, w)
    return (di > 0) | ((di == 0) & (dj > 0))


MAX_SEED = 2**64 - 1
MAX_SIDE = 4096  # latent cells per side: 32768 px through an 8x VAE
MAX_CHANNELS = 1024
MAX_ELEMENTS = 2**26  # C x H x W: the key's complex64 spectrum stays under 512 MB


def _is_int(v) -> bool:
    """A JSON integer: int but not bool (True is an int in Python), not a float like 4.9 or 1e6."""
    return isinstance(v, int) and not isinstance(v, bool)


def _check_shape(shape) -> tuple[int, int, int]:
    """(channels, height, width) as ints, or an error naming `shape`, before anything is allocated."""
    if not isinstance(shape, (tuple, list)) or len(shape) != 3:
        raise WatermarkKeyError(f"shape: must be [channels, height, width] of the latent; got {shape!r}")
    if not all(_is_int(s) for s in shape):
        raise WatermarkKeyError(f"shape: must hold three integers (channels, height, width); got {list(shape)!r}. "
                                "Use the key_json written by the Tree-Ring Key node.")
    c, h, w = (int(s) for s in shape)
    if min(c, h, w) < 1:
        raise WatermarkKeyError(f"shape: channels, height and width must all be >= 1; got {[c, h, w]}")
    if c > MAX_CHANNELS or max(h, w) > MAX_SIDE or c * h * w > MAX_ELEMENTS:
        raise WatermarkKeyError(f"shape: {c}x{h}x{w} is larger than any latent this pack handles (at most "
                                f"{MAX_CHANNELS} channels, {MAX_SIDE} cells per side, {MAX_ELEMENTS} values); "
                                "the key_json is corrupt -- use the one written by the Tree-Ring Key node.")
    return c, h, w


@dataclass(frozen=True)
class TreeRingKey:
    """A Tree-Ring key for latents of shape (C, H, W). `channel` = -1 marks every channel."""

    shape: tuple[int, int, int]
    pattern: str = "ring"
    radius: int = 4
    channel: int = -1
    seed: int = 0
    values_override: tuple | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "shape", _check_shape(self.shape))
        c, h, w = self.shape
        if not isinstance(self.pattern, str) or self.pattern not in PATTERNS:
            raise WatermarkKeyError(f"pattern: must be one of {', '.join(PATTERNS)}; got {self.pattern!r}")
        if not _is_int(self.radius) or self.radius < 1:
            raise WatermarkKeyError(f"radius: must be an integer >= 1 (frequency bins); got {self.radius!r}")
        limit = (min(h, w) - 1) // 2
        if self.radius > limit:
            raise WatermarkKeyError(f"radius: {self.radius} does not fit a {h}x{w} latent (the disc must stay inside "
                                    f"the spectrum, radius < min(H, W)/2); use radius <= {limit} or a larger latent.")
        if not _is_int(self.channel) or not -1 <= self.channel < c:
            raise WatermarkKeyError(f"channel: must be -1 (all channels) or 0..{c - 1} for a {c}-channel latent; "
                                    f"got {self.channel!r}")
        if not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED:
            raise WatermarkKeyError(f"seed: must be an integer from 0 to {MAX_SEED} (64 bits, as Tree-Ring Key's "
                                    f"key_seed); got {self.seed!r}")

    # ---- geometry -------------------------------------------------------------------------------
    @property
    def channels(self) -> list[int]:
        return list(range(self.shape[0])) if self.channel == -1 else [self.channel]

    def disc(self) -> torch.Tensor:
        """(H, W) bool: the bins within `radius` of the zero frequency."""
        di, dj = _offsets(*self.shape[1:])
        return di * di + dj * dj <= self.radius * self.radius

    def mask(self) -> torch.Tensor:
        """(C, H, W) bool: the disc on the key's channels."""
        m = torch.zeros(self.shape, dtype=torch.bool)
        m[self.channels] = self.disc()
        return m

    def test_mask(self) -> torch.Tensor:
        """(C, H, W) bool: the independent bins of the mask (one per conjugate pair, no zero frequency)."""
        return self.mask() & _half_plane(*self.shape[1:])

    def outside_mask(self) -> torch.Tensor:
        """(C, H, W) bool: independent bins of the key channels outside the disc, without the
        Nyquist row/column of even sizes (they pair up differently)."""
        c, h, w = self.shape
        keep = _half_plane(h, w) & ~self.disc()
        if h % 2 == 0:
            keep[0, :] = False
        if w % 2 == 0:
            keep[:, 0] = False
        m = torch.zeros(self.shape, dtype=torch.bool)
        m[self.channels] = keep
        return m

    # ---- values ---------------------------------------------------------------------------------
    def values(self) -> torch.Tensor:
        """(C, H, W) complex64 key spectrum, zero outside the mask."""
        mask = self.mask()
        k = torch.zeros(self.shape, dtype=torch.complex64)
        if self.values_override is not None:
            real, imag = self.values_override
            k[mask] = torch.complex(torch.tensor(real, dtype=torch.float32), torch.tensor(imag, dtype=torch.float32))
            return k
        if self.pattern == "zeros":
            return k
        c, h, w = self.shape
        g = torch.Generator().manual_seed(self.seed)
        seeded = spectrum(torch.randn(self.shape, generator=g))
        if self.pattern == "rand":
            k[mask] = seeded[mask]
            return k
        di, dj = _offsets(h, w)
        dist2 = di * di + dj * dj
        for ch in self.channels:
            for i in range(self.radius, 0, -1):  # outer rings first, inner ones overwrite
                k[ch][dist2 <= i * i] = seeded[ch, h // 2, w // 2 + i].real
        return k

    # ---- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        v = self.values()[self.mask()]
        return {"format": KEY_FORMAT, "version": KEY_VERSION, "shape": list(self.shape),
                "pattern": self.pattern, "radius": self.radius, "channel": self.channel, "seed": self.seed,
                "fft": FFT_CONVENTION, "mask_bins": int(v.numel()),
                "values": {"real": [float(a) for a in v.real],
                           "imag": [float(a) for a in v.imag]}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d) -> "TreeRingKey":
        if not isinstance(d, dict) or d.get("format") != KEY_FORMAT:
            raise WatermarkKeyError(f"key: not a Tree-Ring key (expected a JSON object with "
                                    f"\"format\": \"{KEY_FORMAT}\"); paste the JSON written by the Tree-Ring Key node.")
        if d.get("version") != KEY_VERSION:
            raise WatermarkKeyError(f"key: version {d.get('version')!r} is not supported (this pack reads version "
                                    f"{KEY_VERSION}); regenerate the key with this pack's Tree-Ring Key node.")
        missing = [k for k in ("shape", "pattern", "radius", "channel", "seed") if k not in d]
        if missing:
            raise WatermarkKeyError(f"key: the JSON lacks {', '.join(missing)}; it is truncated or edited -- "
                                    "use the complete JSON from the Tree-Ring Key node.")
        override = None
        if "values" in d:
            vals = d["values"]
            ok = isinstance(vals, dict) and all(isinstance(vals.get(p), list) for p in ("real", "imag"))
            if not ok or len(vals["real"]) != len(vals["imag"]):
                raise WatermarkKeyError("key: \"values\" must hold equally long \"real\" and \"imag\" lists; the JSON "
                                        "is corrupt -- use the complete JSON from the Tree-Ring Key node.")
            try:
                override = (tuple(float(a) for a in vals["real"]), tuple(float(a) for a in vals["imag"]))
            except (TypeError, ValueError):
                raise WatermarkKeyError("key: \"values\" holds non-numbers; the JSON is corrupt -- use the complete "
                                        "JSON from the Tree-Ring Key node.") from None
            if not all(math.isfinite(a) for a in override[0] + override[1]):
                raise WatermarkKeyError("key: \"values\" holds NaN/Inf; the JSON is corrupt -- regenerate the key.")
        shape = d["shape"]
        key = cls(tuple(shape) if isinstance(shape, list) else shape, d["pattern"], d["radius"], d["channel"],
                  d["seed"], override)
        if override is not None and len(override[0]) != int(key.mask().sum()):
            raise WatermarkKeyError(f"key: {len(override[0])} values for a mask of {int(key.mask().sum())} bins; "
                                    "the JSON is corrupt -- use the complete JSON from the Tree-Ring Key node.")
        return key

    @classmethod
    def from_json(cls, text: str) -> "TreeRingKey":
        if not isinstance(text, str) or not text.strip():
            raise WatermarkKeyError("key: empty; paste the JSON written by the Tree-Ring Key node "
                                    "(or connect its key output).")
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise WatermarkKeyError(f"key: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); paste the "
                                    "complete JSON written by the Tree-Ring Key node.") from None
        return cls.from_dict(d)

    # ---- checks -------------------------------------------------------------------------------
    def check_latent(self, latent: torch.Tensor, name: str = "latent") -> None:
        if not isinstance(latent, torch.Tensor) or latent.ndim != 4:
            raise WatermarkKeyError(f"{name}: expected a latent batch (B, C, H, W); "
                                    f"got {getattr(latent, 'shape', type(latent))}")
        if latent.shape[0] == 0:
            raise WatermarkKeyError(f"{name}: the batch is empty; connect a latent with at least one sample.")
        if tuple(latent.shape[1:]) != self.shape:
            c, h, w = latent.shape[1:]
            raise WatermarkKeyError(
                f"{name}: shape {c}x{h}x{w} (channels x height x width) does not match the key's "
                f"{self.shape[0]}x{self.shape[1]}x{self.shape[2]}. Use the key made for this latent size "
                f"(an image of {self.shape[2]}x{self.shape[1]} latent cells, e.g. {self.shape[2] * 8}x"
                f"{self.shape[1] * 8} px for an 8x VAE) or make a key for {c}x{h}x{w}.")
        if not torch.isfinite(latent).all():
            raise WatermarkKeyError(f"{name}: contains NaN or Inf; fix the node that produced it.")


def inject(noise: torch.Tensor, key: TreeRingKey) -> torch.Tensor:
    """Overwrite the key's mask in the centred spectrum of each noise in the batch (B, C, H, W).

    Returns real noise of the input's dtype whose spectrum equals the key inside the mask and the
    input's spectrum outside it.
    """
    key.check_latent(noise, "noise")
    ch = key.channels
    f = spectrum(noise[:, ch])
    mask = key.mask()[ch]
    f[:, mask] = key.values()[ch][mask].to(f.device)
    out = noise.clone()
    out[:, ch] = inverse_spectrum(f).real.to(noise.dtype)  # other channels stay bit-identical
    return out


@dataclass(frozen=True)
class Detection:
    p_value: float       # P(S <= observed | no watermark); small = watermarked
    l1: float            # mean |y - K| over the full disc (orthonormal FFT units)
    statistic: float     # S
    noncentrality: float  # lambda
    dof: int             # 2 |M|
    sigma: float
    fpr: float
    estimator: str

    @property
    def watermarked(self) -> bool:
        return self.p_value < self.fpr

    def verdict(self) -> str:
        word = "WATERMARKED" if self.watermarked else "not detected"
        rel = "<" if self.watermarked else ">="
        return (f"{word}: p = {self.p_value:.3g} {rel} FPR {self.fpr:g}; L1 = {self.l1:.4f}; "
                f"S = {self.statistic:.1f}, df = {self.dof}, lambda = {self.noncentrality:.1f}, "
                f"sigma = {self.sigma:.4f} ({self.estimator})")


def _p_value(s: float, dof: int, lam: float, m: int | None) -> float:
    from scipy import stats

    if m is None:
        return float(stats.ncx2.cdf(s, dof, lam))
    import numpy as np

    u = stats.chi2.ppf((np.arange(_QUADRATURE) + 0.5) / _QUADRATURE, m) / m  # sigma_hat^2 / sigma^2
    return float(np.mean(stats.ncx2.cdf(s * u, dof, lam * u)))


def detect(latent: torch.Tensor, key: TreeRingKey, fpr: float = 0.01, sigma: str = "outside",
           name: str = "latent") -> list[Detection]:
    """One `Detection` per latent of the batch (B, C, H, W); see the module docstring. `name`: what
    errors call the latent (the caller's input name)."""
    if sigma not in SIGMA_ESTIMATORS:
        raise WatermarkKeyError(f"sigma: must be one of {', '.join(SIGMA_ESTIMATORS)}; got {sigma!r}")
    if not 0 < fpr < 1:
        raise WatermarkKeyError(f"fpr: the false-positive rate must be in (0, 1), e.g. 0.01; got {fpr}")
    key.check_latent(latent, name)
    f = spectrum(latent.detach().cpu())
    k = key.values()
    full, half, out = key.mask(), key.test_mask(), key.outside_mask()
    results = []
    for fb in f:
        l1 = float((fb[full] - k[full]).abs().mean())
        sel = full if sigma == "mask" else half
        y = torch.cat([fb[sel].real, fb[sel].imag]).double()
        t = torch.cat([k[sel].real, k[sel].imag]).double()
        m = None
        if sigma == "mask":
            s = float(y.std())
        elif sigma == "prior":
            s = math.sqrt(0.5)
        else:
            o = torch.cat([fb[out].real, fb[out].imag]).double()
            m = int(o.numel())
            if m < 8:
                raise WatermarkKeyError(f"sigma: only {m} spectrum values lie outside the key's mask on this "
                                        f"{key.shape[1]}x{key.shape[2]} latent, too few to estimate the noise level; "
                                        "use a smaller radius or sigma 'prior'.")
            s = float(o.pow(2).mean().sqrt())
        if not s > 0:
            raise WatermarkKeyError(f"{name}: its spectrum is zero where sigma is estimated (a constant latent?); "
                                    "connect the inverted noise, not an empty latent.")
        lam = float((t / s).pow(2).sum())
        stat = float(((y - t) / s).pow(2).sum())
        dof = int(t.numel())
        results.append(Detection(_p_value(stat, dof, lam, m), l1, stat, lam, dof, s, float(fpr), sigma))
    return results


def spectrum_image(latent: torch.Tensor, key: TreeRingKey, cell: int | None = None) -> torch.Tensor:
    """IMAGE (B, H*cell, C*W*cell + 2*(C-1), 3) in [0, 1]: log |spectrum| of each channel side by side
    (grey, 2 px white gaps), the key's disc outlined in red on the key's channels. `cell` = pixels
    per frequency bin; None = about 256 px per channel tile.

        >>> key = TreeRingKey((4, 16, 16), radius=3, channel=0)
        >>> spectrum_image(torch.zeros(1, 4, 16, 16), key, cell=2).shape
        torch.Size([1, 32, 134, 3])
    """
    key.check_latent(latent)
    c, h, w = key.shape
    if cell is None:
        cell = max(1, round(256 / max(h, w)))
    mag = torch.log1p(spectrum(latent.detach().cpu()).abs())  # (B, C, H, W)
    top = mag.flatten(1).amax(dim=1).clamp_min(1e-8)[:, None, None, None]
    grey = (mag / top).repeat_interleave(cell, -2).repeat_interleave(cell, -1)  # (B, C, Hc, Wc)
    img = grey[..., None].repeat(1, 1, 1, 1, 3)
    disc = key.disc().float()[None, None]
    big = disc.repeat_interleave(cell, -2).repeat_interleave(cell, -1)[0, 0] > 0
    edge = big.clone()
    inner = big.clone()
    inner[1:, :] &= big[:-1, :]
    inner[:-1, :] &= big[1:, :]
    inner[:, 1:] &= big[:, :-1]
    inner[:, :-1] &= big[:, 1:]
    edge &= ~inner
    red = torch.tensor([1.0, 0.15, 0.15])
    for ch in key.channels:
        img[:, ch][:, edge] = red
    gap = 2
    tiles = []
    for ch in range(c):
        tiles.append(img[:, ch])
        if ch < c - 1:
            tiles.append(torch.ones(img.shape[0], h * cell, gap, 3))
    return torch.cat(tiles, dim=2).clamp(0, 1)

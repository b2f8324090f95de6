"""Spatial tiling of an encoder/decoder pair, so every VAE call sees one tile (pure PyTorch).

What "tiled inversion" means here, and why: the solver runs its ordinary *global* iteration
z <- z - lr (E_t(D_t(z)) - E_t(x)) on the whole latent, where D_t and E_t are the tiled decoder and
encoder built below. The alternative, inverting every tile on its own and blending the tile
latents, gives each overlap two latents that were each exact for a different (truncated) tile
decode; their feathered average is a fixed point of neither, and a seam shows where the two tile
problems disagree. The global iteration has one latent and one fixed point -- the latent whose
*tiled* decode reproduces the image, which is exactly what a user gets from a tiled decode -- and
every VAE call still sees only one tile, so the VAE's activations (what dominates memory) are
bounded by the tile size. What stays whole is the solver state: the image, the latent and the
optimizer moments, i.e. O(pixels) floats, the size of the input itself.

Tiles are laid out in latent cells (so pixel tiles are aligned to the latent grid: a pixel tile
at cell offset s starts at pixel s * cell), spread evenly so neighbours overlap by at least
`overlap` cells, and blended with linear feathering across each overlap: at every position the
weights of the tiles covering it sum to one, and a tile's border (where its zero padding makes it
least accurate) gets the least weight. Works for images (B, C, H, W) and videos (B, C, T, H, W):
only the last two dimensions are tiled.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .codec import Codec

Tensor = torch.Tensor


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size `tile` covering [0, length), neighbours overlapping by at least
    `overlap`, spread evenly, the last one ending at `length`. One tile when it covers everything.

    >>> tile_starts(10, 4, 1)
    [0, 3, 6]
    >>> tile_starts(4, 8, 2)
    [0]
    """
    if tile < 1 or overlap < 0 or overlap >= tile:
        raise ValueError(f"need 0 <= overlap < tile; got tile={tile}, overlap={overlap}")
    if length <= tile:
        return [0]
    n = math.ceil((length - overlap) / (tile - overlap))
    return [(i * (length - tile)) // (n - 1) for i in range(n)]


def feather(length: int, start: int, size: int, starts: list[int]) -> Tensor:
    """1-D blending weight (size,) of the tile at `start` among `starts` (all of width `size`):
    a linear ramp across each overlap with a neighbour, 1 elsewhere. Ramps of two neighbours are
    complementary, so the weights of all tiles sum to one at every position."""
    w = torch.ones(size)
    i = starts.index(start)
    if i > 0:  # overlap with the previous tile: [start, prev_end)
        r = starts[i - 1] + size - start
        if r > 0:
            w[:r] = torch.minimum(w[:r], (torch.arange(r) + 0.5) / r)
    if i + 1 < len(starts):  # overlap with the next tile: [next_start, start + size)
        r = start + size - starts[i + 1]
        if r > 0:
            w[size - r:] = torch.minimum(w[size - r:], (r - 0.5 - torch.arange(r)) / r)
    return w


@dataclass(frozen=True)
class TileGrid:
    """Tiles over a latent of h x w cells; `cell` pixels per cell for the pixel side."""

    h: int
    w: int
    tile: int  # cells per tile side
    overlap: int  # cells
    cell: int

    @property
    def rows(self) -> list[int]:
        return tile_starts(self.h, min(self.tile, self.h), self.overlap if self.tile < self.h else 0)

    @property
    def cols(self) -> list[int]:
        return tile_starts(self.w, min(self.tile, self.w), self.overlap if self.tile < self.w else 0)

    def __len__(self) -> int:
        return len(self.rows) * len(self.cols)

    def tiles(self, scale: int = 1):
        """Yield (y0, y1, x0, x1, weight (th, tw)) in units of cells * `scale` (1: latent, cell: pixels)."""
        th, tw = min(self.tile, self.h), min(self.tile, self.w)
        rows, cols = self.rows, self.cols
        prow = [r * scale for r in rows]
        pcol = [c * scale for c in cols]
        for r in prow:
            wr = feather(self.h * scale, r, th * scale, prow)
            for c in pcol:
                wc = feather(self.w * scale, c, tw * scale, pcol)
                yield r, r + th * scale, c, c + tw * scale, wr[:, None] * wc[None, :]


def tiled(fn: Callable[[Tensor], Tensor], grid: TileGrid, encode: bool) -> Callable[[Tensor], Tensor]:
    """Apply `fn` tile by tile -- an encoder (pixels -> latent, encode=True) or a decoder -- and
    blend the outputs as they come (one tile output alive at a time, plus the fp32 accumulator).
    The result is normalised by the summed weights (they already sum to one where at most two
    tiles meet; this also covers three)."""
    cell = grid.cell
    in_scale, out_scale = (cell, 1) if encode else (1, cell)

    def run(t: Tensor) -> Tensor:
        out = wsum = None
        for (y0, y1, x0, x1, wt), (Y0, Y1, X0, X1, _) in zip(grid.tiles(out_scale), grid.tiles(in_scale)):
            piece = fn(t[..., Y0:Y1, X0:X1])
            if out is None:
                shape = tuple(piece.shape[:-2]) + (grid.h * out_scale, grid.w * out_scale)
                out = torch.zeros(shape, device=piece.device, dtype=torch.float32)
                wsum = torch.zeros(shape[-2:], device=piece.device)
                dtype = piece.dtype
            wt = wt.to(piece.device)
            out[..., y0:y1, x0:x1] += piece.float() * wt
            wsum[y0:y1, x0:x1] += wt
            del piece
        return (out / wsum).to(dtype)

    run.tiles_of = (fn, grid)  # core.hybrid.backward_activation_mb: estimate per tile (a crop is not this grid's)
    return run


def check_tiling(tile_px: int, overlap_px: int, cell: int, min_tile_px: int) -> tuple[int, int]:
    """Validate pixel tile settings against a VAE's latent cell; return (tile, overlap) in cells.
    Errors name the input and the fix; nothing is rounded or clamped silently."""
    if tile_px % cell:
        raise ValueError(f"tile_size: {tile_px} px is not a multiple of this VAE's latent cell ({cell} px); "
                         f"use {max(cell, tile_px // cell * cell)} or {(tile_px // cell + 1) * cell}.")
    if tile_px < min_tile_px:
        raise ValueError(f"tile_size: {tile_px} px is smaller than this VAE's receptive field allows "
                         f"(minimum {min_tile_px} px = max(64 px, 4 latent cells of {cell} px)); "
                         f"use tile_size >= {min_tile_px}.")
    if overlap_px < 0 or overlap_px % cell:
        raise ValueError(f"overlap: {overlap_px} px must be >= 0 and a multiple of the latent cell ({cell} px).")
    if overlap_px >= tile_px:
        raise ValueError(f"overlap: {overlap_px} px must be smaller than tile_size ({tile_px} px); "
                         f"tile_size / 4 = {tile_px // 4 // cell * cell} px is a good choice.")
    return tile_px // cell, overlap_px // cell


def tiled_codec(codec: Codec, latent_hw: tuple[int, int], cell: int, tile: int, overlap: int) -> Codec:
    """`codec` with encode/decode run tile by tile over a latent of `latent_hw` cells (tile and
    overlap in cells). The gradient baseline gets the tiled differentiable decoder as well."""
    grid = TileGrid(latent_hw[0], latent_hw[1], tile, overlap, cell)
    grad = None
    if codec.grad_decode is not None:
        def grad():
            return tiled(codec.grad_decode(), grid, encode=False)
    return Codec(encode=tiled(codec.encode, grid, encode=True), decode=tiled(codec.decode, grid, encode=False),
                 dtype=codec.dtype, device=codec.device, grad_decode=grad)

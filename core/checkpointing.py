"""Recomputing a decoder's blocks in the backward pass (gradient checkpointing) instead of keeping their activations.

A gradient step keeps every activation of the decoder for its backward: 6.0 GiB of live tensors for one 512 px image
through the SD decoder, which put the default (its gradient rival) at 1.08x the gradient baseline's peak. Wrapping
each block (SD: its 15 ResnetBlocks / AttnBlocks) in a non-reentrant torch.utils.checkpoint keeps only the blocks'
inputs and recomputes one block at a time in the backward: 2.6 GiB (0.43x) for the same gradient, +15-25 % backward
time (`python -m bench.checkpoint_probe 256 512`, docs/convergence.md "The rival's memory").

Adapters wrap the decoder's blocks of their private fp32 VAE copy once (`recomputable`); the wrapped blocks recompute
only inside `recomputing()`, so one copy serves both ways and the solver decides per run (InversionOptions.checkpoint).

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Sequential(
    ...     torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(4, 1, 3, padding=1)))
    >>> decode = recomputable(lambda z: net(z), net)
    >>> recomputed_blocks(decode)
    1
    >>> z = torch.randn(1, 1, 8, 8, requires_grad=True)
    >>> with recomputing():
    ...     g = torch.autograd.grad(decode(z).square().sum(), z)[0]
    >>> torch.allclose(g, torch.autograd.grad(decode(z).square().sum(), z)[0])
    True
"""
from __future__ import annotations

import contextlib
import contextvars
import types
import weakref
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

Tensor = torch.Tensor
LEAVES = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)
DECODER_PARTS = ("decoder", "taesd_decoder")
_RECOMPUTE = contextvars.ContextVar("exact_encode_recompute", default=False)
_TALLY = contextvars.ContextVar("exact_encode_saved_tally", default=None)
GRADIENTS = 2  # gradients the backward holds where it passes an op: at its output and its input, each about the size
# of what it saved (a block: of its input)


def blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The innermost modules with two or more convolutions / linear maps of their own (SD: ResnetBlock, AttnBlock;
    TAESD: Block): found by structure, so any host's decoder class is covered without naming it."""
    inner = [b for child in module.children() for b in blocks(child)]
    if inner:
        return inner
    return [module] if sum(isinstance(c, LEAVES) for c in module.children()) >= 2 else []


def recomputable(decode: Callable[[Tensor], Tensor], model: torch.nn.Module) -> Callable[[Tensor], Tensor]:
    """`decode` (which runs `model`, a private copy) marked as able to recompute the blocks of `model`'s decoder: each
    block's forward is wrapped once; it recomputes only inside `recomputing()` and is the block's own forward
    otherwise. Only the decoder's blocks: the encoder's never run in a decode, and counting them would overstate
    what a backward recomputes."""
    wrapped = blocks(_decoder_part(model))
    for block in wrapped:  # a bound method: a deepcopy of the model rebinds it to the copy's block
        block.forward = types.MethodType(_recomputable_forward, block)
    return _marked(decode, len(wrapped))


def wrapping(outer: Callable[[Tensor], Tensor], inner) -> Callable[[Tensor], Tensor]:
    """`outer`, a decode that runs the decode `inner` (e.g. with frozen context frames), marked as recomputing as many
    blocks as `inner` does."""
    return _marked(outer, recomputed_blocks(inner))


def _marked(decode: Callable[[Tensor], Tensor], count: int) -> Callable[[Tensor], Tensor]:
    def run(z: Tensor) -> Tensor:
        return decode(z)

    run.recomputed_blocks = count
    return run


def _decoder_part(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder inside a whole VAE (ComfyUI's and diffusers' `decoder`, ComfyUI's TAESD `taesd_decoder`), else
    the model itself."""
    for name in DECODER_PARTS:
        part = getattr(model, name, None)
        if isinstance(part, torch.nn.Module):
            return part
    return model


def recomputed_blocks(decode) -> int:
    """How many blocks `decode` can recompute (0: none; a tiled decode: its base decode's)."""
    tiled = getattr(decode, "tiles_of", None)
    return recomputed_blocks(tiled[0]) if tiled is not None else getattr(decode, "recomputed_blocks", 0)


@contextlib.contextmanager
def recomputing(on: bool = True):
    """Within it, recomputable blocks keep only their inputs for the backward and recompute the rest."""
    token = _RECOMPUTE.set(on)
    try:
        yield
    finally:
        _RECOMPUTE.reset(token)


def _recomputable_forward(block: torch.nn.Module, *args, **kwargs):
    """The block's class forward; inside `recomputing()` checkpointed (or, estimating, tallied)."""
    forward = type(block).forward.__get__(block)
    if not _RECOMPUTE.get() or _carries_state(args, kwargs):
        return forward(*args, **kwargs)
    tally = _TALLY.get()
    if tally is not None:
        return tally.block(forward, args, kwargs)
    if torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def _carries_state(args, kwargs) -> bool:
    """Whether a block call is handed a mutable container (a video VAE's causal cache: ComfyUI's Wan blocks take
    `feat_cache`, a list they update): recomputed in the backward it would read that state as the backward finds it,
    not as the forward did, and give a wrong gradient silently; such calls keep their activations."""
    return any(isinstance(a, (list, dict, set)) for a in (*args, *kwargs.values()))


class SavedTally:
    """Bytes a backward would hold at its peak, counted by autograd's saved-tensor hooks during a forward (nothing is
    kept), in the forward's order. Inside `recomputing()` a recomputable block keeps only its tensor inputs; its own
    saved tensors are alive only while the backward recomputes it. The backward starts with everything kept and frees
    each op's saved tensors as it passes them (the reverse order), holding besides the gradients there (GRADIENTS).
    Summing everything outside the blocks, every block's inputs and the largest block's own overstated the SD
    decoder's recomputed peak by 20 % (its full-size output layers are freed before its last block runs)."""

    def __init__(self):
        self.events: list[tuple[int, int, bool]] = []  # forward order: (bytes kept, bytes alive while passed, block?)
        self._seen: dict[tuple[int, int], weakref.ref] = {}

    @staticmethod
    def _new_bytes(t: Tensor, seen: dict) -> int:
        """`t`'s bytes, or 0 where the same live tensor was counted already: an activation's output that the next
        convolution saves again as its input (ReLU, Tanh; TAESD's blocks) is kept once. Memory freed and reused by a
        later tensor is counted again: its first owner's weak reference is dead by then; slices of one storage (q, k,
        v chunks) start at different addresses and count apart."""
        key = (t.data_ptr(), t.numel())
        first = seen.get(key)
        if first is not None and first() is not None:
            return 0
        seen[key] = weakref.ref(t)
        return t.numel() * t.element_size()

    @property
    def inputs(self) -> int:
        return sum(kept for kept, _, block in self.events if block)

    @property
    def largest_block(self) -> int:
        return max((passing - kept for kept, passing, block in self.events if block), default=0)

    @property
    def total(self) -> int:
        """The backward's peak: what is still kept when it passes an op or recomputes a block, plus what that takes."""
        live = sum(kept for kept, _, _ in self.events)
        peak = 0
        for kept, passing, _ in reversed(self.events):
            peak = max(peak, live + passing)
            live -= kept
        return peak

    def block(self, forward, args, kwargs):
        inputs = sum(self._new_bytes(a, self._seen) for a in args if isinstance(a, Tensor))
        own, seen = 0, {}

        def pack(t):
            nonlocal own
            own += self._new_bytes(t, seen)

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda _: None):
            out = forward(*args, **kwargs)
        self.events.append((inputs, own + GRADIENTS * inputs, True))
        return out

    def count(self, decode, z: Tensor) -> int:
        def pack(t):
            size = self._new_bytes(t, self._seen)
            if size:  # a saved weight or constant has no gradient
                self.events.append((size, GRADIENTS * size if t.requires_grad else 0, False))

        token = _TALLY.set(self)
        try:
            with torch.inference_mode(False), torch.enable_grad(), \
                    torch.autograd.graph.saved_tensors_hooks(pack, lambda _: None):
                decode(z.detach().clone().requires_grad_(True))
        finally:
            _TALLY.reset(token)
        return self.total

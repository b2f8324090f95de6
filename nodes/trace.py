"""The solver's trace travels with the LATENT as an attribute of its `samples` tensor.

Not a dict key: stock VAE Encode's LATENT is exactly {"samples": tensor}, and many nodes copy,
slice or concatenate every value of that dict. A Python attribute on the tensor is invisible to
all of them; any node that computes a new tensor (sampling, upscaling, batching) drops it, which
is right, because the trace no longer describes that latent. A fingerprint guards the rest
(an in-place edit of the same tensor). The payload also carries the fingerprint of the image
the solver inverted, so Inversion Diagnostics can tell when it is given another image.

The payload is the result's `to_dict()` (core.result.Result): "kind" says which solver made it.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..core.diagnostics import fingerprint, same_fingerprint
from ..core.result import Result

ATTR = "exact_encode_trace"


def attach(samples: torch.Tensor, result: Result, image: torch.Tensor) -> torch.Tensor:
    """`image`: the pixels the solver inverted, in the model's layout (nodes.inputs.image_to_pixels)."""
    payload = result.to_dict()
    payload["fingerprint"] = fingerprint(samples)
    payload["image_fingerprint"] = fingerprint(image)
    setattr(samples, ATTR, payload)
    return samples


def read(samples: torch.Tensor) -> Optional[dict]:
    """The trace of exactly this latent, or None (none attached, or the latent changed since)."""
    payload = getattr(samples, ATTR, None)
    if not isinstance(payload, dict) or "fingerprint" not in payload:
        return None
    return payload if same_fingerprint(payload["fingerprint"], fingerprint(samples)) else None


def same_image(payload: dict, image: torch.Tensor) -> bool:
    """Whether the trace was made from `image` (same layout as given to attach)."""
    theirs = payload.get("image_fingerprint")
    return theirs is not None and same_fingerprint(theirs, fingerprint(image))

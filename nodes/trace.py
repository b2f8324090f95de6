"""The solver's trace travels with the LATENT as an attribute of its `samples` tensor.

Not a dict key: stock VAE Encode's LATENT is exactly {"samples": tensor}, and many nodes copy,
slice or concatenate every value of that dict. A Python attribute on the tensor is invisible to
all of them; any node that computes a new tensor (sampling, upscaling, batching) drops it, which
is right, because the trace no longer describes that latent. A fingerprint guards the rest
(an in-place edit of the same tensor).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..core import InversionResult
from ..core.diagnostics import fingerprint, same_fingerprint

ATTR = "exact_encode_trace"


def attach(samples: torch.Tensor, result: InversionResult) -> torch.Tensor:
    payload = result.to_dict()
    payload["fingerprint"] = fingerprint(samples)
    setattr(samples, ATTR, payload)
    return samples


def read(samples: torch.Tensor) -> Optional[dict]:
    """The trace of exactly this latent, or None (none attached, or the latent changed since)."""
    payload = getattr(samples, ATTR, None)
    if not isinstance(payload, dict) or "fingerprint" not in payload:
        return None
    return payload if same_fingerprint(payload["fingerprint"], fingerprint(samples)) else None

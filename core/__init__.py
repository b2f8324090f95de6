"""Exact VAE encoding by decoder inversion, in pure PyTorch (no ComfyUI import).

    >>> from core import Codec, invert, METHODS
    >>> METHODS
    ('adam', 'forward', 'km', 'anderson', 'gradient')
"""
from .codec import Codec
from .metrics import nmse_db, per_sample_mse, psnr_from_mse
from .result import InversionResult, SampleStats
from .solver import DEFAULT_LR, METHODS, InversionOptions, invert

__all__ = ["Codec", "invert", "InversionOptions", "InversionResult", "SampleStats", "METHODS",
           "DEFAULT_LR", "nmse_db", "per_sample_mse", "psnr_from_mse"]

"""Exact VAE encoding by decoder inversion, Tree-Ring watermarks and diffusion-sampler inversion,
in pure PyTorch (no ComfyUI import).

    >>> from core import Codec, invert, METHODS
    >>> METHODS
    ('adam', 'forward', 'km', 'anderson', 'gradient', 'diis', 'hybrid')
    >>> from core import TreeRingKey, inject, detect, invert_euler, INVERSION_MODES
    >>> INVERSION_MODES
    ('naive', 'exact')
"""
__version__ = "0.1.0"  # equals pyproject.toml [project] version (tests/test_library_package.py)

from .codec import Codec
from .drift import DriftResult, drift
from .diffusion_inversion import MODES as INVERSION_MODES
from .diffusion_inversion import DiffusionInversionResult, invert_euler, noise_scale, sample_euler
from .metrics import nmse_db, per_sample_mse, per_sample_weighted_mse, psnr_from_mse, region_error
from .result import InversionResult, Result, SampleStats
from .solver import DEFAULT_LR, METHODS, PIXEL_ONLY_METHODS, InversionOptions, invert
from .treering import (PATTERNS, SIGMA_ESTIMATORS, Detection, TreeRingKey, WatermarkKeyError, detect, inject,
                       spectrum, spectrum_image)

__all__ = ["Codec", "invert", "InversionOptions", "InversionResult", "Result", "SampleStats", "METHODS",
           "PIXEL_ONLY_METHODS", "DEFAULT_LR", "nmse_db", "per_sample_mse", "per_sample_weighted_mse", "psnr_from_mse",
           "region_error",
           "drift", "DriftResult",
           "TreeRingKey", "WatermarkKeyError", "Detection", "PATTERNS", "SIGMA_ESTIMATORS", "inject", "detect",
           "spectrum", "spectrum_image",
           "INVERSION_MODES", "DiffusionInversionResult", "invert_euler", "sample_euler", "noise_scale"]

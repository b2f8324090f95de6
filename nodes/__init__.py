"""ComfyUI nodes of the pack: thin V3 wrappers around core/ (validation, progress, conversion)."""
from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from .diagnostics import InversionDiagnostics
from .exact_encode import VAEExactEncode
from .exact_encode_tiled import VAEExactEncodeTiled
from .decode_tiled import VAEDecodeExactTiled
from .treering import TreeRingDetect, TreeRingKeyNode, TreeRingWatermarkedNoise
from .diffusion_inversion import DiffusionInversion
from .drift import VAERoundTripDrift
from .inpaint import ImageMaskedError, VAEExactEncodeForInpaint

NODES = [VAEExactEncode, VAEExactEncodeTiled, VAEDecodeExactTiled, InversionDiagnostics, VAERoundTripDrift,
         VAEExactEncodeForInpaint, ImageMaskedError,
         TreeRingKeyNode, TreeRingWatermarkedNoise, DiffusionInversion, TreeRingDetect]


class ExactEncodeExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)

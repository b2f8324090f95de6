"""ComfyUI nodes of the pack: thin V3 wrappers around core/ (validation, progress, conversion)."""
from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from .exact_encode import VAEExactEncode
from .exact_encode_tiled import VAEExactEncodeTiled

NODES = [VAEExactEncode, VAEExactEncodeTiled]


class ExactEncodeExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)

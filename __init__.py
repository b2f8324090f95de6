"""ComfyUI entry point. The nodes import ComfyUI lazily, so `core` stays usable without it."""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import ExactEncodeExtension

    return ExactEncodeExtension()


__all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]

"""TEST-ONLY ComfyUI custom node pack: loaders for the shared test VAEs and the tiny test diffusion model.

Stock ComfyUI 0.3.75 cannot load either test VAE from models/vae: TAEF2 needs an architecture
ComfyUI lacks (see tests/support/taef2.py) and kl_f8_small needs its config.json. The headless
server tests (tests/support/server.py) link this folder into custom_nodes/ beside the real pack.
Never ship it: it exists only so that a real ComfyUI server can run workflows on the test VAEs.
The shared data folder honours $EXACT_ENCODE_SHARED (tests/support/paths.py).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

_SUPPORT = Path(__file__).resolve().parent.parent  # <repo>/tests/support
_REPO = _SUPPORT.parents[1]
_ALIAS = "_exact_encode_test_support"  # used only when another `tests` package shadows ours


def _support_models():
    """The repository's `tests.support.models`, imported by a path relative to this file.

    The repo root goes to the END of sys.path: at the front, its `nodes/` package would shadow
    ComfyUI's top-level `nodes` module. ComfyUI's own tree has a regular `tests` package on
    sys.path[0] (the folder of main.py), which wins over ours; in that case tests/support is
    loaded as a package under a private name instead (its modules import each other relatively).
    """
    loaded = sys.modules.get("tests.support.models")
    if loaded is not None and Path(loaded.__file__).resolve().parent == _SUPPORT:
        return loaded
    if str(_REPO) not in sys.path:
        sys.path.append(str(_REPO))
    spec = importlib.util.find_spec("tests") if "tests" not in sys.modules else sys.modules["tests"].__spec__
    locations = list(getattr(spec, "submodule_search_locations", None) or []) if spec else []
    if any(Path(p).resolve() == _SUPPORT.parent for p in locations):
        return importlib.import_module("tests.support.models")
    if _ALIAS not in sys.modules:
        alias = importlib.util.spec_from_file_location(
            _ALIAS, _SUPPORT / "__init__.py", submodule_search_locations=[str(_SUPPORT)])
        module = importlib.util.module_from_spec(alias)
        sys.modules[_ALIAS] = module
        alias.loader.exec_module(module)
    return importlib.import_module(f"{_ALIAS}.models")


models = _support_models()
diffusion = importlib.import_module(models.__name__.rsplit(".", 1)[0] + ".diffusion")

BUILDERS = {"taef2": models.taef2_vae, "kl_f8_small": models.kl_f8_small_vae}


class ExactEncodeTestVAELoader:
    """Loads one of the shared test VAEs (real weights) as a ComfyUI VAE."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"name": (list(BUILDERS), {"default": "taef2"})}}

    RETURN_TYPES = ("VAE",)
    FUNCTION = "load"
    CATEGORY = "testing/exact-encode"
    DESCRIPTION = "TEST ONLY: loads a shared test VAE (TAEF2 or kl_f8_small) that stock loaders cannot."

    def load(self, name):
        if name not in BUILDERS:
            raise ValueError(f"name: unknown test VAE {name!r}; one of {', '.join(BUILDERS)}")
        return (BUILDERS[name](),)


class TestCLIP:
    """Stands in for a CLIP: only ExactEncodeTestConditioning accepts it. `empty`: the model takes
    only its fixed empty conditioning (the trained model)."""

    def __init__(self, empty: bool = False):
        self.empty = empty


MODEL_KINDS = list(diffusion.KINDS) + ["trained"]


class ExactEncodeTestCheckpointLoader:
    """A checkpoint loader's three outputs for the tests: a tiny diffusion model (a real ComfyUI
    MODEL: seeded random eps/v/flow, or `trained`, the eps model trained on kl_f8_small latents,
    tests/data/tiny_ldm/), a stand-in CLIP and the kl_f8_small VAE."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"kind": (MODEL_KINDS, {"default": "eps"})}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = "testing/exact-encode"
    DESCRIPTION = ("TEST ONLY: a tiny diffusion model (seeded random eps/v/flow, or the trained eps model), "
                   "a stand-in CLIP, kl_f8_small.")

    def load(self, kind):
        if kind not in MODEL_KINDS:
            raise ValueError(f"kind: one of {', '.join(MODEL_KINDS)}; got {kind!r}")
        if kind == "trained":
            return (diffusion.trained_model(), TestCLIP(empty=True), models.kl_f8_small_vae())
        return (diffusion.tiny_model(kind), TestCLIP(), models.kl_f8_small_vae())


class ExactEncodeTestConditioning:
    """CLIPTextEncode for the stand-in CLIP: a seeded conditioning for the random model (seed = the
    text's CRC); the trained model's fixed empty conditioning whatever the text (it is unconditional)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip": ("CLIP",), "text": ("STRING", {"multiline": True, "default": ""})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "testing/exact-encode"

    def encode(self, clip, text):
        import zlib

        if not isinstance(clip, TestCLIP):
            raise ValueError("clip: connect ExactEncodeTestCheckpointLoader's CLIP output")
        if clip.empty:
            return (diffusion.empty_conditioning()[0],)
        return (diffusion.tiny_conditioning(seed=zlib.crc32(text.encode()))[0],)


NODE_CLASS_MAPPINGS = {"ExactEncodeTestVAELoader": ExactEncodeTestVAELoader,
                       "ExactEncodeTestCheckpointLoader": ExactEncodeTestCheckpointLoader,
                       "ExactEncodeTestConditioning": ExactEncodeTestConditioning}
NODE_DISPLAY_NAME_MAPPINGS = {"ExactEncodeTestVAELoader": "Test VAE Loader (exact-encode tests)",
                              "ExactEncodeTestCheckpointLoader": "Test Checkpoint Loader (exact-encode tests)",
                              "ExactEncodeTestConditioning": "Test Text Encode (exact-encode tests)"}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]

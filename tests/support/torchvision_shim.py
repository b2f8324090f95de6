"""Lets PyPI's torchvision 0.28 import beside the CPU torch 2.13.0 wheel (test host only).

That torchvision's compiled ops do not load against this torch, so its import dies with
"operator torchvision::nms does not exist" when it registers fake kernels for nms/qnms.
ComfyUI imports torchvision at start-up but never runs those ops for VAEs, so defining the two
schemas is enough. Installed by scripts/setup_env.sh as a .pth hook that acts lazily, on the
first `import torchvision`, so plain interpreter start-up does not pay for importing torch.
"""
import importlib.abc
import sys


def _define_schemas():
    import torch

    try:
        torch.ops.torchvision.nms  # the real extension loaded: nothing to do
        return
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    _define_schemas.lib = lib  # keep the registration alive


class _OnTorchvisionImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            _define_schemas()
        return None


sys.meta_path.insert(0, _OnTorchvisionImport())

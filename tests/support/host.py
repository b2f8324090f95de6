"""A real ComfyUI 0.3.75 host, in-process, with this pack loaded by ComfyUI's own loader.

The tree comes from scripts/setup_env.sh (.host/ComfyUI, or $EXACT_ENCODE_COMFYUI).
"""
from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

from .paths import REPO

PACK_NAME = "comfyui-exact-encode"  # a pack's identity in ComfyUI is its folder name
_HOST = None


def comfy_dir() -> Path:
    path = Path(os.environ.get("EXACT_ENCODE_COMFYUI", REPO / ".host" / "ComfyUI")).resolve()
    if not (path / "main.py").is_file():
        raise RuntimeError(f"no ComfyUI host at {path}: run scripts/setup_env.sh first "
                           "(or set EXACT_ENCODE_COMFYUI to a ComfyUI 0.3.75 tree).")
    return path


def link_pack(custom_nodes: Path) -> Path:
    """Symlink this repository into `custom_nodes/` under the pack's stable name."""
    custom_nodes.mkdir(parents=True, exist_ok=True)
    link = custom_nodes / PACK_NAME
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    return link


def boot(cpu: bool = True) -> SimpleNamespace:
    """Import ComfyUI in the order it needs (CPU, extra_config before nodes), load the pack.
    `cpu=False` (bench.gpu only) lets ComfyUI use its accelerator; the first call decides."""
    global _HOST
    if _HOST is not None:
        return _HOST
    root = str(comfy_dir())
    # ComfyUI's top-level `nodes`/`utils` must win over this repo's `nodes/` package.
    sys.path[:] = [root] + [p for p in sys.path if p not in ("", ".", str(REPO), root)] + [str(REPO)]
    import comfy.cli_args

    comfy.cli_args.args.cpu = cpu
    import comfy.model_management  # noqa: F401  (after args.cpu)
    import utils.extra_config  # noqa: F401  (before nodes)
    import nodes

    assert Path(nodes.__file__).parent == Path(root), f"wrong `nodes` module: {nodes.__file__}"
    link = link_pack(Path(tempfile.mkdtemp(prefix="exact-encode-")) / "custom_nodes")
    if not asyncio.run(nodes.load_custom_node(str(link))):
        raise RuntimeError("ComfyUI failed to load the pack; see the log above")
    pack = sys.modules[str(link).replace(".", "_x_")]
    _HOST = SimpleNamespace(nodes=nodes, pack=pack, comfy_dir=Path(root))
    return _HOST

"""Where the shared test data lives: one env var, one default, loud failures."""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ENV_VAR = "EXACT_ENCODE_SHARED"


def shared_dir() -> Path:
    """`$EXACT_ENCODE_SHARED`, else `../shared` beside the repository."""
    return Path(os.environ.get(ENV_VAR, REPO.parent / "shared")).resolve()


def require(relative: str) -> Path:
    """A path under the shared folder that must exist: a missing model is an error, not a skip."""
    path = shared_dir() / relative
    if not path.exists():
        raise FileNotFoundError(
            f"missing shared test data: {path}. Set {ENV_VAR} to the folder that holds "
            f"models/ and images/ (default: ../shared beside the repository).")
    return path


def image_paths() -> list[Path]:
    files = sorted(require("images").glob("*.png"))
    if len(files) < 4:
        raise FileNotFoundError(f"expected the four test photos in {require('images')}, found {len(files)}")
    return files

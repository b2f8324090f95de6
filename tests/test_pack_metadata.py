"""The Comfy Registry metadata in pyproject.toml [tool.comfy] is complete and in step with the
pack's [project] version (plain file checks: no ComfyUI, no network)."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
COMFY = PYPROJECT["tool"]["comfy"]


def test_registry_fields_are_filled_in():
    # The fields ComfyUI's own comfy_config/types.py ComfyConfig reads, that this pack uses.
    for field in ("PublisherId", "DisplayName", "Icon", "includes"):
        assert COMFY.get(field), f"[tool.comfy] {field} is empty"
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]*", COMFY["PublisherId"])


def test_icon_url_names_this_version_and_a_file_that_exists():
    match = re.fullmatch(r"https://raw\.githubusercontent\.com/[^/]+/[^/]+/v([^/]+)/(.+\.(?:svg|png|jpg|gif))",
                         COMFY["Icon"])
    assert match, f"Icon is not a raw file URL at a release tag: {COMFY['Icon']}"
    tag_version, path = match.groups()
    assert tag_version == PYPROJECT["project"]["version"], "Icon URL's tag and [project] version differ"
    assert (REPO / path).is_file(), f"the icon {path} is not in the repository"


def test_repository_url_and_icon_url_name_the_same_repository():
    repo = PYPROJECT["project"]["urls"]["Repository"].removeprefix("https://github.com/")
    assert COMFY["Icon"].startswith(f"https://raw.githubusercontent.com/{repo}/")


def test_included_folders_exist_and_hold_what_the_pack_serves():
    for folder in COMFY["includes"]:
        assert (REPO / folder).is_dir(), folder
    assert (REPO / "web" / "exact_encode.js").is_file()
    assert list((REPO / "web" / "docs").glob("*.md")), "no node help pages in web/docs"

"""The pack's module structure, read from the source (ast): node modules are thin and
independent; everything they share lives in helper modules that import only downward."""
from __future__ import annotations

import ast
from pathlib import Path

NODES = Path(__file__).resolve().parents[1] / "nodes"


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _is_node_module(tree: ast.Module) -> bool:
    """Defines a ComfyUI V3 node: a class deriving from io.ComfyNode."""
    return any(isinstance(c, ast.ClassDef) and any(ast.unparse(b).endswith("ComfyNode") for b in c.bases)
               for c in tree.body)


def _sibling_imports(tree: ast.Module) -> set[str]:
    """Modules of nodes/ imported anywhere in the file (top level or inside functions)."""
    out = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom) and n.level == 1:
            out |= {n.module.split(".")[0]} if n.module else {a.name for a in n.names}
    return out


def test_no_node_module_imports_another_node_module():
    trees = {p.stem: _tree(p) for p in NODES.glob("*.py") if p.stem != "__init__"}
    node_modules = {name for name, t in trees.items() if _is_node_module(t)}
    assert {"exact_encode", "exact_encode_tiled", "decode_tiled", "treering"} <= node_modules  # not vacuous
    offenders = {name: sorted(_sibling_imports(t) & node_modules) for name, t in trees.items()}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_helper_modules_form_no_cycle():
    trees = {p.stem: _tree(p) for p in NODES.glob("*.py") if p.stem != "__init__"}
    graph = {name: _sibling_imports(t) & set(trees) for name, t in trees.items()}

    def reaches(start, target, seen=()):
        return any(n == target or (n not in seen and reaches(n, target, seen + (n,))) for n in graph[start])

    assert [m for m in graph if reaches(m, m)] == []


def test_the_checker_sees_a_node_import():
    """The checks above would fail on the old layout (a node importing another node's helpers)."""
    tree = ast.parse("from comfy_api.latest import io\nfrom .exact_encode import image_to_pixels\n"
                     "class N(io.ComfyNode):\n    pass\n")
    assert _is_node_module(tree) and _sibling_imports(tree) == {"exact_encode"}


def test_every_node_has_a_help_page_titled_with_its_display_name():
    """web/docs/<node_id>.md: what ComfyUI's node help panel shows for a custom node."""
    docs = NODES.parent / "web" / "docs"
    schemas = []
    for path in NODES.glob("*.py"):
        for call in ast.walk(_tree(path)):
            if isinstance(call, ast.Call) and ast.unparse(call.func).endswith("Schema"):
                kw = {k.arg: k.value.value for k in call.keywords if isinstance(k.value, ast.Constant)}
                schemas.append((kw["node_id"], kw["display_name"]))
    assert len(schemas) == 11
    for node_id, display_name in schemas:
        page = docs / f"{node_id}.md"
        assert page.is_file(), page
        assert page.read_text().startswith(f"# {display_name}\n"), node_id

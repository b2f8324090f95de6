"""Browser end-to-end: headless Debian Chromium against the real ComfyUI frontend
(comfyui-frontend-package, served by a real test server with the pack installed).

The diagnostics workflow is opened the way a user opens it: from the Templates browser, where
ComfyUI lists the pack's workflows/ folder. Then it is queued with the keyboard shortcut and the
test waits for the live sparkline on VAE Exact Encode and the report on Inversion Diagnostics.
The screenshot is kept in tests/artifacts/. The VAE is a seeded random TAESD file (plumbing, not
quality): stock Load VAE cannot load the shared test VAEs.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.support.server import ComfyServer

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "tests" / "artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
TEST_VAE = "exact_encode_browser_taesd.safetensors"
STEPS = 12


@pytest.fixture(scope="module")
def server(host):
    from tests.support.models import write_random_taesd_file

    with ComfyServer() as s:
        write_random_taesd_file(s.base / "models", TEST_VAE, seed=5)
        yield s


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        raise RuntimeError("Debian chromium is missing: scripts/setup_env.sh installs it (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def page(server, browser):
    """One frontend session for the whole module (booting the frontend is most of a test's time)."""
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    page.errors = []
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.on("console", lambda m: page.errors.append(m.text)
            if m.type == "error" and "exact_encode" in m.text else None)
    page.goto(server.url, timeout=120_000)
    page.wait_for_function("() => window.app?.graph && window.LiteGraph", timeout=120_000)
    try:  # a first visit opens the Templates browser by itself: let it finish opening
        page.get_by_text(WORKFLOWS[0].stem, exact=True).first.wait_for(state="visible", timeout=30_000)
    except Exception:  # noqa: BLE001 - not opened: open_template opens it from the sidebar
        pass
    yield page
    page.close()


WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))


def open_template(page, name: str) -> None:
    """Open the pack's workflow from the Templates browser (it opens by itself on a first visit)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    card = page.get_by_text(name, exact=True).first
    try:
        card.wait_for(state="visible", timeout=3_000)
    except PlaywrightTimeout:  # the Templates browser is closed: open it from the sidebar
        page.get_by_role("button", name="Templates").first.click()
        card.wait_for(state="visible", timeout=60_000)
    card.click()
    types = sorted(n["type"] for n in json.loads((REPO / "workflows" / f"{name}.json").read_text())["nodes"])
    page.wait_for_function(  # this graph is the active one (no two shipped graphs have the same nodes)
        "(types) => JSON.stringify(window.app.graph._nodes.map(n => n.type).sort()) === JSON.stringify(types)",
        arg=types, timeout=60_000)


def loaded_types(page, name: str) -> tuple[list[str], list[str]]:
    """(types in the loaded graph, those the frontend has no definition for)."""
    shipped = json.loads((REPO / "workflows" / f"{name}.json").read_text())
    loaded = page.evaluate("() => window.app.graph._nodes.map(n => n.type)")
    assert sorted(loaded) == sorted(n["type"] for n in shipped["nodes"])
    registered = set(page.evaluate("() => Object.keys(window.LiteGraph.registered_node_types)"))
    return loaded, [t for t in loaded if t not in registered]


def point_at_test_files(page, image: str, steps: int = STEPS) -> None:
    """The shipped graph names sdxl_vae.safetensors and example.png; point it at the test files."""
    page.evaluate("""([vae, image, steps]) => {
        const set = (type, name, value) => {
            const node = window.app.graph._nodes.find(n => n.type === type);
            node.widgets.find(w => w.name === name).value = value;
        };
        set("VAELoader", "vae_name", vae);
        set("LoadImage", "image", image);
        set("VAEExactEncode", "steps", steps);
    }""", [TEST_VAE, image, steps])


def queue(page) -> None:
    page.locator("canvas#graph-canvas").click(position={"x": 700, "y": 900})  # focus the canvas
    page.keyboard.press("Control+Enter")  # Queue Prompt


def small_test_image(server) -> str:
    from PIL import Image

    small = server.base / "browser_small.png"  # 96 px: the tests are about the UI, not the solver
    Image.open(server.image_source).convert("RGB").resize((96, 96)).save(small)
    return server.add_input(small, "browser.png")


def test_diagnostics_workflow_from_the_ui_shows_sparkline_and_report(server, page):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    image = small_test_image(server)
    try:
        open_template(page, "inversion_diagnostics")

        assert loaded_types(page, "inversion_diagnostics")[1] == []  # zero missing nodes

        point_at_test_files(page, image)
        queue(page)

        spark = page.locator(".exact-encode-sparkline")
        spark.wait_for(state="attached", timeout=240_000)
        page.wait_for_function(
            f"() => Number(document.querySelector('.exact-encode-sparkline')?.dataset.points) === {STEPS + 1}",
            timeout=240_000)
        report = page.wait_for_function(
            "() => [...document.querySelectorAll('textarea.exact-encode-summary')]"
            ".map(t => t.value).find(v => v.startsWith('Inversion Diagnostics'))", timeout=240_000).json_value()
        assert "gain" in report and "solver: anderson" in report and "assumption" in report
        points = page.evaluate("() => document.querySelector('.exact-encode-sparkline polyline')"
                               ".getAttribute('points').trim().split(' ').length")
        assert points == STEPS + 1
        assert f"iteration {STEPS}/{STEPS}" in spark.inner_text()
        page.wait_for_timeout(500)  # let the canvas repaint the previews before the picture
    finally:
        page.screenshot(path=str(ARTIFACTS / "browser_diagnostics.png"))
    assert page.errors == []


def test_sparkline_follows_the_node_into_a_subgraph(server, page):
    """Inside a subgraph the server keys progress by execution id ("outer:inner"); the sparkline
    must land on the inner VAE Exact Encode. The node is moved into a subgraph with the frontend's
    own Convert to Subgraph, and the graph runs for real on the server (with its own step count:
    ComfyUI would serve an identical graph from its cache, without progress events)."""
    steps = STEPS - 3
    image = small_test_image(server)
    open_template(page, "inversion_diagnostics")
    point_at_test_files(page, image, steps)
    ids = page.evaluate("""() => {
        const graph = window.app.graph;
        const node = graph._nodes.find(n => n.type === "VAEExactEncode");
        const {node: outer} = graph.convertToSubgraph(new Set([node]));
        const inner = outer.subgraph._nodes.find(n => n.type === "VAEExactEncode");
        return [outer.id, inner.id];
    }""")
    try:
        queue(page)
        points = page.wait_for_function("""([outer, inner]) => {
            const node = window.app.graph.getNodeById(outer)?.subgraph?.getNodeById(inner);
            const points = Number(node?.widgets?.find(w => w.name === "exact_encode_sparkline")?.element.dataset.points);
            return points === %d && points;
        }""" % (steps + 1), arg=ids, timeout=240_000).json_value()
    finally:  # the frontend reopens this open tab for the template later: give it back its own nodes
        page.evaluate("(outer) => window.app.graph.unpackSubgraph(window.app.graph.getNodeById(outer))", ids[0])
    assert points == steps + 1
    assert [e for e in page.errors if "exact_encode" in e] == []


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_every_workflow_opens_from_the_templates_with_zero_missing_nodes(path, page):
    open_template(page, path.stem)
    _, missing = loaded_types(page, path.stem)
    assert missing == []
    assert not page.get_by_text("Missing Node Types").is_visible()
    assert [e for e in page.errors if "exact_encode" in e] == []

"""Browser end-to-end: headless Debian Chromium against the real ComfyUI frontend, served by a real
test server with the pack installed, as a matrix {pinned frontend, newest frontend} x {classic
canvas, Vue renderer "Nodes 2.0"}.

The pinned frontend is the comfyui-frontend-package in .venv; the newest is a `pip install --target`
of the package into .host/frontends/<version>/ (scripts/setup_env.sh builds both), served with
ComfyUI's `--front-end-root`. The renderer is the user setting Comfy.VueNodes.Enabled, written
through the server's settings API before the page loads. Each cell boots one frontend session and
shares it between its tests (booting is most of a test's time).

The diagnostics workflow is opened the way a user opens it: from the Templates browser, where
ComfyUI lists the pack's workflows/ folder. Then it is queued with the keyboard shortcut and the
test checks what a person sees: the live sparkline, the summaries on screen, read-only, not cut
off. One screenshot per cell is kept in tests/artifacts/. The VAE is a seeded random TAESD file
(plumbing, not quality): stock Load VAE cannot load the shared test VAEs.
"""
from __future__ import annotations

import json
import shutil
from importlib.metadata import version
from pathlib import Path

import pytest

from tests.support.server import ComfyServer

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "tests" / "artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
TEST_VAE = "exact_encode_browser_taesd.safetensors"
STEPS = 12
NEWEST_FRONTEND = "1.58.1"  # keep in step with FRONTENDS in scripts/setup_env.sh
FRONTENDS = {version("comfyui-frontend-package"): None,  # .venv's own: ComfyUI's default
             NEWEST_FRONTEND: REPO / ".host" / "frontends" / NEWEST_FRONTEND / "comfyui_frontend_package" / "static"}
RENDERERS = {"classic": False, "nodes2": True}  # the value of Comfy.VueNodes.Enabled
# What a person sees is checked in every cell; the checks that do not depend on how nodes are drawn
# (a real run inside a subgraph, every template loading) run on the diagonal only, to keep the
# matrix's time down: the pinned frontend as before, and the newest one in Nodes 2.0.
DIAGONAL = {f"{next(iter(FRONTENDS))}-classic", f"{NEWEST_FRONTEND}-nodes2"}
# The pack's nodes these tests name, by display name (ids are being renamed; display names stay).
DIAGNOSTICS, ENCODE = "Inversion Diagnostics", "VAE Exact Encode (Gradient-Free)"
TEXT_NODES = ("VAE Exact Encode (Tiled)", "Diffusion Inversion (Euler/DDIM)", "Tree-Ring Detect")
HELP_LINE = "The latent whose decode reproduces the image"  # in web/docs/VAEExactEncode.md


@pytest.fixture(scope="module", params=list(FRONTENDS))
def server(request, host):
    from tests.support.models import write_random_taesd_file

    root = FRONTENDS[request.param]
    if root is not None and not (root / "index.html").is_file():
        raise RuntimeError(f"frontend {request.param} is missing at {root}: scripts/setup_env.sh installs it")
    with ComfyServer(front_end_root=root) as s:
        write_random_taesd_file(s.base / "models", TEST_VAE, seed=5)
        s.frontend = request.param
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


# Every console message with the stack that logged it: a deprecation warning names the API, and
# only the stack says whose code called it.
RECORD_CONSOLE = """(() => {
    window.__console = [];
    for (const level of ["log", "info", "warn", "error", "debug"]) {
        const original = console[level].bind(console);
        console[level] = (...args) => {
            window.__console.push({level, text: args.map(String).join(" "), stack: new Error().stack});
            original(...args);
        };
    }
})();"""


@pytest.fixture(scope="module", params=list(RENDERERS))
def page(request, server, browser):
    """One frontend session per matrix cell, in the cell's renderer."""
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    page.cell = f"{server.frontend}-{request.param}"
    page.errors = []
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.on("console", lambda m: page.errors.append(m.text)
            if m.type == "error" and "exact_encode" in m.text else None)
    page.add_init_script(RECORD_CONSOLE)
    reply = page.request.post(f"{server.url}/settings/Comfy.VueNodes.Enabled",
                              data=json.dumps(RENDERERS[request.param]))
    assert reply.ok, reply.text()
    page.goto(server.url, timeout=120_000)
    page.wait_for_function("() => window.app?.graph && window.LiteGraph", timeout=120_000)
    assert page.evaluate("() => window.app.ui.settings.getSettingValue('Comfy.VueNodes.Enabled')") \
        is RENDERERS[request.param]
    assert page.evaluate("() => typeof window.LiteGraph.registered_node_types.VAEExactEncode"
                         "?.prototype.onExecuted === 'function'"), "web/exact_encode.js did not load: see the console"
    try:  # a first visit opens the Templates browser by itself: let it finish opening
        page.get_by_text(WORKFLOWS[0].stem, exact=True).first.wait_for(state="visible", timeout=30_000)
    except Exception:  # noqa: BLE001 - not opened: open_template opens it from the sidebar
        pass
    yield page
    page.close()


WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))


# The frontend's dialog store (Pinia, id "dialog"), reached through the Vue app on #vue-app
CLOSE_DIALOGS = """() => {
    const store = document.querySelector('#vue-app')?.__vue_app__?.config.globalProperties.$pinia?._s.get('dialog');
    if (!store) return false;
    for (const d of [...store.dialogStack]) store.closeDialog({key: d.key});
    return true;
}"""


def close_dialogs(page) -> None:
    """Close the dialogs over the canvas: the Templates browser opens by itself on a first visit, and while it is
    still loading an Escape does not reach it (focus is on the page body): a test run alone found the node it
    checks covered by it. Escape first, as a person would; else the dialog store's own closeDialog."""
    masks = page.locator(".p-dialog-mask")
    page.keyboard.press("Escape")
    if masks.count():
        assert page.evaluate(CLOSE_DIALOGS), "no dialog store to close the dialog over the canvas with"
    if masks.count():
        masks.first.wait_for(state="detached", timeout=10_000)


def blank_graph(page) -> None:
    """A new blank workflow tab: the templates' tabs stay as the frontend reopens them."""
    close_dialogs(page)
    page.evaluate("() => window.app.extensionManager.command.execute('Comfy.NewBlankWorkflow')")
    page.wait_for_function("() => window.app.graph._nodes.length === 0", timeout=30_000)


def pack_node_ids(page) -> dict[str, str]:
    """{display name: node id} of the pack's nodes, from the frontend's node definitions."""
    return page.evaluate("""async () => {
        const defs = await (await fetch("/object_info")).json();
        return Object.fromEntries(Object.values(defs)
            .filter(d => d.python_module?.startsWith("custom_nodes.comfyui-exact-encode"))
            .map(d => [d.display_name, d.name]));
    }""")


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


# How a display element of node `id` looks on screen: its box, whether a person sees it there
# (the topmost element at its centre is it or inside it), whether its content fits, and the box of
# its node (the Vue renderer's node element, or the classic canvas's node rectangle).
ON_SCREEN = """([id, selector]) => {
    const node = window.app.graph.getNodeById(id);
    const el = node.widgets?.map(w => w.element).find(e => e?.matches(selector));
    if (!el) return null;
    const box = el.getBoundingClientRect();
    const top = document.elementFromPoint(box.x + box.width / 2, box.y + Math.min(box.height / 2, 10));
    let nodeBox = document.querySelector(`[data-node-id="${id}"]`)?.getBoundingClientRect();
    if (!nodeBox) {
        const c = window.app.canvas, r = c.canvas.getBoundingClientRect(), s = c.ds.scale, o = c.ds.offset;
        nodeBox = {top: r.top + (node.pos[1] + o[1] - window.LiteGraph.NODE_TITLE_HEIGHT) * s,
                   bottom: r.top + (node.pos[1] + node.size[1] + o[1]) * s};
    }
    return {text: el.innerText, height: el.offsetHeight, top: box.top, bottom: box.bottom,
            seen: box.width > 0 && box.height > 0 && !!top && el.contains(top),
            fits: el.scrollHeight <= el.clientHeight + 1,
            nodeTop: nodeBox.top, nodeBottom: nodeBox.bottom};
}"""


def node_id(page, display_name: str) -> int:
    return page.evaluate("(t) => window.app.graph._nodes.find(n => n.constructor.title === t"
                         " || n.constructor.nodeData?.display_name === t).id", display_name)


def seen_on_node(page, display_name: str, selector: str) -> dict:
    """The node's display element as a person sees it; fails if it is hidden or cut off."""
    nid = node_id(page, display_name)
    page.evaluate("(id) => window.app.canvas.centerOnNode?.(window.app.graph.getNodeById(id))", nid)
    page.wait_for_timeout(300)  # let both renderers move their elements to the new view
    shown = page.evaluate(ON_SCREEN, [nid, selector])
    assert shown is not None, f"{display_name} has no {selector}"
    assert shown["seen"], f"{display_name}'s {selector} is not visible on screen: {shown}"
    assert shown["fits"], f"{display_name}'s {selector} clips its content: {shown}"
    assert shown["nodeTop"] - 1 <= shown["top"] and shown["bottom"] <= shown["nodeBottom"] + 1, \
        f"{display_name}'s {selector} sticks out of its node: {shown}"
    return shown


def returned_text(server, nid: int) -> str:
    """The `text` the node's last run returned, from the server's history."""
    runs = sorted(server.get("/history").values(), key=lambda e: e["status"]["messages"][0][1]["timestamp"])
    return "\n".join(runs[-1]["outputs"][str(nid)]["text"])


def assert_read_only(page, display_name: str) -> None:
    """Clicking into the summary and typing leaves its text as it was."""
    page.evaluate("(id) => window.app.graph.getNodeById(id).widgets.find(w => w.name === 'exact_encode_summary')"
                  ".element.setAttribute('data-test-typed-into', '')", node_id(page, display_name))
    summary = page.locator("[data-test-typed-into]")
    before = summary.inner_text()
    summary.click()
    page.keyboard.type("123")  # digits: no single-key shortcut of the frontend
    assert summary.inner_text() == before


def pack_console_warnings(page) -> list[str]:
    """Deprecation or internal-module warnings that the pack's code caused. The frontend's shims
    of internal modules warn when first imported; the pack is the only extension that could."""
    return page.evaluate("""() => window.__console
        .filter(m => /deprecat/i.test(m.text) && m.stack.includes("/extensions/comfyui-exact-encode/")
                  || /internal module/i.test(m.text))
        .map(m => m.text)""")


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
            f"() => Number(document.querySelector('.exact-encode-sparkline')?.dataset.points) >= {STEPS + 1}",
            timeout=240_000)
        page.wait_for_function("() => [...document.querySelectorAll('.exact-encode-summary-text')]"
                               ".some(t => t.textContent.startsWith('Inversion Diagnostics'))", timeout=240_000)
        # every iteration drawn: the run's STEPS + 1, then (where the default's diis rival ran) the rival's, after them
        drawn = page.evaluate("() => Number(document.querySelector('.exact-encode-sparkline').dataset.points)")
        points = page.evaluate("() => document.querySelector('.exact-encode-sparkline polyline')"
                               ".getAttribute('points').trim().split(' ').length")
        assert points == drawn >= STEPS + 1
        page.wait_for_timeout(500)  # let the canvas repaint the previews before looking

        sparkline = seen_on_node(page, ENCODE, ".exact-encode-sparkline")
        assert sparkline["height"] == 64
        assert f"iteration {drawn - 1}/" in sparkline["text"] and "undefined" not in sparkline["text"]
        report = seen_on_node(page, DIAGNOSTICS, ".exact-encode-summary")["text"]
        assert report.startswith("Summary\n")  # labelled for a person, not with the widget's name
        assert "gain" in report and "solver: anderson" in report and "assumption" in report
        for name in (ENCODE, DIAGNOSTICS):  # the whole text each node returned, not its first lines
            returned = returned_text(server, node_id(page, name))
            assert seen_on_node(page, name, ".exact-encode-summary")["text"] == "Summary\n" + returned
        assert_read_only(page, DIAGNOSTICS)
    finally:
        page.screenshot(path=str(ARTIFACTS / f"browser_{page.cell}.png"))
    assert page.errors == []
    assert pack_console_warnings(page) == []


def test_every_pack_node_that_returns_text_shows_it(page):
    """Which nodes show a summary is derived, not listed: each node of the pack placed on the canvas
    gets the text of an `executed` message through the frontend's own event path, and a node of
    another pack does not."""
    ids = pack_node_ids(page)
    assert set(TEXT_NODES) <= set(ids)
    blank_graph(page)
    shown = page.evaluate("""([types]) => {
        const graph = window.app.graph, api = window.comfyAPI.api.api;
        let x = 40;  // one row, each node right of the last, so none covers another (a grid of 420 px steps
        // overlapped nodes that are up to 600 px tall)
        const nodes = types.map((type) => {
            const node = window.LiteGraph.createNode(type);
            node.pos = [x, 40];
            x += node.size[0] + 60;
            graph.add(node);
            return node;
        });
        const other = window.LiteGraph.createNode("ExactEncodeTestVAELoader");
        graph.add(other);
        for (const node of [...nodes, other]) {
            api.dispatchCustomEvent("executed", {node: String(node.id), display_node: String(node.id),
                                                 output: {text: [`text of ${node.type}\\nsecond line`]}});
        }
        const summary = (n) => {  // label and text (innerText needs the element laid out)
            const el = n.widgets?.find(w => w.name === "exact_encode_summary")?.element;
            return el ? [...el.children].map(c => c.textContent).join("\\n") : null;
        };
        return {pack: Object.fromEntries(nodes.map(n => [n.type, summary(n)])), other: summary(other)};
    }""", [[ids[name] for name in TEXT_NODES]])
    assert shown["other"] is None
    for name in TEXT_NODES:
        assert shown["pack"][ids[name]] == f"Summary\ntext of {ids[name]}\nsecond line", name
    for name in TEXT_NODES[:1]:  # seen on screen too (the others share the same widget)
        seen_on_node(page, name, ".exact-encode-summary")
    assert pack_console_warnings(page) == []


def test_sparkline_label_when_the_page_joins_a_run_midway(page):
    """A page reloaded mid-run first hears iteration k > 0: the label starts there (it read
    "PSNR undefined -> ...")."""
    blank_graph(page)
    label = page.evaluate("""() => {
        const graph = window.app.graph, api = window.comfyAPI.api.api;
        const node = window.LiteGraph.createNode("VAEExactEncode");
        graph.add(node);
        for (const [k, v] of [[5, 20.5], [6, 21.25]])
            api.dispatchCustomEvent("exact_encode.progress",
                {node: String(node.id), prompt_id: "joined", iteration: k, steps: 8, psnr: [v]});
        return node.widgets.find(w => w.name === "exact_encode_sparkline").element.innerText;
    }""")
    assert label.startswith("PSNR 20.50 → 21.25 dB · iteration 6/8"), label


def test_the_summary_and_sparkline_are_not_saved_into_the_workflow(page):
    """The display widgets hold nothing to restore: a saved workflow keeps only the node's own inputs. The
    frontend (litegraph) decides what goes into `widgets_values` by `widget.serialize`, not by addDOMWidget's
    `options.serialize` (which only keeps a value out of the prompt): the pack set only the latter, and 1.32.9 and
    1.58.1 alike saved two empty values per node."""
    blank_graph(page)
    saved = page.evaluate("""() => {
        const graph = window.app.graph, api = window.comfyAPI.api.api;
        const node = window.LiteGraph.createNode("VAEExactEncode");
        graph.add(node);
        const own = node.widgets.length;  // the node's inputs, before any display widget exists
        api.dispatchCustomEvent("exact_encode.progress",
            {node: String(node.id), prompt_id: "saved", iteration: 1, steps: 8, psnr: [20.5]});
        api.dispatchCustomEvent("executed", {node: String(node.id), display_node: String(node.id),
                                             output: {text: ["a summary"]}});
        const names = node.widgets.map(w => w.name);
        const data = node.serialize();  // what graph.serialize() writes for it
        return {own, names, values: data.widgets_values, named: Object.keys(data.widgets_values_named ?? {})};
    }""")
    assert {"exact_encode_summary", "exact_encode_sparkline"} <= set(saved["names"]), saved["names"]
    assert len(saved["values"]) == saved["own"], saved
    assert not {"exact_encode_summary", "exact_encode_sparkline"} & set(saved["named"]), saved["named"]


def test_help_panel_shows_the_node_docs(page):
    """web/docs/<node id>.md is what the node's help (Info) panel shows."""
    blank_graph(page)
    nid = page.evaluate("""() => {
        const graph = window.app.graph;
        const node = window.LiteGraph.createNode("VAEExactEncode");
        graph.add(node);
        window.app.canvas.selectNode(node);
        window.app.canvas.centerOnNode?.(node);
        return node.id;
    }""")
    page.wait_for_timeout(300)
    page.locator('[data-testid="info-button"]').first.click()
    page.get_by_text(HELP_LINE, exact=False).first.wait_for(state="visible", timeout=30_000)
    page.screenshot(path=str(ARTIFACTS / f"browser_{page.cell}_help.png"))
    assert nid is not None


def test_sparkline_follows_the_node_into_a_subgraph(server, page):
    """Inside a subgraph the server keys progress by execution id ("outer:inner"); the sparkline
    must land on the inner VAE Exact Encode. The node is moved into a subgraph with the frontend's
    own Convert to Subgraph, and the graph runs for real on the server (with its own step count:
    ComfyUI would serve an identical graph from its cache, without progress events)."""
    if page.cell not in DIAGONAL:
        pytest.skip(f"renderer-independent: runs in {sorted(DIAGONAL)}")
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
            const points = Number(
                node?.widgets?.find(w => w.name === "exact_encode_sparkline")?.element.dataset.points);
            return points === %d && points;
        }""" % (steps + 1), arg=ids, timeout=240_000).json_value()
    finally:  # the frontend reopens this open tab for the template later: give it back its own nodes
        page.evaluate("(outer) => window.app.graph.unpackSubgraph(window.app.graph.getNodeById(outer))", ids[0])
    assert points == steps + 1
    assert [e for e in page.errors if "exact_encode" in e] == []


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_every_workflow_opens_from_the_templates_with_zero_missing_nodes(path, page):
    if page.cell not in DIAGONAL:
        pytest.skip(f"renderer-independent: runs in {sorted(DIAGONAL)}")
    open_template(page, path.stem)
    _, missing = loaded_types(page, path.stem)
    assert missing == []
    assert not page.get_by_text("Missing Node Types").is_visible()
    assert [e for e in page.errors if "exact_encode" in e] == []
    assert pack_console_warnings(page) == []

// On-node feedback for the exact-encode pack, on the classic canvas and on the Vue renderer
// ("Nodes 2.0") alike. Only the frontend's public extension API is used (app.registerExtension,
// node.addDOMWidget, api.addEventListener): both renderers place a DOM widget's own element.
// - Any node that sends "exact_encode.progress" events (keyed by node id) gets a live 64 px
//   sparkline of PSNR per iteration; a new run clears it.
// - Any node of this pack whose run returns text (its executed message's `text`) shows it in a
//   read-only, labelled summary that grows to fit. Which nodes those are is not listed here: a
//   node belongs to the pack when its python_module names this extension's folder.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

// ComfyUI serves a pack's web folder at /extensions/<pack folder>/ and names the pack's nodes'
// module custom_nodes.<pack folder>: this file's URL says which folder that is.
const PACK_FOLDER = decodeURIComponent(new URL(".", import.meta.url).pathname.split("/").filter(Boolean).at(-1));
const SUMMARY = "exact_encode_summary";
const SPARKLINE = "exact_encode_sparkline";
const SPARKLINE_HEIGHT = 64;
const EVENT = "exact_encode.progress";
const COLORS = ["#4da3ff", "#ff8a3d", "#5fd18a", "#e06bd8"];
const SVG = "http://www.w3.org/2000/svg";
const MARGIN = 10; // px around a DOM widget on the classic canvas (the frontend's default, set explicitly)

function isPackNode(nodeData) {
  return nodeData?.python_module?.split(".")[1] === PACK_FOLDER;
}

function fitNode(node) {
  node.setSize([node.size[0], Math.max(node.size[1], node.computeSize()[1])]);
  node.setDirtyCanvas(true, true);
}

// The classic canvas sizes a DOM widget from getMinHeight/getMaxHeight (its element gets that
// height less the widget's margin on each side); the Vue renderer lays the element out itself.
// `flex: none` keeps the element at its own height where a Vue row stretches its children.
function addDisplayWidget(node, name, el, height) {
  el.style.flex = "none";
  const widget = node.addDOMWidget(name, name, el, {
    serialize: false, // display only: kept out of the prompt ...
    hideOnZoom: false,
    margin: MARGIN,
    getValue: () => "",
    setValue: () => {},
    getMinHeight: () => height() + 2 * MARGIN,
    getMaxHeight: () => height() + 2 * MARGIN,
  });
  widget.serialize = false; // ... and out of saved workflows (widgets_values), which options.serialize is not
  return widget;
}

function summaryElement(node) {
  const existing = node.widgets?.find((w) => w.name === SUMMARY);
  if (existing) return existing.element;
  const el = document.createElement("div");
  el.className = "exact-encode-summary";
  el.setAttribute("role", "status");
  el.style.cssText = "box-sizing:border-box;padding:4px 6px;border-radius:4px;background:rgba(0,0,0,0.25);" +
    "color:#ddd;font:11px/15px ui-monospace,monospace;cursor:text;user-select:text";
  const label = document.createElement("div");
  label.textContent = "Summary";
  label.style.cssText = "font:600 11px/15px sans-serif;color:#999";
  const text = document.createElement("div");
  text.className = "exact-encode-summary-text";
  text.style.cssText = "white-space:pre-wrap;overflow-wrap:anywhere";
  el.append(label, text);
  addDisplayWidget(node, SUMMARY, el, () => summaryHeight(node, label, text)).label = "Summary";
  return el;
}

// The text's height once wrapped at the width the node gives it. Measured at that width, not at
// the element's current one: a freshly placed element can be a few pixels wide, and text wrapped
// there would make the node grow enormously. Before the element is laid out, count lines.
function summaryHeight(node, label, text) {
  if (!text.isConnected) return 15 * (2 + (text.textContent.match(/\n/g)?.length ?? 0)) + 8;
  const width = text.style.width;
  text.style.width = `${Math.max(node.size[0] - 2 * MARGIN - 12, 40)}px`;
  const height = label.offsetHeight + text.offsetHeight + 8;
  text.style.width = width;
  return height;
}

function showSummary(node, text) {
  summaryElement(node).querySelector(".exact-encode-summary-text").textContent = text;
  fitNode(node);
  // Once the browser has wrapped the new text, its real height is known: grow to it.
  requestAnimationFrame(() => fitNode(node));
}

function sparkline(node) {
  const widget = node.widgets?.find((w) => w.name === SPARKLINE);
  if (widget) return widget.element;
  const el = document.createElement("div");
  el.className = "exact-encode-sparkline";
  el.style.cssText = `box-sizing:border-box;height:${SPARKLINE_HEIGHT}px;font:11px sans-serif;color:#bbb;` +
    "display:flex;flex-direction:column";
  const label = document.createElement("div");
  label.className = "exact-encode-sparkline-label";
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("viewBox", "0 0 100 40");
  svg.style.cssText = "flex:1;min-height:0;width:100%;background:rgba(0,0,0,0.25);border-radius:4px";
  el.append(label, svg);
  el.series = [];
  addDisplayWidget(node, SPARKLINE, el, () => SPARKLINE_HEIGHT).label = "PSNR per iteration";
  fitNode(node);
  return el;
}

function clearSparkline(el) {
  el.series = [];
  el.dataset.iteration = "";
  el.dataset.points = "0";
  el.querySelector("svg").replaceChildren();
  el.querySelector(".exact-encode-sparkline-label").textContent = "";
}

const seen = (points) => points.filter(Number.isFinite); // a page opened mid-run has holes

function drawSparkline(el, steps) {
  const svg = el.querySelector("svg");
  const values = el.series.flatMap(seen);
  if (!values.length) return;
  let lo = Math.min(...values);
  let hi = Math.max(...values);
  if (hi - lo < 1e-6) { lo -= 0.5; hi += 0.5; }
  const lines = el.series.map((points, i) => {
    const line = document.createElementNS(SVG, "polyline");
    const xy = [];
    points.forEach((v, k) => {
      if (Number.isFinite(v)) xy.push(`${((100 * k) / Math.max(steps, 1)).toFixed(2)},${(38 - (36 * (v - lo)) / (hi - lo)).toFixed(2)}`);
    });
    line.setAttribute("points", xy.join(" "));
    line.setAttribute("fill", "none");
    line.setAttribute("stroke", COLORS[i % COLORS.length]);
    line.setAttribute("stroke-width", "1.5");
    line.setAttribute("vector-effect", "non-scaling-stroke");
    return line;
  });
  svg.replaceChildren(...lines);
  const first = seen(el.series[0]);
  const range = first.length ? `${first[0].toFixed(2)} → ${first.at(-1).toFixed(2)} dB` : "–";
  el.querySelector(".exact-encode-sparkline-label").textContent =
    `PSNR ${range} · iteration ${el.dataset.iteration}/${steps}` +
    (el.series.length > 1 ? ` · ${el.series.length} images` : "");
}

// The server keys a node inside a subgraph by its execution id, the path of node ids from the
// root graph ("5:3" = node 3 inside subgraph node 5); a plain id is a node of the root graph.
function nodeFromExecutionId(id) {
  let graph = app.graph;
  let node = null;
  for (const part of String(id).split(":")) {
    if (!graph) return null;
    node = graph.getNodeById(Number(part)) ?? graph.getNodeById(part);
    graph = node?.subgraph;
  }
  return node;
}

function* allNodes(graph, seenGraphs = new Set()) {
  if (!graph || seenGraphs.has(graph)) return;
  seenGraphs.add(graph);
  for (const node of graph._nodes ?? graph.nodes ?? []) {
    yield node;
    yield* allNodes(node.subgraph, seenGraphs);
  }
}

function onProgress(event) {
  const d = event.detail;
  const node = nodeFromExecutionId(d.node);
  if (!node) return;
  const el = sparkline(node);
  if (d.iteration === 0 || el.dataset.prompt !== String(d.prompt_id)) {
    el.series = d.psnr.map(() => []);
    el.dataset.prompt = String(d.prompt_id);
  }
  d.psnr.forEach((v, i) => { (el.series[i] ??= [])[d.iteration] = v ?? null; });
  el.dataset.iteration = String(d.iteration);
  el.dataset.points = String(seen(el.series[0]).length);
  drawSparkline(el, d.steps);
}

app.registerExtension({
  name: "exact_encode.feedback",
  setup() {
    api.addEventListener(EVENT, onProgress);
    api.addEventListener("execution_start", () => { // a new run clears the previous run's sparklines
      for (const node of allNodes(app.graph)) {
        const el = node.widgets?.find((w) => w.name === SPARKLINE)?.element;
        if (el) clearSparkline(el);
      }
    });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!isPackNode(nodeData)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = message?.text;
      if (text?.length) showSummary(this, Array.isArray(text) ? text.join("\n") : String(text));
    };
  },
});

// On-node feedback for the exact-encode pack:
// - VAE Exact Encode: a live sparkline of PSNR per iteration while it runs, fed by the
//   "exact_encode.progress" events the node sends (keyed by node id); cleared when a new run starts.
// - VAE Exact Encode and Inversion Diagnostics: the node's summary text after each run.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const SUMMARY_NODES = new Set(["VAEExactEncode", "ExactEncodeInversionDiagnostics", "ExactEncodeRoundTripDrift", "VAEExactEncodeForInpaint", "ExactEncodeImageMaskedError"]);
const SUMMARY = "exact_encode_summary";
const SPARKLINE = "exact_encode_sparkline";
const EVENT = "exact_encode.progress";
const COLORS = ["#4da3ff", "#ff8a3d", "#5fd18a", "#e06bd8"];
const SVG = "http://www.w3.org/2000/svg";

function fitNode(node) {
  node.setSize([node.size[0], Math.max(node.size[1], node.computeSize()[1])]);
  node.setDirtyCanvas(true, true);
}

function showSummary(node, text) {
  let widget = node.widgets?.find((w) => w.name === SUMMARY);
  if (!widget) {
    widget = ComfyWidgets.STRING(node, SUMMARY, ["STRING", { multiline: true }], app).widget;
    widget.inputEl.readOnly = true;
    widget.inputEl.classList.add("exact-encode-summary");
    widget.inputEl.style.opacity = 0.85;
    widget.serialize = false; // display only: never saved into workflows or prompts
  }
  widget.value = text;
  fitNode(node);
}

function sparkline(node) {
  let widget = node.widgets?.find((w) => w.name === SPARKLINE);
  if (widget) return widget.element;
  const el = document.createElement("div");
  el.className = "exact-encode-sparkline";
  el.style.cssText = "width:100%;height:64px;font:11px sans-serif;color:#bbb;display:flex;flex-direction:column";
  const label = document.createElement("div");
  label.className = "exact-encode-sparkline-label";
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("viewBox", "0 0 100 40");
  svg.style.cssText = "flex:1;width:100%;background:rgba(0,0,0,0.25);border-radius:4px";
  el.append(label, svg);
  el.series = [];
  widget = node.addDOMWidget(SPARKLINE, "exact_encode_sparkline", el, {
    serialize: false,
    hideOnZoom: false,
    getMinHeight: () => 64,
    getMaxHeight: () => 64,
  });
  fitNode(node);
  return el;
}

function clearSparkline(node) {
  const el = node.widgets?.find((w) => w.name === SPARKLINE)?.element;
  if (!el) return;
  el.series = [];
  el.dataset.iteration = "";
  el.dataset.points = "0";
  el.querySelector("svg").replaceChildren();
  el.querySelector(".exact-encode-sparkline-label").textContent = "";
}

function drawSparkline(el, steps) {
  const svg = el.querySelector("svg");
  const values = el.series.flat().filter((v) => v !== null && Number.isFinite(v));
  if (!values.length) return;
  let lo = Math.min(...values);
  let hi = Math.max(...values);
  if (hi - lo < 1e-6) { lo -= 0.5; hi += 0.5; }
  const lines = el.series.map((points, i) => {
    const line = document.createElementNS(SVG, "polyline");
    const xy = points
      .map((v, k) => (v === null ? null : `${((100 * k) / Math.max(steps, 1)).toFixed(2)},${(38 - (36 * (v - lo)) / (hi - lo)).toFixed(2)}`))
      .filter((p) => p !== null);
    line.setAttribute("points", xy.join(" "));
    line.setAttribute("fill", "none");
    line.setAttribute("stroke", COLORS[i % COLORS.length]);
    line.setAttribute("stroke-width", "1.5");
    line.setAttribute("vector-effect", "non-scaling-stroke");
    return line;
  });
  svg.replaceChildren(...lines);
  const first = el.series[0].find((v) => v !== null);
  const last = el.series[0].filter((v) => v !== null).at(-1);
  el.querySelector(".exact-encode-sparkline-label").textContent =
    `PSNR ${first?.toFixed(2)} → ${last?.toFixed(2)} dB · iteration ${el.dataset.iteration}/${steps}` +
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

function* allNodes(graph, seen = new Set()) {
  if (!graph || seen.has(graph)) return;
  seen.add(graph);
  for (const node of graph._nodes ?? []) {
    yield node;
    yield* allNodes(node.subgraph, seen);
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
  el.dataset.points = String(el.series[0].filter((v) => v !== null).length);
  drawSparkline(el, d.steps);
}

app.registerExtension({
  name: "exact_encode.feedback",
  setup() {
    api.addEventListener(EVENT, onProgress);
    // A new run clears the previous run's sparklines.
    api.addEventListener("execution_start", () => {
      for (const node of allNodes(app.graph)) if (node.type === "VAEExactEncode") clearSparkline(node);
    });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!SUMMARY_NODES.has(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = message?.text;
      if (text?.length) showSummary(this, Array.isArray(text) ? text.join("\n") : String(text));
    };
  },
});

// Shows VAE Exact Encode's per-image summary (PSNR before/after, gain, stop reason) on the node
// itself after each run, like the stock preview nodes show their output.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const NODE_TYPES = new Set(["VAEExactEncode"]);
const WIDGET = "exact_encode_summary";

function showSummary(node, text) {
  let widget = node.widgets?.find((w) => w.name === WIDGET);
  if (!widget) {
    widget = ComfyWidgets.STRING(node, WIDGET, ["STRING", { multiline: true }], app).widget;
    widget.inputEl.readOnly = true;
    widget.inputEl.style.opacity = 0.85;
    widget.serialize = false; // display only: never saved into workflows or prompts
  }
  widget.value = text;
  node.setSize([node.size[0], Math.max(node.size[1], node.computeSize()[1])]);
  node.setDirtyCanvas(true, true);
}

app.registerExtension({
  name: "exact_encode.summary",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODE_TYPES.has(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = message?.text;
      if (text?.length) showSummary(this, Array.isArray(text) ? text.join("\n") : String(text));
    };
  },
});

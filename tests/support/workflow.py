"""UI-format workflow JSON (what the ComfyUI frontend saves) -> API-format prompt.

Good enough for the graphs in workflows/: links become [source_id, slot], widget values are
matched to the node's widget inputs in /object_info order (required, then optional), connected
inputs consume no widget value, and "control_after_generate" seeds take one extra value.
Notes and muted/bypassed nodes are dropped. UI-only trailing values (LoadImage's "upload") are ignored.
"""
from __future__ import annotations

UI_ONLY_TYPES = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def missing_node_types(ui_workflow: dict, object_info: dict) -> list[str]:
    return sorted({n["type"] for n in ui_workflow["nodes"]
                   if n["type"] not in UI_ONLY_TYPES and n["type"] not in object_info})


def _is_widget(spec) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def to_api(ui_workflow: dict, object_info: dict, overrides: dict | None = None,
           replace: dict | None = None) -> dict:
    """`overrides` = {node_id: {input_name: value}} applied after conversion. `replace` =
    {node_type: other_class_type} swaps a node for another with the same output slots (e.g. a
    checkpoint loader for a test loader): the inputs the other type does not have are dropped,
    then `overrides` can supply its own widget values."""
    links = {link[0]: link for link in ui_workflow["links"]}
    prompt = {}
    for node in ui_workflow["nodes"]:
        if node["type"] in UI_ONLY_TYPES or node.get("mode", 0) in (2, 4):
            continue
        info = object_info[node["type"]]["input"]
        specs = {**info.get("required", {}), **info.get("optional", {})}
        connected = {}
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                _, src, src_slot, *_ = links[slot["link"]]
                connected[slot["name"]] = [str(src), src_slot]
        values = list(node.get("widgets_values") or [])
        inputs = dict(connected)
        for name, spec in specs.items():
            if name in connected or not _is_widget(spec) or not values:
                continue
            inputs[name] = values.pop(0)
            if len(spec) > 1 and isinstance(spec[1], dict) and spec[1].get("control_after_generate"):
                values.pop(0) if values else None
        class_type = node["type"]
        if replace and class_type in replace:
            class_type = replace[class_type]
            other = object_info[class_type]["input"]
            names = {**other.get("required", {}), **other.get("optional", {})}
            inputs = {k: v for k, v in inputs.items() if k in names}
        prompt[str(node["id"])] = {"class_type": class_type, "inputs": inputs}
    for node_id, changes in (overrides or {}).items():
        prompt[str(node_id)]["inputs"].update(changes)
    return prompt

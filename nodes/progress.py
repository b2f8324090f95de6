"""Progress glue shared by the nodes: ComfyUI's progress bar, cancellation and the live
per-iteration event that web/exact_encode.js draws as a sparkline."""
from __future__ import annotations

import comfy.model_management
import comfy.utils

PROGRESS_EVENT = "exact_encode.progress"  # web/exact_encode.js draws the live sparkline from it


def _finite_or_none(values) -> list:
    return [None if v != v or abs(v) == float("inf") else v for v in values]


def progress_sender(node_id):
    """Sends each iteration's per-image PSNR and residual to the browser, keyed by node id
    (a no-op outside a running server, e.g. when the node is called from a script)."""
    try:
        from comfy_execution.utils import get_executing_context
        from server import PromptServer
    except ImportError:
        return None
    context = get_executing_context()
    node_id = node_id if node_id is not None else getattr(context, "node_id", None)
    server = getattr(PromptServer, "instance", None)
    if server is None or node_id is None:
        return None
    prompt_id = getattr(context, "prompt_id", None)

    def send(k, total, info):
        server.send_sync(PROGRESS_EVENT, {
            "node": str(node_id), "prompt_id": prompt_id, "iteration": k, "steps": total,
            "psnr": _finite_or_none(info["psnr"]), "residual_db": _finite_or_none(info["residual_db"])},
            server.client_id)
    return send


def iteration_callback(total: int, offset=lambda: 0, send=None):
    """The solver's per-iteration callback: cancellation, the progress bar over `total` steps
    (`offset()` steps already done, e.g. by earlier time chunks) and the optional live event."""
    progress = comfy.utils.ProgressBar(total)

    def on_iteration(k, steps, info):
        comfy.model_management.throw_exception_if_processing_interrupted()
        # a rerun after the steps (the default's rival) extends `steps`: the bar grows with it instead of sitting full
        progress.update_absolute(offset() + k, max(total, offset() + steps))
        if send is not None:
            send(k, steps, info)
    return on_iteration

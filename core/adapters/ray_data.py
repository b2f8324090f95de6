"""`exact-encode encode --ray`: the same job on Ray Data.

paths -> `map_batches` over an actor pool; each actor is one `RayEncoder`, which loads the VAE once
and then runs `Encoder.run` on its batches, writing the per-image outputs itself (atomically, so a
retried batch replaces a file instead of duplicating or truncating it). The driver only collects
the report rows. Ray Data restarts a dead actor and retries its batch.
"""
from __future__ import annotations

import json

from .encode_job import Encoder, Settings


class RayEncoder:
    """One actor: the VAE and its codec on this actor's device, for the actor's lifetime."""

    def __init__(self, settings: Settings, out_dir: str, batch_size: int):
        self.encoder, self.out_dir, self.batch_size = Encoder(settings), out_dir, batch_size

    def __call__(self, batch: dict) -> dict:
        items = list(zip((str(p) for p in batch["path"]), (str(n) for n in batch["name"])))
        rows = self.encoder.run(items, self.out_dir, self.batch_size)
        return {"row": [json.dumps(r) for r in rows]}


def connect(address: str) -> None:
    """Join a cluster ('auto', 'ray://host:port', host:port) or start a local one ('local')."""
    import ray

    if not ray.is_initialized():
        _init(ray, address)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the command line has its own bar, with the per-image gain
    ctx.print_on_execution_start = False


def _init(ray, address: str) -> None:
    if address == "local":
        ray.init(include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)


def run_on_ray(settings: Settings, todo, out_dir, batch_size: int, on_row, address: str = "local",
               actors: int | None = None) -> None:
    import ray

    if not todo:
        return
    connect(address)
    cuda = settings.device.startswith("cuda") or (
        settings.device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
    if actors is None:
        resources = ray.cluster_resources()
        actors = max(1, int(resources.get("GPU", 0) if cuda else resources.get("CPU", 1)))
    actors = min(actors, len(todo))
    # A CUDA actor holds one GPU; a CPU actor one CPU (torch inside it uses its own threads).
    resources = {"num_gpus": 1} if cuda else {"num_cpus": 1}
    items = [{"path": path, "name": name} for path, name in todo]
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        RayEncoder, fn_constructor_kwargs={"settings": settings, "out_dir": str(out_dir), "batch_size": batch_size},
        batch_size=batch_size, concurrency=actors, **resources)
    for row in ds.iter_rows():
        on_row(json.loads(row["row"]))

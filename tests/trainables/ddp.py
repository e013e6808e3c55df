"""Two real DDP processes on CPU (gloo), without Ray: the project's loops with a session per rank.

``run_ranks(fn, tmp_path, *args)`` runs ``fn(*args)`` on 2 processes joined by a torch process group
(each makes its ``DDPSession``); each rank returns a JSON-able value, which comes back as a list in rank order.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainables import LocalSession

WORLD = 2


class DDPSession(LocalSession):
    """A rank of a gloo process group, as Ray Train's session gives a worker: its rank, the model under DDP;
    reports kept in memory, rank 0's checkpoints kept (``LocalSession``)."""

    def __init__(self, resume_from: Optional[str] = None) -> None:
        super().__init__(keep_checkpoints=True, resume_from=resume_from)
        self.world_size, self.rank = dist.get_world_size(), dist.get_rank()
        self.device = torch.device("cpu")

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return torch.nn.parallel.DistributedDataParallel(model)


def _rank(rank: int, fn: Callable, store: str, out: str, args: tuple) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        result = fn(*args)
        with open(f"{out}.{rank}", "w") as file:
            json.dump(result, file)
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable, tmp_path, *args: Any) -> list[Any]:
    """``fn(*args)`` on each of 2 ranks of a fresh process group; their return values in rank order."""
    run = uuid.uuid4().hex
    store, out = os.path.join(tmp_path, f"store-{run}"), os.path.join(tmp_path, f"out-{run}")
    mp.spawn(_rank, args=(fn, store, out, args), nprocs=WORLD, join=True)
    results = []
    for rank in range(WORLD):
        with open(f"{out}.{rank}") as file:
            results.append(json.load(file))
    return results

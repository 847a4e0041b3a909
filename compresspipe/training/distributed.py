"""Data-parallel training under PyTorch's own launcher (torchrun / torch.distributed.run).

`compresspipe run recipe.yaml --nproc 2` re-launches itself through the elastic launcher; under
`torchrun -m compresspipe run ...` the same code runs. gloo on CPU, nccl on GPU. Every rank runs the
whole pipeline (stages other than training are deterministic, so the ranks stay identical); only
training is sharded, and only rank 0 writes files and prints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast(self, value: Any) -> Any:
        """rank 0's value, on every rank."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_sum(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item())


_CURRENT = Dist()


def launched_by_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: torch.device) -> Dist:
    """Join the process group torchrun set up (no-op in a single process)."""
    global _CURRENT
    if not launched_by_torchrun():
        _CURRENT = Dist()
        return _CURRENT
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    _CURRENT = Dist(rank=dist.get_rank(), world=dist.get_world_size())
    return _CURRENT


def current() -> Dist:
    return _CURRENT


def shutdown() -> None:
    global _CURRENT
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _CURRENT = Dist()

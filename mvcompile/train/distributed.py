"""torchrun / DistributedDataParallel plumbing: gloo on CPU, nccl on GPU.

Started by ``torchrun``, each process reads RANK, WORLD_SIZE and LOCAL_RANK from the
environment; started plainly, the run is a single process and nothing here communicates.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed() -> Dist:
    """Join the process group when launched by torchrun; pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world == 1:
        return Dist(0, 1, 0, torch.device("cuda" if cuda else "cpu"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    return Dist(dist.get_rank(), dist.get_world_size(), local, device)


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(d: Dist, values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks (identity in a single process)."""
    if d.enabled:
        values = values.to(d.device)
        dist.all_reduce(values)
    return values.cpu()


def gather_objects(d: Dist, obj: object) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not d.enabled:
        return [obj]
    out: list = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def broadcast_state(d: Dist, module: torch.nn.Module, buffers_only: bool = False) -> None:
    """Copy rank 0's buffers (and parameters) to every rank.

    DDP broadcasts BatchNorm statistics at the start of each forward, so after the last step
    of an epoch they differ by rank; this makes validation and checkpoints rank-independent.
    """
    if not d.enabled:
        return
    tensors = list(module.buffers()) if buffers_only else list(module.state_dict().values())
    for t in tensors:
        dist.broadcast(t, src=0)


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()

"""Data parallel under torchrun, written once: which calibration batches this process reads (every world-th), and
sums over processes. Calibration, the selection rules and healing all shard and all-reduce through here, so a
sharded run gives what one process gives (integer or float64 sums).
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.devices import device_of
from .examples import as_batches


def _bar(batches, desc, progress):
    if not progress:
        return batches
    from ..core.progress import progress as progress_bar

    return progress_bar(batches, desc=desc, unit="batch")


def own_batches(batches, model: nn.Module, desc: str, progress: bool):
    """This process's calibration batches, on the model's device: all of them, or under torchrun every
    world-th (only those are read)."""
    data = as_batches(batches, device=device_of(model))
    rank, world = shard()
    mine = data if world == 1 else (data[i] for i in range(rank, len(data), world))
    return _bar(mine, desc, progress)


def all_reduce(tensors: dict) -> dict:
    """Sum float64 tensors over torch.distributed ranks (each rank saw every world-th batch)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return tensors
    device = collective_device()
    out = {}
    for name, t in tensors.items():
        t = t.to(device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        out[name] = t.cpu()
    return out


def sum_over_ranks(*values: float) -> tuple[float, ...]:
    """Python numbers summed over torch.distributed ranks (as they are in one process)."""
    if shard()[1] == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=collective_device())
    dist.all_reduce(t)
    return tuple(t.tolist())


def collective_device() -> torch.device:
    """The device torch.distributed's collectives take: this rank's GPU under NCCL (torchrun set it), else the CPU."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard() -> tuple[int, int]:
    """(this process's rank, the number of processes): (0, 1) unless torch.distributed runs with several."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return 0, 1

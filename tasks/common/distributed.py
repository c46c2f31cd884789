"""Data-parallel plumbing for ``torchrun``: gloo on CPU, NCCL on GPU; a no-op for a single process."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init() -> tuple[int, int, torch.device]:
    """Join the process group when launched by torchrun; returns ``(rank, world_size, device)``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over processes (a copy; the input is untouched)."""
    values = values.clone()
    if dist.is_initialized():
        dist.all_reduce(values)
    return values


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def check_same_across_ranks(values: list[int], what: str) -> None:
    """Raise if ``values`` differ between processes (min == max over ranks for every entry)."""
    if not dist.is_initialized():
        return
    local = torch.tensor(values, dtype=torch.float64)
    high, low = local.clone(), -local.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MAX)
    if not torch.equal(high, -low):
        raise RuntimeError(f"{what} differs between processes: rank {dist.get_rank()} has {values}")


def parameter_checksum(model: torch.nn.Module) -> float:
    """A float64 checksum of all parameters, for checking that data-parallel replicas stayed identical."""
    with torch.no_grad():
        return float(sum((p.double() * (i + 1)).sum() for i, p in enumerate(model.parameters())))

"""Data-parallel plumbing for ``torchrun``: gloo on CPU, NCCL on GPU; a no-op for a single process.

Every collective of the engine and the evaluators goes through this module, which hands the backend tensors on its
own device (:func:`collective_device`: the rank's GPU under NCCL, the CPU under gloo) and gives results back on the
caller's device. NCCL refuses CPU tensors, so a metric sum built on the CPU would otherwise crash at step 0 of a
multi-GPU run; here the callers need not know. Work that the main process does while the others wait for its
result (scoring an evaluation) goes through :func:`on_main`, so that a failure there ends every rank with the error.
"""

from __future__ import annotations

import contextlib
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
    global _OWN_GROUP
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        _OWN_GROUP = True
    return rank, world, device


_OWN_GROUP = False  # whether init() created the process group (then shutdown() destroys it)


def is_initialized() -> bool:
    return dist.is_initialized()


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def collective_device() -> torch.device:
    """The device the process group's backend takes tensors on: this rank's GPU for NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce(values: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """``op`` ("sum" or "max") of a tensor over processes: a copy on ``values``' device; the input is untouched."""
    out = values.detach().to(collective_device(), copy=True)
    if dist.is_initialized():
        dist.all_reduce(out, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return out.to(values.device)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over processes (a copy on its own device; the input is untouched)."""
    return all_reduce(values, "sum")


def all_gather(local: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``local`` (same shape on all ranks), in rank order, on ``local``'s device."""
    if not dist.is_initialized():
        return [local]
    sent = local.detach().to(collective_device()).contiguous()
    parts = [torch.empty_like(sent) for _ in range(world_size())]
    dist.all_gather(parts, sent)
    return [part.to(local.device) for part in parts]


def all_gather_object(obj) -> list:
    """Every rank's picklable ``obj`` (our own values only, never data read from a file), in rank order."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_object(obj) -> list | None:
    """Every rank's picklable ``obj`` in rank order on the main process (None on the others): for results that only
    the main process scores, so that no other rank holds them all (our own values only, as above)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


class PeerError(RuntimeError):
    """Raised on the other ranks when the main process failed in :func:`on_main`; the message carries its error."""


def on_main(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` run on the main process only; its result is returned on every process.

    If ``fn`` raises, every process raises: the main one its own exception (with its traceback), the others a
    :class:`PeerError` with the exception's type and message. The main process sends either its result or its error,
    so no rank is left waiting in a collective for a result that never comes (a dead peer gives gloo ranks only
    "Connection closed by peer", and a main process that fails but lingers leaves them waiting until the timeout).
    """
    if not dist.is_initialized():
        return fn(*args, **kwargs)
    sent = [None]
    if is_main():
        try:
            sent[0] = ("ok", fn(*args, **kwargs))
        except BaseException as err:  # Ctrl-C too: the other ranks must not wait for it
            with contextlib.suppress(Exception):  # a peer already gone must not hide the error itself
                dist.broadcast_object_list([("error", f"{type(err).__name__}: {err}")], src=0)
            raise
    dist.broadcast_object_list(sent, src=0)
    status, value = sent[0]
    if status == "error":
        raise PeerError(f"the main process failed: {value}")
    return value


def unwrap(net: torch.nn.Module) -> torch.nn.Module:
    """The model inside DistributedDataParallel and torch.compile wrappers."""
    while (inner := getattr(net, "module", None) or getattr(net, "_orig_mod", None)) is not None:
        net = inner
    return net


def shutdown() -> None:
    """Leave the process group if :func:`init` created it (a group the caller made is the caller's to destroy)."""
    global _OWN_GROUP
    if dist.is_initialized() and _OWN_GROUP:
        dist.destroy_process_group()
        _OWN_GROUP = False


def check_same_across_ranks(values: list[float], what: str) -> None:
    """Raise if ``values`` differ between processes (min == max over ranks for every entry)."""
    if not dist.is_initialized():
        return
    local = torch.tensor(values, dtype=torch.float64)
    high, low = all_reduce(local, "max"), -all_reduce(-local, "max")
    if not torch.equal(high, low):
        raise RuntimeError(f"{what} differs between processes: rank {dist.get_rank()} has {values}")


def parameter_checksum(model: torch.nn.Module) -> float:
    """A float64 checksum of all parameters, for checking that data-parallel replicas stayed identical."""
    with torch.no_grad():
        return float(sum((p.double() * (i + 1)).sum() for i, p in enumerate(model.parameters())))

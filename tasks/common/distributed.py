"""Data-parallel plumbing for ``torchrun``: gloo on CPU, NCCL on GPU; a no-op for a single process.

Every collective of the engine and the evaluators goes through this module, which hands the backend tensors on its
own device (:func:`collective_device`: the rank's GPU under NCCL, the CPU under gloo) and gives results back on the
caller's device. NCCL refuses CPU tensors, so a metric sum built on the CPU would otherwise crash at step 0 of a
multi-GPU run; here the callers need not know. Work that the main process does while the others wait for its
result (scoring an evaluation, writing a checkpoint) goes through :func:`on_main`, so that a failure there ends every
rank with the error, and the others wait for it on the rendezvous store rather than inside a collective: NCCL's
watchdog ends a collective after the group's timeout (10 minutes by default), and scoring full LVIS on the main
process takes longer than that. The group's timeout itself is ``FLEXIVIT_DIST_TIMEOUT_MIN`` minutes
(:data:`DEFAULT_TIMEOUT_MIN` by default), for the collectives that do wait on a slow rank (a checkpoint being read).
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import time
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_MIN = 180.0  # hours of margin over NCCL's 10 minutes; a dead peer still ends the job (torchrun)


def group_timeout() -> timedelta:
    """The process group's timeout: ``FLEXIVIT_DIST_TIMEOUT_MIN`` minutes (a positive number), else the default."""
    text = os.environ.get("FLEXIVIT_DIST_TIMEOUT_MIN", "").strip()
    if not text:
        return timedelta(minutes=DEFAULT_TIMEOUT_MIN)
    try:
        minutes = float(text)
    except ValueError:
        minutes = math.nan
    if not (math.isfinite(minutes) and minutes > 0):
        raise ValueError(f"FLEXIVIT_DIST_TIMEOUT_MIN={text!r}: give the process group's timeout in minutes (> 0)")
    return timedelta(minutes=minutes)


def choose_device() -> torch.device:
    """This process's device, made current: GPU ``LOCAL_RANK % device_count()`` when CUDA is available, else the CPU.

    The modulo serves both launches: torchrun on one node shows every process all GPUs (process k takes GPU k),
    while SLURM-style launches give each process its own ``CUDA_VISIBLE_DEVICES`` (one GPU, index 0, whatever its
    ``LOCAL_RANK``), where ``cuda:LOCAL_RANK`` would not exist.
    """
    if not torch.cuda.is_available():
        return torch.device("cpu")
    index = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def init() -> tuple[int, int, torch.device]:
    """Join the process group when launched by torchrun; returns ``(rank, world_size, device)``.

    The backend is NCCL on a GPU and gloo on the CPU; ``FLEXIVIT_DIST_BACKEND=gloo`` forces gloo (several processes
    sharing one GPU, which NCCL refuses). The group's timeout is :func:`group_timeout`.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = choose_device()
    backend = os.environ.get("FLEXIVIT_DIST_BACKEND", "").strip() or ("nccl" if device.type == "cuda" else "gloo")
    if backend not in ("nccl", "gloo") or (backend == "nccl" and device.type != "cuda"):
        raise ValueError(f"FLEXIVIT_DIST_BACKEND={backend!r}: use 'gloo', or 'nccl' where CUDA is available")
    global _OWN_GROUP
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend, timeout=group_timeout())
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
    """Wait for every process (a collective: bounded by the group's timeout)."""
    if dist.is_initialized():
        # NCCL's barrier is an all-reduce on a GPU it otherwise guesses from the rank; name this rank's own.
        nccl = dist.get_backend() == "nccl"
        dist.barrier(device_ids=[torch.cuda.current_device()] if nccl else None)


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
    :class:`PeerError` with the exception's type and message. The main process posts either its result or its error
    on the process group's store, so no rank is left waiting for a result that never comes (a dead peer gives gloo
    ranks only "Connection closed by peer", and a main process that fails but lingers leaves them waiting).

    The other ranks poll the store, holding no collective, for as long as ``fn`` takes: scoring full LVIS outlasts
    NCCL's watchdog, which would end a rank waiting in a broadcast. A main process that dies ends the wait too
    (torchrun stops the others; without it, the store's connection closes). ``fn``'s result must pickle.
    """
    if not dist.is_initialized():
        return fn(*args, **kwargs)
    store = _store()
    if store is None:  # a store this torch does not expose: the collective, bounded by the group's timeout
        return _on_main_by_broadcast(fn, *args, **kwargs)
    # The n-th call of this rank (a counter in the group's own store, so a new group starts again at 0): every rank
    # makes the same calls in the same order, so the n-th of each is the same call.
    key = f"on_main/{store.add(f'on_main/calls/{rank()}', 1)}"
    if is_main():
        try:
            value = fn(*args, **kwargs)
        except BaseException as err:  # Ctrl-C too: the other ranks must not wait for it
            with contextlib.suppress(Exception):  # a store already gone must not hide the error itself
                store.set(key, pickle.dumps(("error", f"{type(err).__name__}: {err}")))
            raise
        store.set(key, pickle.dumps(("ok", value)))
        return value
    delay = 0.001
    while not store.check([key]):  # a short sleep, not a blocking wait, so that Ctrl-C is seen
        time.sleep(delay)
        delay = min(2 * delay, 0.05)
    status, value = pickle.loads(store.get(key))
    if store.add(f"{key}/read", 1) == world_size() - 1:  # the last reader removes the result from the store
        store.delete_key(key)
        store.delete_key(f"{key}/read")
    if status == "error":
        raise PeerError(f"the main process failed: {value}")
    return value


def _store():
    """The default group's rendezvous store, under our own prefix; None where torch does not expose it."""
    try:
        store = dist.distributed_c10d._get_default_store()
    except (AttributeError, ValueError, RuntimeError):
        return None
    return dist.PrefixStore("flexivit", store)


def _on_main_by_broadcast(fn, *args, **kwargs):
    """:func:`on_main` through a broadcast (the other ranks wait in it, up to the group's timeout)."""
    sent = [None]
    if is_main():
        try:
            sent[0] = ("ok", fn(*args, **kwargs))
        except BaseException as err:
            with contextlib.suppress(Exception):
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

"""UViM stage I's vector quantiser (docs/reference.md §10; big_vision ``models/proj/uvim/vit.py``).

The dictionary is learnt without gradients, as running sums: every training step adds the batch's code counts and
the sum of the vectors assigned to each code to exponentially discounted totals (decay 0.995, no ``1 - decay``
factor, summed over processes), and a codeword is the L2-normalised ratio ``sum / count``. A code whose discounted
count falls below ``min_count`` (0.1, about 500 unused steps at 0.995) is dead: the most used code is split into it
(a copy times U(0.999, 1.001) per dimension, both halves keeping half the count and half the sum), repeated while
any count is below the threshold. The encoder gets the straight-through gradient.

A training forward never waits for the device: the statistics stay on it (read on logging steps), and whether any
code can have died is decided from the smallest count of the previous update, copied to the host behind that
update (a code's count falls by at most the factor ``decay`` per step), so the exact check and its splits run only
on the steps where a code is within one step of dying.
"""

from __future__ import annotations

import torch
from torch import nn

from tasks.common import distributed

SPLIT_PERTURBATION = 1e-3  # the copy of a split code is multiplied by U(1 - p, 1 + p) per dimension
# The float32 EMA product rounds by ~1e-7 relative; the skip decision keeps this much margin below min_count.
_FLOOR_MARGIN = 1e-4


class VectorQuantizer(nn.Module):
    """Nearest-codeword quantisation of (B, L, D) vectors with an EMA-learnt, L2-normalised dictionary.

    Args:
        dict_size: number of codewords (UViM panoptic: 4096).
        dim: codeword size.
        decay: discount of the running counts and sums per step.
        min_count: a code whose discounted count is below this is re-seeded from the most used one.
        seed: makes the split perturbations a function of (seed, number of splits so far), the same on every rank.

    ``forward(x)`` -> ``(quantised, codes)``: ``quantised`` equals the codewords in value and passes the gradient
    straight through to ``x``; in training mode (and ``update=True``) the dictionary is updated after the lookup.
    """

    def __init__(self, dict_size: int, dim: int, *, decay: float = 0.995, min_count: float = 0.1, seed: int = 0):
        super().__init__()
        self.dict_size, self.dim, self.decay, self.min_count, self.seed = dict_size, dim, decay, min_count, seed
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("sums", torch.randn(dict_size, dim, generator=generator) / dict_size**0.5)
        self.register_buffer("counts", torch.ones(dict_size))
        self.register_buffer("num_splits", torch.zeros((), dtype=torch.long))
        self._stats: torch.Tensor | None = None  # (max ratio, zeros ratio) of the last update, on the device
        # (counts tensor, its version, event): the host buffer ``_host`` holds a lower bound on the counts, valid
        # while the buffer is that tensor at that version (a checkpoint load or any other in-place write bumps it).
        self._floor: tuple | None = None
        self._host: tuple | None = None

    def __getstate__(self) -> dict:
        # The floor is host bookkeeping (an event, a pinned buffer): a copy or a pickle starts without it.
        return {**self.__dict__, "_floor": None, "_host": None}

    @property
    def last_stats(self) -> dict[str, float]:
        """``codebook_max_ratio`` (the most used code's share of the last batch) and ``codebook_zeros_ratio`` (the
        share of codes unused in it); reading them waits for the device, so read them on logging steps only."""
        if self._stats is None:
            return {}
        max_ratio, zeros_ratio = self._stats.tolist()
        return {"codebook_max_ratio": max_ratio, "codebook_zeros_ratio": zeros_ratio}

    def codewords(self) -> torch.Tensor:
        """(dict_size, dim): the L2-normalised ``sums / counts``."""
        words = self.sums / self.counts[:, None]
        return words / words.norm(dim=-1, keepdim=True)

    def lookup(self, x: torch.Tensor) -> torch.Tensor:
        """(..., dim) -> the index of the nearest codeword (squared L2) of each vector, always in float32: under
        bf16 autocast the matmul would round the distances to 3 digits and pick near-ties at random, which makes
        the codes of one map noisy (stage I's dictionary and stage II's targets alike)."""
        with torch.autocast(x.device.type, enabled=False):
            words = self.codewords().float()
            flat = x.detach().reshape(-1, self.dim).float()
            distance = flat.square().sum(-1, keepdim=True) - 2 * flat @ words.T + words.square().sum(-1)
            return distance.argmin(-1).view(x.shape[:-1])

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """Code indices (...) -> codewords (..., dim), for stage II's predicted codes."""
        return self.codewords()[codes]

    def forward(self, x: torch.Tensor, update: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[-1] != self.dim:
            raise ValueError(f"expected vectors of size {self.dim}, got shape {tuple(x.shape)}")
        codes = self.lookup(x)
        words = self.codewords()[codes].to(x.dtype)
        quantised = x + (words - x).detach()  # the codeword forward, the identity backward
        if self.training and update:
            self.update(x.detach(), codes)
        return quantised, codes

    @torch.compiler.disable  # host-side bookkeeping (the floor's copy and event): eager under torch.compile
    @torch.no_grad()
    def update(self, x: torch.Tensor, codes: torch.Tensor) -> None:
        """One EMA step from vectors ``x`` (..., dim) assigned to ``codes`` (...), summed over processes."""
        flat, index = x.reshape(-1, self.dim).to(self.sums.dtype), codes.reshape(-1)
        counts = torch.zeros_like(self.counts).index_add_(0, index, torch.ones_like(index, dtype=self.counts.dtype))
        sums = torch.zeros_like(self.sums).index_add_(0, index, flat)
        # Every rank applies the same totals, so the dictionaries stay identical without being broadcast.
        counts, sums = distributed.all_reduce_sum(counts), distributed.all_reduce_sum(sums)
        total = counts.sum().clamp(min=1)
        self._stats = torch.stack([counts.max() / total, (counts == 0).float().mean()])
        may_die = self._may_have_dead_codes()  # before the writes below, which a foreign write cannot be told from
        self.counts.mul_(self.decay).add_(counts)
        self.sums.mul_(self.decay).add_(sums)
        if may_die:
            self.reseed_dead_codes()
        self._record_floor()

    def _may_have_dead_codes(self) -> bool:
        """Before an update: False only when no count can fall below ``min_count`` in it, because the previous
        update's smallest count, decayed once (counts only grow besides the decay), stays above it. Unknown (the
        first update, a loaded or edited buffer): True, and the exact check runs."""
        if self._floor is None:
            return True
        tensor, version, event = self._floor
        if tensor is not self.counts or tensor._version != version:
            return True
        if event is not None:
            # Waits at most for the previous step's update, behind which the device has that step's backward
            # and this step's forward queued: it never runs dry, unlike a read of this update's counts.
            event.synchronize()
        floor = float(self._host[1][0])  # a numpy view of the host buffer: no tensor read
        return floor * self.decay < self.min_count * (1 + _FLOOR_MARGIN)

    def _record_floor(self) -> None:
        """Copy the smallest count to the host behind this update, without waiting for it (CUDA: into pinned memory,
        with an event; the CPU: a plain copy). Elsewhere, or without a version counter (inference tensors), nothing
        is recorded and the exact check runs at every update."""
        self._floor = None
        device = self.counts.device.type
        if device not in ("cpu", "cuda") or self.counts.is_inference():
            return
        cuda = device == "cuda"
        if self._host is None or self._host[2] != cuda:  # one buffer, reused: (tensor, its numpy view, pinned)
            buffer = torch.empty(1, dtype=self.counts.dtype, pin_memory=cuda)
            self._host = (buffer, buffer.numpy(), cuda)
        self._host[0].copy_(self.counts.min().reshape(1), non_blocking=cuda)
        event = torch.cuda.Event() if cuda else None
        if event is not None:
            event.record()
        self._floor = (self.counts, self.counts._version, event)

    @torch.no_grad()
    def reseed_dead_codes(self) -> int:
        """Split the most used code into the least used one while any count is below ``min_count``; returns how
        many splits were made."""
        made = 0
        while bool((self.counts < self.min_count).any()):
            most, least = int(self.counts.argmax()), int(self.counts.argmin())
            if self.counts[most] < 2 * self.min_count:  # halves would be dead again: no split can help
                raise RuntimeError(
                    f"cannot re-seed dead codes: the most used code's count {float(self.counts[most]):.3g} is below "
                    f"2 x min_count ({self.min_count}); the dictionary saw too few vectors"
                )
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.num_splits))
            noise = torch.empty(self.dim).uniform_(1 - SPLIT_PERTURBATION, 1 + SPLIT_PERTURBATION, generator=generator)
            self.sums[least] = self.sums[most] * noise.to(self.sums)
            self.counts[most] /= 2
            self.counts[least] = self.counts[most]
            self.sums[[most, least]] /= 2
            self.num_splits += 1
            made += 1
        return made


def code_dropout(codes: torch.Tensor, mode: str = "none", generator: torch.Generator | None = None) -> torch.Tensor:
    """UViM's code dropout for stage I training on (B, L, D) quantised codes: per example, a threshold t ~ U(0, 1)
    keeps the codes whose importance ``linspace(1, 0, L + 2)[1:-1]`` exceeds it (a prefix of the sequence:
    ``"prefix"``), or as many codes at random positions (``"random"``); the others are zeroed. ``"none"``: as is."""
    if mode == "none":
        return codes
    if mode not in ("prefix", "random"):
        raise ValueError(f"code dropout mode must be 'none', 'prefix' or 'random', got {mode!r}")
    batch, length = codes.shape[:2]
    importance = torch.linspace(1, 0, length + 2, device=codes.device)[1:-1]
    # Drawn where the generator lives (the device's own RNG without one), then copied without waiting.
    device = generator.device if generator is not None else codes.device
    threshold = torch.rand(batch, 1, generator=generator, device=device).to(codes.device, non_blocking=True)
    keep = importance[None, :] > threshold  # (B, L)
    if mode == "random":
        order = torch.rand(batch, length, generator=generator, device=device).argsort(-1)
        order = order.to(codes.device, non_blocking=True)
        keep = torch.gather(keep, 1, order)
    return codes * keep[..., None].to(codes.dtype)

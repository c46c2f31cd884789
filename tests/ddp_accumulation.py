"""Run by tests/test_engine.py under torchrun (2 processes): the engine's gradient accumulation under DDP.

Each rank takes its half of a fixed global batch and runs ``tools.train.accumulate_gradients`` with 1 and 2
micro-batches through DistributedDataParallel; rank 0 writes the largest difference to the one-process gradient of
the whole batch, per accumulation count, as JSON to the path given.
"""

import contextlib
import json
import sys

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import flexivit
from tasks.common import distributed
from tools.train import accumulate_gradients


def gradients(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def main(out: str) -> None:
    rank, world, _ = distributed.init()
    torch.manual_seed(0)  # the same initial weights on every rank
    model = flexivit.create_model(
        "flexivit_mu", depth=2, width=32, num_heads=2, base_patch_size=16, num_classes=5, head_zero_init=False
    )
    data = torch.Generator().manual_seed(1)
    images, labels = torch.randn(16, 3, 32, 32, generator=data), torch.randint(0, 5, (16,), generator=data)
    F.cross_entropy(model(images, patch_size=8), labels).backward()
    whole = gradients(model)  # one process, the whole global batch
    net = DistributedDataParallel(model)
    share = len(images) // world
    local = [images[rank * share : (rank + 1) * share], labels[rank * share : (rank + 1) * share]]
    differences = {}
    for accum in (1, 2):
        model.zero_grad(set_to_none=True)
        accumulate_gradients(
            net,
            lambda batch: (F.cross_entropy(net(batch[0], patch_size=8), batch[1]), {}),
            local,
            accum,
            autocast=contextlib.nullcontext,
        )
        differences[accum] = (gradients(model) - whole).abs().max().item()
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"differences": differences, "gradient_scale": whole.abs().max().item()}, f)
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])

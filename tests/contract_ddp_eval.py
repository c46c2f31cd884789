"""Run by tests/test_task_contract.py under torchrun (2 processes): each workdir's model evaluated at the contract's
patch sizes, the validation set split over the ranks; rank 0 writes ``{workdir: {patch: {metric: value}}}`` as JSON.
One process (:func:`evaluate_run` called directly) must give the same numbers.
"""

import json
import sys

import torch

from tasks import load_run
from tasks.common import distributed

PATCHES = [8, (8, 12)]  # tests/test_task_contract.py's


def evaluate_run(workdir: str) -> dict:
    run = load_run(workdir)
    _, _, val_set, _ = run.task.build_datasets(run.config.data)
    patches = PATCHES if run.task.flexible else run.config.eval.patch_sizes
    results = run.task.evaluate(run.model, val_set, patches, torch.device("cpu"), None, 4)
    return {str(p): {k: v for k, v in r.items() if isinstance(v, int | float)} for p, r in results.items()}


def main(out: str, workdirs: list[str]) -> None:
    distributed.init()
    results = {workdir: evaluate_run(workdir) for workdir in workdirs}
    if distributed.is_main():
        with open(out, "w") as f:
            json.dump(results, f)
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])

"""Speed of FlexiViT against timm's VisionTransformer of the same shape, per patch size (writes docs/benchmarks.md).

    python -m tools.benchmarks                                  # Ti and S, the paper's patch sizes (~10 min, 2 cores)
    python -m tools.benchmarks --models flexivit_tiny flexivit_small flexivit_base   # + B (~25 min more on 2 cores)
    python -m tools.benchmarks --compile                        # + compiled flexible training (minutes per size)
    python -m tools.benchmarks --quick --out /tmp/bench         # a tiny smoke run of every section (seconds)

A FlexiViT resizes its patch-embedding kernel and position embedding in every call; this page shows what that
costs. It runs, on every device (CPU always, fp32, ``--batch-size``; a GPU when present, bf16 autocast,
``--gpu-batch-size``; ``--precision`` sets both): the inference and training-step comparison with timm and the fixed
model per patch size (tools.benchmarks.speed), with ``--compile`` torch.compile of flexible training over changing
patch sizes (tools.benchmarks.compiled), and the Fashion-MNIST input pipeline beside the training step
(tools.benchmarks.input_pipeline); then it checks the targets and writes the report (tools.benchmarks.report).
The deployment and sampler benchmarks are their own commands (tools.benchmarks.precision, .sampler), as is the
detection evaluation's (tools.benchmarks.detection_eval).
"""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

import torch

from tools.benchmarks import common, compiled, input_pipeline, report, speed


def main(argv: list[str] | None = None) -> Path:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = common.parser(__doc__)
    speed.add_arguments(parser)
    parser.add_argument("--skip-input", action="store_true", help="skip the input-pipeline section")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile'd flexible training")
    compiled.add_arguments(parser)
    parser.add_argument("--out", default="docs", help="folder for benchmarks.md / .csv / .png")
    args = common.parse(parser, argv)
    import timm

    torch.manual_seed(0)
    load = os.getloadavg()[0]
    results = speed.run(args)
    results.update(date=datetime.datetime.now().isoformat(timespec="minutes"), timm=timm.__version__)
    results.update(compile=[], input=[], input_note=None)
    compile_summary = None
    if args.compile:
        for device_name in args.devices:
            rows, summary = compiled.bench_compile(compiled.model_name(args.models), args, torch.device(device_name))
            results["compile"] += rows
            compile_summary = compile_summary or summary
    if not args.skip_input:
        results["input"], results["input_note"] = input_pipeline.bench_input(args, torch.device(args.devices[-1]))
    results["load"] = [load, os.getloadavg()[0]]
    results["targets"] = report.targets(results["inference"], results["training"], compile_summary, args.batch_size)
    path = report.write_report(results, args, argv)
    print(f"wrote {path}", flush=True)
    return path


if __name__ == "__main__":
    main()

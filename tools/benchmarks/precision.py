"""Deployment speed: bf16 autocast against fp32 per patch size, and ONNX Runtime against eager PyTorch.

    python -m tools.benchmarks.precision --batch-size 1 --warmup 1 --repeats 3     # docs/benchmarks_deployment.md
    python -m tools.benchmarks.precision --quick --onnx-patch-sizes 8 --out /tmp/bench

Each model is fixed to each patch size (``flexivit.fix_patch_size``, the deployment model) and its pooled features
timed in fp32 and under bf16 autocast, the two taking turns, with the relative error of bf16. On CPU, at
``--onnx-patch-sizes``, the classifier exported through the task contract (``tools.lib.export.FixedSizeModel``,
then ONNX) runs in ONNX Runtime beside the same model in eager PyTorch, with the largest difference of their logits.
Writes ``--out``/benchmarks_deployment.md and .csv.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from flexivit.deploy import fix_patch_size
from tasks import get_task
from tasks.common.precision import autocast
from tools.benchmarks import common
from tools.lib.export import FixedSizeModel, export_onnx
from tools.lib.profiling import count_gflops_fn, device_description
from tools.lib.reporting import markdown_table, write_csv


def bench_precision(fixed, x: torch.Tensor, args) -> dict:
    """fp32 and bf16 autocast ms of ``fixed``'s pooled features, taking turns, and bf16's relative error."""
    device = x.device

    def pooled(dtype):
        with autocast(device, dtype):
            return fixed.forward_features(x)["pooled"].float()

    calls = {"fp32": lambda: pooled(None), "bf16": lambda: pooled(torch.bfloat16)}
    with torch.inference_mode():
        want, got = calls["fp32"](), calls["bf16"]()
        ms = common.alternate_ms(calls, device, args.warmup, args.repeats)
    batch = x.shape[0]
    return {
        "fp32 ms": ms["fp32"], "bf16 ms": ms["bf16"],
        "fp32 img/s": batch * 1e3 / ms["fp32"], "bf16 img/s": batch * 1e3 / ms["bf16"],
        "bf16 speed-up": ms["fp32"] / ms["bf16"], "bf16 rel. error": ((got - want).norm() / want.norm()).item(),
    }  # fmt: skip


def bench_onnx(model, x: torch.Tensor, args) -> dict:
    """ONNX Runtime against eager PyTorch for an exported ``model`` (CPU, fp32), and their largest logit difference."""
    import onnxruntime

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(model, path, x[:2])
        options = onnxruntime.SessionOptions()
        # ORT's threads spin-wait between calls by default, which would slow the eager calls taking turns with it.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.intra_op_num_threads = torch.get_num_threads()
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {"images": x.numpy()}
    with torch.inference_mode():
        diff = (torch.from_numpy(session.run(None, feed)[0]) - model(x)).abs().max().item()
        calls = {"eager": lambda: model(x), "onnxruntime": lambda: session.run(None, feed)}
        ms = common.alternate_ms(calls, x.device, args.warmup, args.repeats)
    batch = x.shape[0]
    return {
        "eager ms": ms["eager"], "onnxruntime ms": ms["onnxruntime"],
        "eager img/s": batch * 1e3 / ms["eager"], "onnxruntime img/s": batch * 1e3 / ms["onnxruntime"],
        "onnxruntime/eager": ms["eager"] / ms["onnxruntime"], "max abs diff": diff,
    }  # fmt: skip


def run(args) -> tuple[list[dict], list[dict], dict]:
    """Precision rows (every device, model and patch size), ONNX rows (CPU, ``--onnx-patch-sizes``), machines."""
    precision_rows, onnx_rows, machines = [], [], {}
    classification = get_task("classification")
    for device_name in args.devices:
        device = torch.device(device_name)
        machines[device.type] = device_description(device)
        for name in args.models:
            ours = common.build_ours(name, args.overrides, device).eval()
            torch.nn.init.normal_(ours.head.weight, std=0.02)  # not the zero init: the logits must differ to compare
            size = args.image_size
            x = torch.randn(common.batch_size(args, device), ours.kwargs["in_chans"], size, size, device=device)
            for patch in args.patch_sizes:
                key = {"model": common.short_name(name), "device": device.type, "patch_size": patch,
                       "grid": size // patch}  # fmt: skip
                fixed = fix_patch_size(ours, patch, size).eval()
                row = {**key, "gflops": count_gflops_fn(fixed, x[:1]), **bench_precision(fixed, x, args)}
                precision_rows.append(row)
                print(
                    f"[precision] {device.type} {key['model']}/{patch}: fp32 {row['fp32 ms']:.1f} ms, bf16 "
                    f"{row['bf16 ms']:.1f} ms (x{row['bf16 speed-up']:.2f}), rel. error {row['bf16 rel. error']:.1e}",
                    flush=True,
                )
                if device.type == "cpu" and patch in args.onnx_patch_sizes:
                    exported = FixedSizeModel(classification, ours, patch, size)
                    onnx_rows.append({**key, **bench_onnx(exported, x, args)})
                del fixed
            del ours
    return precision_rows, onnx_rows, machines


def report(precision_rows, onnx_rows, machines, args, argv) -> str:
    import onnxruntime

    lines = [
        "# Deployment speed: bf16 against fp32, ONNX Runtime against eager PyTorch",
        "",
        *(f"- {kind}: {text}" for kind, text in machines.items()),
        f"- {args.image_size} px, batch {args.batch_size} on CPU ({args.gpu_batch_size} on GPU); the model fixed to "
        "each patch size (`flexivit.fix_patch_size`), 1000-class shape, exact GELU; median of "
        f"{args.repeats} rounds, the variants called in turn; torch {torch.__version__}, "
        f"onnxruntime {onnxruntime.__version__}",
        "- bf16: `torch.autocast` (matmuls in bf16, the residual stream in fp32); rel. error: ||bf16 - fp32|| / "
        "||fp32|| of the pooled features",
        "",
        "## bf16 against fp32",
        "",
        markdown_table(precision_rows, percent=[]),
        "",
    ]
    if onnx_rows:
        lines += ["## ONNX Runtime against eager PyTorch (fp32, CPU)", "", markdown_table(onnx_rows), ""]
    lines += [f"Command: `{common.command('tools.benchmarks.precision', argv)}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Path:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = common.parser(__doc__, precision=False)  # it measures both
    parser.add_argument("--onnx-patch-sizes", nargs="+", type=int, default=[16, 8])
    parser.add_argument("--out", default="docs", help="folder of benchmarks_deployment.md / .csv")
    args = common.parse(parser, argv)
    precision_rows, onnx_rows, machines = run(args)
    text = report(precision_rows, onnx_rows, machines, args, argv)
    write_csv(precision_rows + onnx_rows, Path(args.out) / "benchmarks_deployment.csv")
    print(text, flush=True)
    return common.write_text(Path(args.out) / "benchmarks_deployment.md", text)


if __name__ == "__main__":
    main()

"""Export a trained model at one patch size: a timm state dict, an ONNX file or a ``torch.export`` program.

    python -m tools.export --workdir runs/fashion_mnist --patch-size 8 --format timm --out vit_p8.safetensors
    python -m tools.export --workdir runs/fashion_mnist --patch-size 8 --format onnx --out model_p8.onnx
    python -m tools.export --workdir runs/seg --patch-size 12 --format torch-export --out seg_p12.pt2

Every export bakes the patch size in (kernel PI-resized once, position embedding resized to the grid) and is
checked against our model on a random batch before the command returns; the maximum difference is printed.

- ``timm``: the FlexiViT as a plain timm ``VisionTransformer`` (classification: the whole model; segmentation and
  contrastive: the backbone, whose head is not a timm module), as safetensors, with ``<out>.json`` holding the
  ``timm.create_model`` arguments.
- ``onnx``: the task's image forward (classification logits, Segmenter logits at the input size with its padding,
  the contrastive image tower's L2-normalised embedding) with a dynamic batch; checked with onnxruntime.
- ``torch-export``: the same forward as a ``torch.export`` program (``.pt2``) with its example input stored inside.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import flexivit
from flexivit.files import atomic_write, atomic_write_text
from tools.arguments import non_negative_float, positive_int
from tools.eval import check_patch_sizes, open_run
from tools.lib.deployment import backbone_of
from tools.lib.export import FixedSizeModel, example_input, export_onnx, export_program, load_program

FORMATS = ("timm", "onnx", "torch-export")
TIMM_NAME = "vit_base_patch16_224"  # any timm ViT name: the exported arguments set every shape


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--workdir", required=True, help="a training workdir (classification, segmentation, contrastive)"
    )
    parser.add_argument("--config", help="a config file to use instead of the workdir's config.json")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="override config keys")
    parser.add_argument("--patch-size", type=positive_int, required=True)
    parser.add_argument("--image-size", type=positive_int, help="the deployment image size (default: the config's)")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True, help="the file to write (replaced if it exists)")
    parser.add_argument(
        "--atol", type=non_negative_float, default=1e-4, help="the largest difference the check accepts"
    )
    args = parser.parse_args(argv)
    if Path(args.out).is_dir():
        parser.error(f"--out {args.out} is a folder: give the file to write, e.g. {Path(args.out) / 'model.onnx'}")
    return args


def export_timm(backbone: flexivit.FlexiViT, patch: int, image_size: int, out: Path, atol: float) -> float:
    """Write the timm state dict and its create_model arguments; returns the largest logit difference to ours."""
    import timm
    from safetensors.torch import save_file

    state, kwargs = flexivit.to_timm(backbone, patch, image_size)
    vit = timm.create_model(TIMM_NAME, pretrained=False, **kwargs).eval()
    vit.load_state_dict(state)  # strict: every key is timm's
    example = torch.randn(
        2, backbone.kwargs["in_chans"], image_size, image_size, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        diff = (vit(example) - backbone.eval()(example, patch_size=patch)).abs().max().item()
    _check(diff, atol, "timm")
    atomic_write(out, lambda tmp: save_file({k: v.contiguous() for k, v in state.items()}, str(tmp)))
    spec = {"model_name": TIMM_NAME, "pretrained": False, **kwargs}
    atomic_write_text(out.with_suffix(".json"), json.dumps(spec, indent=2) + "\n")
    return diff


def check_onnx(path: Path, model: FixedSizeModel, batch: int = 3) -> float:
    """Largest difference between onnxruntime and torch on a batch of another size than the traced one."""
    import onnxruntime

    x = example_input(model, batch)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = [torch.from_numpy(a) for a in session.run(None, {"images": x.numpy()})]
    with torch.no_grad():
        want = _outputs(model(x))
    return max((g - w).abs().max().item() for g, w in zip(got, want, strict=True))


def check_program(path: Path, model: FixedSizeModel, batch: int = 3) -> float:
    program, example = load_program(path)
    x = example_input(model, batch)
    with torch.no_grad():
        pairs = [
            (g, w) for t in (example, x) for g, w in zip(_outputs(program.module()(t)), _outputs(model(t)), strict=True)
        ]
    return max((g - w).abs().max().item() for g, w in pairs)


def _outputs(output) -> list[torch.Tensor]:
    """A forward's tensors in order: one, or a dict's values (detection: logits, boxes, ...)."""
    return list(output.values()) if isinstance(output, dict) else [output]


def _check(diff: float, atol: float, what: str) -> None:
    if not diff <= atol:
        raise RuntimeError(f"the {what} export differs from our model by {diff:.3g} (more than {atol:g})")


def main(argv=None) -> dict:
    args = parse_args(argv)
    run = open_run(args.workdir, args.config, args.set)
    task, config, model = run.task, run.config, run.model
    size = args.image_size or config.data.image_size
    if not isinstance(size, int):
        raise SystemExit(f"tools.export takes a square image size; the config has {size} (give --image-size)")
    check_patch_sizes([args.patch_size], size, "--patch-size", task.token_grid)
    if args.format != "timm" and task.export_refusal:
        raise SystemExit(f"--format {args.format}: the {task.name} task cannot be exported: {task.export_refusal}")
    out = Path(args.out)
    if args.format == "timm":
        backbone = backbone_of(model)
        if backbone is not model:
            print(f"{task.name}: exporting the backbone only (its head is not a timm module)")
        diff = export_timm(backbone, args.patch_size, size, out, args.atol)
        print(f"wrote {out} and {out.with_suffix('.json')}: timm logits differ from ours by at most {diff:.2e}")
        return {"out": str(out), "max_abs_diff": diff}
    fixed = FixedSizeModel(task, model, args.patch_size, size)
    example = example_input(fixed, 2)
    if args.format == "onnx":
        export_onnx(fixed, out, example)
        diff = check_onnx(out, fixed)
    else:
        export_program(fixed, out, example)
        diff = check_program(out, fixed)
    _check(diff, args.atol, args.format)
    print(f"wrote {out}: outputs differ from our model by at most {diff:.2e} (batch 3, traced at batch 2)")
    return {"out": str(out), "max_abs_diff": diff}


if __name__ == "__main__":
    main()

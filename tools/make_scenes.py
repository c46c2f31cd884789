"""Write scenes composed from real Fashion-MNIST items in the dense-task formats (tasks/common/scenes.py).

    python -m tools.make_scenes --out data/scenes --num-train 2000 --num-val 200 --seed 0

Writes an ADE20k-layout semantic segmentation set (images/, annotations/, objectInfo150.txt), COCO instances,
LVIS-style and COCO panoptic annotations of the same scenes; ``--cityscapes DIR`` also writes a Cityscapes-layout
copy (label ids). Deterministic: the same seed and settings give the same files.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tasks.common.scenes import SceneSpec, write_cityscapes_style, write_scenes
from tools.arguments import float_above, int_at_least, non_negative_float, positive_int


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder (must not exist yet)")
    parser.add_argument("--num-train", type=positive_int, required=True)
    parser.add_argument("--num-val", type=positive_int, required=True)
    parser.add_argument("--seed", type=int_at_least(0), default=0)
    parser.add_argument("--size", type=positive_int, default=SceneSpec.size, help="canvas side in pixels")
    parser.add_argument("--items", type=int_at_least(0), nargs=2, default=SceneSpec.items, metavar=("MIN", "MAX"))
    parser.add_argument("--item-size", type=float_above(0.0), nargs=2, default=SceneSpec.item_size,
                        metavar=("MIN", "MAX"), help="item side as a fraction of the canvas, at most 1")  # fmt: skip
    parser.add_argument(
        "--class-weights", type=non_negative_float, nargs=10, help="thing-class sampling weights (a long tail)"
    )
    parser.add_argument("--fashion-mnist-root", help="folder of the Fashion-MNIST IDX files (default: Debian's)")
    parser.add_argument("--cityscapes", help="also write a Cityscapes-layout copy into this folder")
    args = parser.parse_args(argv)
    # Ranges: each bound is checked by its type, their order and the fractions' upper bound here.
    if args.items[0] > args.items[1]:
        parser.error(f"--items {args.items[0]} {args.items[1]}: MIN is larger than MAX")
    if not args.item_size[0] <= args.item_size[1] <= 1:
        parser.error(f"--item-size {args.item_size[0]:g} {args.item_size[1]:g}: expected MIN <= MAX <= 1")
    if args.class_weights and not sum(args.class_weights) > 0:
        parser.error("--class-weights: at least one weight must be positive")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if Path(args.out).exists():
        raise SystemExit(f"{args.out} exists: remove it first or choose another --out")
    spec = SceneSpec(
        size=args.size,
        items=tuple(args.items),
        item_size=tuple(args.item_size),
        class_weights=tuple(args.class_weights) if args.class_weights else None,
    )
    start = time.perf_counter()
    summary = write_scenes(
        args.out,
        num_train=args.num_train,
        num_val=args.num_val,
        seed=args.seed,
        spec=spec,
        fashion_mnist_root=args.fashion_mnist_root,
    )
    if args.cityscapes:
        write_cityscapes_style(args.out, args.cityscapes)
    print(json.dumps(summary["train_images_per_thing"]))
    print(f"wrote {args.num_train} + {args.num_val} scenes to {args.out} in {time.perf_counter() - start:.1f} s")
    return summary


if __name__ == "__main__":
    main()

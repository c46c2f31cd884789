"""The paper's analyses of one set of weights across patch sizes, for any task's backbone (docs/analysis.md).

    python -m tools.analyze --workdir runs/fashion_mnist --what cka similarity attention ensemble
    python -m tools.analyze --workdir runs/seg --what cka attention --patch-sizes 16 8 4 --images a.png b.png

- ``cka``: minibatch linear CKA between every block at the first patch size and every block at each other size,
  for the class token and for the token maps area-averaged to the coarsest grid (Sec. 3.6 / Fig. 6), as heatmaps.
- ``attention``: the class token's relevance over the image at each patch size (Chefer et al., the paper's [9];
  Fig. 13 top): with a classification head for the predicted class, else attention rollout.
- ``similarity``: cosine similarity of the centre token at the first patch size to every token at each other size
  (Fig. 13 bottom), averaged over the images.
- ``ensemble``: the same weights at several patch sizes, softmax averaged, against single sizes at equal total
  GFLOPs (Appendix J); classification only.

Writes PNGs, CSVs and ``analysis.md`` into ``<workdir>/analysis`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from flexivit import analysis
from flexivit.files import atomic_write_text
from tasks.common.images import ImageError, open_image
from tools.arguments import int_at_least, positive_int
from tools.eval import check_patch_sizes, open_run
from tools.lib.deployment import backbone_of
from tools.lib.profiling import count_gflops_fn
from tools.lib.reporting import markdown_table, write_csv

WHAT = ("cka", "attention", "similarity", "ensemble")
CKA_MIN_BATCH = 4  # the unbiased HSIC estimator of minibatch CKA needs 4 examples per batch (flexivit.analysis)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="a training workdir of any task")
    parser.add_argument("--config", help="a config file to use instead of the workdir's config.json")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="override config keys")
    parser.add_argument("--what", nargs="+", choices=WHAT, default=list(WHAT))
    parser.add_argument("--patch-sizes", nargs="+", type=positive_int, help="default: the config's eval.patch_sizes")
    parser.add_argument("--images", nargs="+", help="image files for attention (default: validation images)")
    cka_minimum = int_at_least(CKA_MIN_BATCH, f"minibatch CKA needs batches of at least {CKA_MIN_BATCH} images")
    parser.add_argument("--num-images", type=positive_int, default=512, help="validation images for CKA and similarity")
    parser.add_argument("--batch", type=cka_minimum, default=64, help=f"CKA minibatch size (at least {CKA_MIN_BATCH})")
    parser.add_argument("--block", type=int, default=-1, help="similarity: the block (-1: after the final norm)")
    parser.add_argument("--max-ensemble", type=positive_int, default=3, help="ensembles of up to this many sizes")
    parser.add_argument("--out", help="output folder (default: <workdir>/analysis)")
    args = parser.parse_args(argv)
    if "cka" in args.what and args.num_images < CKA_MIN_BATCH:
        parser.error(f"--num-images {args.num_images}: minibatch CKA needs at least {CKA_MIN_BATCH} images")
    return args


# ---------------------------------------------------------------------------------------------- inputs


def _image_dataset(val_set):
    # The contrastive task evaluates on a bundle (zero-shot set, retrieval set): take its images.
    for name in ("zeroshot", "retrieval"):
        if getattr(val_set, name, None) is not None:
            return getattr(val_set, name)
    return val_set


def validation_images(val_set, n: int, image_size: int) -> torch.Tensor:
    """The first ``n`` validation images (their eval transform applied), resized to ``image_size`` squares."""
    dataset = _image_dataset(val_set)
    images = []
    for i in range(min(n, len(dataset))):
        item = dataset[i]
        image = item[0] if isinstance(item, tuple | list) else item
        if tuple(image.shape[-2:]) != (image_size, image_size):
            image = F.interpolate(image[None], size=(image_size, image_size), mode="bilinear", antialias=True)[0]
        images.append(image)
    return torch.stack(images)


def file_images(paths, config) -> tuple[torch.Tensor, list[str]]:
    from tasks.common.transforms import data_eval_transform

    transform = data_eval_transform(config.data, crop_ratio=1.0)  # the whole image, squashed to a square
    try:
        images = [transform(open_image(p)) for p in paths]
    except ImageError as e:
        raise SystemExit(f"--images: {e}") from e
    return torch.stack(images), [Path(p).name for p in paths]


def _display(image: torch.Tensor) -> np.ndarray:
    x = image.permute(1, 2, 0).float()
    x = (x - x.min()) / (x.max() - x.min()).clamp(min=1e-8)
    return x.numpy()


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    _plt().close(fig)
    tmp.replace(path)
    return path


# ---------------------------------------------------------------------------------------------- analyses


@torch.no_grad()
def cka_matrices(model, images: torch.Tensor, p: int, q: int, batch: int) -> dict:
    """``{"map": (depth, depth), "cls": ...}``: minibatch CKA of block i at ``p`` against block j at ``q``."""
    size = images.shape[-1]
    common = min(size // p, size // q)
    depth = model.depth
    kinds = ["map"] + (["cls"] if model.cls_token is not None else [])
    acc = {kind: [[analysis.MinibatchCKA() for _ in range(depth)] for _ in range(depth)] for kind in kinds}
    for start in range(0, images.shape[0] - 3, batch):  # every minibatch has >= 4 images
        x = images[start : start + batch]
        if x.shape[0] < 4:
            break
        fp, fq = analysis.layer_features(model, x, p, common), analysis.layer_features(model, x, q, common)
        for kind in kinds:
            for i, j in itertools.product(range(depth), range(depth)):
                acc[kind][i][j].update(fp[kind][i], fq[kind][j])
    return {kind: np.array([[c.value() for c in row] for row in acc[kind]]) for kind in kinds}


def run_cka(model, images, patch_sizes, batch, out: Path) -> list[str]:
    ref, lines, rows = patch_sizes[0], [], []
    plt = _plt()
    for q in patch_sizes[1:]:
        mats = cka_matrices(model, images, ref, q, batch)
        fig, axes = plt.subplots(1, len(mats), figsize=(4.2 * len(mats), 3.8), squeeze=False)
        for ax, (kind, mat) in zip(axes[0], mats.items(), strict=True):
            im = ax.imshow(mat, vmin=0, vmax=1, cmap="magma", origin="lower")
            ax.set_title(f"{'token map' if kind == 'map' else 'class token'}: p{ref} vs p{q}")
            ax.set_xticks(range(mat.shape[1]))
            ax.set_yticks(range(mat.shape[0]))
            ax.set_xlabel(f"block at p{q}")
            ax.set_ylabel(f"block at p{ref}")
            fig.colorbar(im, ax=ax, fraction=0.046)
            for i in range(mat.shape[0]):
                rows.append({"p": ref, "q": q, "kind": kind, "block": i, "cka same block": float(mat[i, i])})
        fig.tight_layout()
        _save(fig, out / f"cka_p{ref}_vs_p{q}.png")
        lines.append(f"![cka p{ref} vs p{q}](cka_p{ref}_vs_p{q}.png)")
    write_csv(rows, out / "cka.csv")
    table = [
        {"q": q, "kind": kind, **{f"block {r['block']}": r["cka same block"] for r in rows
                                  if r["q"] == q and r["kind"] == kind}}
        for q in patch_sizes[1:] for kind in ("map", "cls") if any(r["q"] == q and r["kind"] == kind for r in rows)
    ]  # fmt: skip
    return [f"## CKA against patch {ref} (same block; {images.shape[0]} images)", "", markdown_table(table), "", *lines]


def run_attention(model, images, names, patch_sizes, out: Path) -> list[str]:
    plt = _plt()
    use_head = model.head is not None
    n = min(len(images), 4)
    fig, axes = plt.subplots(n, len(patch_sizes) + 1, figsize=(2.2 * (len(patch_sizes) + 1), 2.3 * n), squeeze=False)
    for row in range(n):
        axes[row][0].imshow(_display(images[row]))
        axes[row][0].set_title(names[row][:18], fontsize=8)
        for col, p in enumerate(patch_sizes, start=1):
            x = images[row : row + 1]
            rel = analysis.attention_relevance(model, x, p) if use_head else analysis.attention_rollout(model, x, p)
            up = F.interpolate(rel[None], size=images.shape[-2:], mode="nearest")[0, 0]
            axes[row][col].imshow(_display(images[row]))
            axes[row][col].imshow(up.numpy(), cmap="jet", alpha=0.5)
            axes[row][col].set_title(f"p{p}", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    _save(fig, out / "attention.png")
    method = "relevance for the predicted class (Chefer et al.)" if use_head else "attention rollout (no head)"
    return ["## Attention of the class token", "", f"{method}; each map sums to 1.", "", "![attention](attention.png)"]


@torch.no_grad()
def run_similarity(model, images, patch_sizes, block: int, out: Path) -> list[str]:
    plt = _plt()
    seed = patch_sizes[0]
    fig, axes = plt.subplots(1, len(patch_sizes), figsize=(2.6 * len(patch_sizes), 2.6), squeeze=False)
    rows = []
    for ax, q in zip(axes[0], patch_sizes, strict=True):
        sim = analysis.token_similarity(model, images, seed, q, block)
        im = ax.imshow(sim.numpy(), vmin=-1, vmax=1, cmap="RdBu_r")
        ax.set_title(f"p{q} ({sim.shape[0]}x{sim.shape[1]})", fontsize=9)
        ax.axis("off")
        centre = sim[sim.shape[0] // 2 - 1 : sim.shape[0] // 2 + 1, sim.shape[1] // 2 - 1 : sim.shape[1] // 2 + 1]
        rows.append({"patch_size": q, "max": float(sim.max()), "centre 2x2 mean": float(centre.mean()),
                     "mean": float(sim.mean())})  # fmt: skip
    fig.colorbar(im, ax=axes[0].tolist(), fraction=0.02)
    _save(fig, out / "similarity.png")
    where = "after the final norm" if block == -1 else f"of block {block}"
    return [f"## Token similarity to the centre token at patch {seed} ({where}, {images.shape[0]} images)", "",
            markdown_table(rows), "", "![similarity](similarity.png)"]  # fmt: skip


@torch.no_grad()
def ensemble_rows(model, val_set, patch_sizes, max_size: int, batch: int = 256) -> list[dict]:
    """Accuracy of every single patch size and every ensemble of up to ``max_size`` sizes, with GFLOPs per image."""
    loader = torch.utils.data.DataLoader(val_set, batch_size=batch)
    combos = [c for k in range(1, max_size + 1) for c in itertools.combinations(patch_sizes, k)]
    correct = dict.fromkeys(combos, 0)
    total = 0
    for images, labels in loader:
        probs = {p: model(images, patch_size=p).float().softmax(-1) for p in patch_sizes}
        for combo in combos:
            mean = torch.stack([probs[p] for p in combo]).mean(0)
            correct[combo] += int((mean.argmax(-1) == labels).sum())
        total += len(labels)
    example = next(iter(loader))[0][:1]
    gflops = {p: count_gflops_fn(lambda x, p=p: model(x, patch_size=p), example) for p in patch_sizes}
    return [{"patch sizes": "+".join(map(str, c)), "members": len(c), "gflops": sum(gflops[p] for p in c),
             "accuracy": correct[c] / total} for c in combos]  # fmt: skip


def run_ensemble(model, val_set, patch_sizes, max_size: int, out: Path) -> list[str]:
    rows = ensemble_rows(model, val_set, patch_sizes, max_size)
    singles = [r for r in rows if r["members"] == 1]
    for row in rows:
        # The best single size that costs no more than this ensemble: the paper's equal-compute comparison.
        affordable = [s for s in singles if s["gflops"] <= row["gflops"] * (1 + 1e-9)]
        best = max(affordable, key=lambda s: s["accuracy"])
        row["best single within its GFLOPs"] = best["patch sizes"]
        row["its accuracy"] = best["accuracy"]
        row["ensemble - single"] = row["accuracy"] - best["accuracy"]
    write_csv(rows, out / "ensemble.csv")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.2, 4.2))
    for k, marker in zip(range(1, max_size + 1), "os^DvP", strict=False):
        group = [r for r in rows if r["members"] == k]
        ax.scatter([r["gflops"] for r in group], [100 * r["accuracy"] for r in group], marker=marker,
                   label="single patch size" if k == 1 else f"ensembles of {k}", zorder=3 if k == 1 else 2)  # fmt: skip
    ordered = sorted(singles, key=lambda r: r["gflops"])
    ax.plot([r["gflops"] for r in ordered], [100 * r["accuracy"] for r in ordered], "-", color="C0")
    for r in singles:
        ax.annotate(
            f"p{r['patch sizes']}", (r["gflops"], 100 * r["accuracy"]), textcoords="offset points", xytext=(3, 3)
        )
    ax.set_xscale("log")
    ax.set_xlabel("GFLOPs per image (all members)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("multi-size ensembles vs one size (Appendix J)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, out / "ensemble.png")
    wins = sum(r["ensemble - single"] > 0 for r in rows if r["members"] > 1)
    count = sum(r["members"] > 1 for r in rows)
    return ["## Multi-size ensembles (softmax averaged)", "",
            f"{wins} of {count} ensembles beat the best single size that costs no more.", "",
            markdown_table(rows, percent=["accuracy", "its accuracy", "ensemble - single"]), "",
            "![ensemble](ensemble.png)"]  # fmt: skip


def main(argv=None) -> Path:
    args = parse_args(argv)
    torch.manual_seed(0)
    run = open_run(args.workdir, args.config, args.set)
    config = run.config
    size = config.data.image_size
    # The analyses run the backbone itself, which drops the border the patches do not tile (no task padding).
    given = "--patch-sizes" if args.patch_sizes else "the config's eval.patch_sizes"
    patch_sizes = check_patch_sizes(args.patch_sizes or config.eval.patch_sizes, size, given)
    if "cka" in args.what and len(patch_sizes) < 2:
        raise SystemExit(f"--what cka compares patch sizes: give at least two, not {patch_sizes}")
    model = backbone_of(run.model).eval()
    if not -1 <= args.block < model.depth:
        raise SystemExit(f"--block {args.block}: the model has blocks 0..{model.depth - 1} (-1: after the final norm)")
    out = Path(args.out) if args.out else Path(args.workdir) / "analysis"
    sections = [f"# Analysis of {Path(args.workdir).name} ({config.task}, patch sizes {patch_sizes})", ""]
    needs_val = {"cka", "similarity", "ensemble"} & set(args.what) or ("attention" in args.what and not args.images)
    if "ensemble" in args.what and not model.num_classes:
        raise SystemExit(f"--what ensemble averages class probabilities: the {config.task} backbone has no class head")
    val_set = run.task.build_datasets(config.data)[2] if needs_val else None  # the images analysed come from it
    images = validation_images(val_set, args.num_images, size) if needs_val else None
    if "cka" in args.what and len(images) < CKA_MIN_BATCH:
        raise SystemExit(f"minibatch CKA needs at least {CKA_MIN_BATCH} images; the validation set has {len(images)}")
    for what in args.what:
        print(f"analysis: {what} ...", flush=True)
        if what == "cka":
            sections += run_cka(model, images, patch_sizes, args.batch, out)
        elif what == "attention":
            if args.images:
                shown, names = file_images(args.images, config)
            else:
                shown, names = images[:4], [f"validation image {i}" for i in range(4)]
            sections += run_attention(model, shown, names, patch_sizes, out)
        elif what == "similarity":
            sections += run_similarity(model, images[: args.num_images], patch_sizes, args.block, out)
        elif what == "ensemble":
            sections += run_ensemble(model, val_set, patch_sizes, args.max_ensemble, out)
        sections.append("")
    atomic_write_text(out / "analysis.md", "\n".join(sections) + "\n")
    print(f"wrote {out / 'analysis.md'}")
    return out / "analysis.md"


if __name__ == "__main__":
    main()

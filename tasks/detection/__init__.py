"""Open-vocabulary detection: OWL-ViT heads on a FlexiViT image-text model, LVIS / COCO AP at every patch size.

The paper transfers FlexiViT to OWL-ViT (Sec. 4) and trains it flexified, one random patch size per step (Sec. 5.3).
Its face for the engine and the tools is ``TASK`` (tasks/__init__.py's contract): ``build_datasets``, ``build_model``,
``make_loss``, ``evaluate``, ``load_model`` (from the checkpoint alone: the prompts' class names and templates are
constructor arguments), ``predict`` (free-text queries on a user's images), ``image_forward`` (exported at one patch
size with the queries as constants) and ``collate``; no engine feature (consistency, distillation, mixup). Fixed and
flexified training differ only in the engine's sampler.

    model.py       box bias (from the current grid), box / class / objectness heads, OwlViT, prompt templates
    losses.py      Hungarian matching, sigmoid focal loss, L1 + GIoU box losses, per-image / global normalisation
    data.py        COCO / LVIS / labelme readers, rare-class removal
    queries.py     federated query sets: positives, verified negatives, frequency-weighted random negatives
    transforms.py  flip, random crop, resize-with-pad, mosaics on tv_tensors.BoundingBoxes; collate
    evaluation.py  top-300 detections, streamed results, LVISEval / COCOeval wrappers, class-wise NMS
    inference.py   predict on user images: eval preprocessing, threshold + class-wise NMS, boxes drawn with labels
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

import flexivit
from tasks import Task
from tasks.common import distributed
from tasks.common.loader import JointTransform
from tasks.common.precision import autocast
from tasks.common.scenes import ensure_generated
from tasks.common.train_state import load_weights, resolve_checkpoint
from tasks.common.transforms import as_value_range
from tasks.contrastive.model import build_text_tower

from . import data as det_data
from .evaluation import (
    COCO_KEYS,
    LVIS_KEYS,
    ResultsWriter,
    classwise_nms,
    coco_evaluate,
    lvis_evaluate,
    to_pixel_xywh,
    top_k_detections,
)
from .inference import PREDICT_OPTIONS, predict
from .losses import detection_loss
from .model import OwlViT, prompt_templates
from .queries import frequency_weights
from .transforms import EvalTransform, TrainTransform, collate, collate_eval

__all__ = [
    "COCO_KEYS",
    "LVIS_KEYS",
    "EvalSet",
    "EvalTransform",
    "OwlViT",
    "PREDICT_OPTIONS",
    "ResultsWriter",
    "TASK",
    "TrainTransform",
    "build_datasets",
    "build_model",
    "classwise_nms",
    "coco_evaluate",
    "collate",
    "collate_eval",
    "detection_loss",
    "evaluate",
    "image_forward",
    "load_model",
    "lvis_evaluate",
    "make_loss",
    "predict",
    "to_pixel_xywh",
    "top_k_detections",
]


@dataclass
class EvalSet:
    """What :func:`evaluate` needs: the images (with the eval transform), the ground truth and the prompts."""

    images: det_data.DetectionDataset
    gt_json: Path  # the evaluation ground truth (with the rare classes marked 'r' where configured)
    format: str  # lvis | coco
    classnames: list[str]
    templates: list[str]
    max_dets: int = 300
    results_dir: Path | None = None  # keep results_p{16 | 8x16}.rank{r}.json there (a temporary folder otherwise)

    def __len__(self) -> int:
        return len(self.images)


def _read(data, split: str) -> det_data.DetectionDataset:
    json_path, images = (data.train_json, data.train_images) if split == "train" else (data.val_json, data.val_images)
    if json_path is None or images is None:
        raise ValueError(f"data.{split}_json and data.{split}_images must be set (got {json_path!r}, {images!r})")
    if data.format == "lvis":
        return det_data.read_lvis(json_path, images, merge_iou=data.merge_iou)
    if data.format == "coco":
        return det_data.read_coco(json_path, images)
    raise ValueError(f"data.format must be 'lvis' or 'coco', got {data.format!r}")


def _rare_gt(val_json: str, rare: Sequence[str]) -> Path:
    """A copy of the LVIS ground truth with ``rare`` marked 'r', cached by (file, mtime, names) in the temp folder."""
    source = Path(val_json)
    key = f"{source.resolve()}|{source.stat().st_mtime_ns}|{sorted(rare)}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    out = Path(tempfile.gettempdir()) / "flexivit-detection" / f"{source.stem}.rare-{digest}.json"
    if not out.exists():
        det_data.mark_rare(source, out, rare)
    return out


def build_datasets(data, distill=None) -> tuple:
    """``(train set, joint train transform, EvalSet, info)``; ``info`` = ``{"classnames": the prompts' names,
    "train_templates": [...]}``, plain lists of strings (saved in every checkpoint). ``distill`` is unused: the task
    has no distillation, which the engine refuses by name (``TASK.engine_features``).

    Rare classes (``data.rare_classes``, else the JSON's 'r' categories) are removed from training entirely and
    never enter a query set, so APr is zero-shot (docs/reference.md §8).
    """
    ensure_generated("ade20k", data.root, data.generate)  # every annotation format is written with the scenes
    train = _read(data, "train")
    if data.rare_classes is not None:
        rare = list(data.rare_classes)
    else:
        rare = [n for n, f in zip(train.classes, train.frequency or [], strict=False) if f == "r"]
    train = det_data.remove_classes(train, rare, drop_images=data.drop_rare_images) if rare else train
    value_range = as_value_range(data.value_range)
    crop_area = tuple(data.crop_area) if data.crop_area and tuple(data.crop_area) != (1.0, 1.0) else None
    train_tf = TrainTransform(
        data.image_size,
        dataset=train,
        num_queries=data.num_queries,
        class_weights=frequency_weights(train),
        hflip=data.hflip,
        crop_area=crop_area,
        crop_aspect=tuple(data.crop_aspect),
        min_box_fraction=data.min_box_fraction,
        pad_value=data.pad_value,
        mosaic_probs=data.mosaic_probs,
        value_range=value_range,
    )
    val = _read(data, "val").with_transform(EvalTransform(data.image_size, value_range))
    classnames = list(data.classnames) if data.classnames else list(val.classes)
    if len(classnames) != len(val.classes):
        raise ValueError(
            f"data.classnames has {len(classnames)} names for {len(val.classes)} categories of {val.json_path}"
        )
    if list(train.classes) != list(val.classes):
        raise ValueError(f"{data.train_json} and {data.val_json} have different categories")
    if data.train_examples:
        train = train.take(data.train_examples)
        train_tf.dataset = train  # mosaics draw from the same subset
    if data.val_examples:
        val = val.take(data.val_examples)  # scored on these images only (LVISEval's / COCOeval's image ids)
    gt = Path(data.val_json)
    if data.format == "lvis" and data.rare_classes is not None:
        gt = _rare_gt(data.val_json, rare)
    val_set = EvalSet(
        images=val,
        gt_json=gt,
        format=data.format,
        classnames=classnames,
        templates=prompt_templates(data.eval_templates),
    )
    info = {"classnames": classnames, "train_templates": prompt_templates(data.train_templates)}
    return train, JointTransform(train_tf), val_set, info


def build_model(model_cfg, info=None) -> OwlViT:
    """OWL-ViT from the config's towers; ``model.init`` fills them from a contrastive workdir / checkpoint (both
    towers and the text projection) or a FlexiViT file (the image tower, flexivit.create_model's rules), and
    ``model.text_init`` the text tower from a contrastive checkpoint. ``info`` gives the prompts' class names."""
    init = resolve_checkpoint(model_cfg.init) if model_cfg.init else None
    init_state = _contrastive_state(init) if init else None
    pretrained = init if init and init_state is None else None  # a FlexiViT file: create_model loads it
    image = flexivit.create_model(
        model_cfg.name, pretrained=pretrained, **{**(model_cfg.overrides or {}), "num_classes": 0}
    )
    text = build_text_tower(**model_cfg.text)
    embed_dim = model_cfg.embed_dim or image.width
    text_proj = torch.nn.Linear(text.width, embed_dim, bias=False) if model_cfg.text_proj else torch.nn.Identity()
    info = info or {}
    # The prompts' class names and the training templates are constructor arguments, so model.kwargs (hence every
    # checkpoint) carries them: the loss and image_forward see only the model, and load_model only the file.
    model = OwlViT(
        image,
        text,
        text_proj,
        embed_dim,
        objectness=model_cfg.objectness,
        query_names=info.get("classnames", ()),
        train_templates=info.get("train_templates"),
    )
    if init_state is not None:
        _load_towers(model, init_state, init, ("image.", "text.", "text_proj."))
    if model_cfg.text_init:
        source = resolve_checkpoint(model_cfg.text_init)
        state = _contrastive_state(source)
        if state is None:
            raise ValueError(f"model.text_init {source} is not a contrastive checkpoint (no text tower in it)")
        _load_towers(model, state, source, ("text.", "text_proj."))
    return model


def _contrastive_state(path: str) -> dict | None:
    """The state dict of a contrastive checkpoint (one with a text tower), or None for any other weights file."""
    if not Path(path).is_file() or Path(path).suffix not in (".pt", ".pth"):
        return None
    state, meta = flexivit.read_checkpoint(path)
    kwargs = meta.get("model_kwargs") or {}
    return state if "text" in kwargs and "image" in kwargs else None


def _load_towers(model: OwlViT, state: dict, source: str, prefixes: Sequence[str]) -> None:
    """Copy the ``prefixes`` parts of ``state`` into ``model``; every tensor of those parts must be there and fit."""
    own = {k: v for k, v in model.state_dict().items() if k.startswith(tuple(prefixes))}
    missing = sorted(set(own) - set(state))
    wrong = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or wrong:
        raise flexivit.CheckpointError(
            f"{source} does not fit the configured towers (model.name / overrides / text / embed_dim must match the "
            f"contrastive run): missing {missing[:8]}, shape mismatches {wrong[:8]}"
        )
    model.load_state_dict({k: state[k] for k in own}, strict=False)


def load_model(path: str | Path) -> OwlViT:
    """Rebuild an :class:`OwlViT` from a checkpoint the engine wrote (a file or a workdir), from the file alone: the
    weights and ``model_kwargs``, which hold the prompts' class names and training templates too."""
    path = resolve_checkpoint(path)
    state, meta = flexivit.read_checkpoint(path)
    kwargs = meta.get("model_kwargs") or {}
    if "objectness" not in kwargs:
        raise flexivit.CheckpointError(f"{path} is not a detection checkpoint (its model_kwargs have no 'objectness')")
    if not kwargs.get("query_names"):
        warnings.warn(
            f"{path} stores no query_names (a checkpoint from before they were saved): the loss needs them and "
            "image_forward queries 'object'; rebuild with build_model(model_cfg, info) and load the state into it",
            stacklevel=2,
        )
    model = OwlViT.from_kwargs(kwargs)
    return load_weights(model, state, path)


def make_loss(config, info, teacher=None):
    """``loss(net, batch, patch_size, step) -> (loss, terms)``: OWL-ViT's matched focal + L1 + GIoU loss of one
    (micro-)batch at ``patch_size``.

    The loss has no settings (OWL-ViT's weights, alpha and gamma) and the prompts' class names and templates are the
    model's own (``model.kwargs``, the same ``info`` built it), so nothing is read from ``config`` or ``info``; there
    is no teacher (``engine_features`` is empty: the engine refuses ``distill``). Each class of the batch's query
    sets is prompted with one template drawn at random for the step (the global RNG, which the engine seeds from
    ``(seed, step, rank)``), as OWL-ViT trains (docs/reference.md §8).
    """
    del config, info, teacher

    def loss(net, batch, patch_size, step: int) -> tuple[torch.Tensor, dict]:
        images, boxes, box_valid, labels, queries, query_valid = batch
        # Only the prompts and the tokenizer are read from the model; the forward goes through the (DDP) wrapper.
        model = distributed.unwrap(net)
        names, templates = model.query_names, model.train_templates
        if not names:
            raise ValueError(
                "the model has no query_names (the class names its prompts name): build it with "
                "build_model(model_cfg, info) from the task's datasets, or load a checkpoint that stores them"
            )
        # The prompts are text, so the query ids go to the host: one copy of both (ids, valid) tensors.
        host_queries, host_valid = torch.stack([queries, query_valid.to(queries.dtype)]).cpu()
        classes = torch.unique(host_queries[host_valid.bool()])  # sorted class indices of the valid query slots
        picks = torch.randint(len(templates), (len(classes),)).tolist()
        texts = [templates[t].format(names[c]) for t, c in zip(picks, classes.tolist(), strict=True)]
        if not texts:  # no image of the batch has a valid query: a degenerate batch, but still a graph for DDP
            texts, classes = [names[0]], torch.zeros(1, dtype=torch.long)
        # (K, L) with K (and an HF tower's L) marked dynamic: one compiled graph per patch size (model.tokenize).
        tokens = model.tokenize(texts, images.device)
        classes = classes.to(queries.device, non_blocking=True)
        index = torch.searchsorted(classes, queries.clamp(min=0)).clamp(max=len(texts) - 1)
        out = net(images, query_valid=query_valid, patch_size=patch_size, query_tokens=tokens, query_index=index)
        return detection_loss(
            out["logits"], out["boxes"], boxes, box_valid, labels, query_valid, objectness=out.get("objectness")
        )

    return loss


@torch.no_grad()
@flexivit.in_eval_mode
def evaluate(
    model: OwlViT, val_set: EvalSet, patch_sizes: Sequence, device: torch.device, autocast_dtype=None, batch_size=8
) -> dict:
    """``{patch: {"AP", "AP50", "AP75", "APs", "APm", "APl", ["APr", "APc", "APf"]}}`` (fractions) over ``val_set``,
    without the ones the ground truth leaves undefined (an area range or frequency group without boxes).

    Every class is queried, its prompts' embeddings averaged over ``val_set.templates`` (the template-averaged
    logits, docs/reference.md §8); the top ``max_dets`` (box, class) pairs per image are streamed to a results JSON
    (never all images' logits in memory) and scored by LVISEval (format "lvis") or COCOeval ("coco"). Each rank
    predicts every world-th image; the main process gathers the results and scores them.
    """
    world, rank = distributed.world_size(), distributed.rank()
    images = val_set.images
    loader = DataLoader(Subset(images, range(rank, len(images), world)), batch_size=batch_size, collate_fn=collate_eval)
    queries = model.embed_prompts(val_set.classnames, val_set.templates, device)  # (C, E)
    category_ids = torch.as_tensor(images.category_ids)
    image_ids = [r.image_id for r in images.records]
    results = {}
    with tempfile.TemporaryDirectory(prefix="flexivit-detection-") as tmp:
        out_dir = Path(val_set.results_dir or tmp)
        for patch in patch_sizes:
            path = out_dir / f"results_p{flexivit.patch_sizes.patch_size_name(patch)}.rank{rank}.json"
            with ResultsWriter(path) as writer:
                for batch_images, targets in loader:
                    with autocast(device, autocast_dtype):
                        out = model(batch_images.to(device), queries, None, patch_size=patch)
                    for b, target in enumerate(targets):
                        objectness = out["objectness"][b] if "objectness" in out else None
                        scores, classes, boxes = top_k_detections(
                            out["logits"][b], out["boxes"][b], val_set.max_dets, objectness
                        )
                        xywh = to_pixel_xywh(boxes.cpu(), batch_images.shape[-1], target["scale"], target["orig_size"])
                        writer.add(target["image_id"], category_ids[classes.cpu()].tolist(), xywh, scores.cpu())
            # Ranks may not share a file system: the results themselves travel (300 per image, not the logits), to
            # the main process only, which alone scores them (at LVIS size each rank's part is hundreds of MiB).
            parts = distributed.gather_object(path.read_text())  # None on the other ranks
            # Scored on the main process, the metrics sent to every rank; a failure there ends every rank.
            metrics = distributed.on_main(_score, val_set, parts, image_ids)
            # A metric the ground truth leaves undefined (no large boxes, no 'c' class: NaN) is left out.
            results[patch] = {k: v for k, v in metrics.items() if not math.isnan(v)} | {"n": len(images)}
    return results


def _score(val_set: EvalSet, parts: Sequence[str], image_ids: Sequence) -> dict:
    """LVISEval's / COCOeval's metrics of the ranks' results files' texts ``parts``, merged."""
    merged = [entry for part in parts for entry in json.loads(part)]
    if val_set.format == "lvis":
        return lvis_evaluate(val_set.gt_json, merged, image_ids=image_ids, max_dets=val_set.max_dets)
    return coco_evaluate(val_set.gt_json, merged, image_ids=image_ids)


def image_forward(model: OwlViT):
    """What tools count, time and export: the image side (tower, heads) against queries embedded once, here: the
    model's class names as bare prompts ('object' when it stores none). Embedded eagerly, not on the first call, so
    that ``torch.export`` lifts them as constants rather than tracing the text tower; outputs ``logits`` (B, N, C),
    ``boxes`` (B, N, 4) normalised cxcywh and, with OWLv2's head, ``objectness`` (B, N): tensors only."""
    with torch.no_grad():
        queries = model.embed_prompts(model.query_names or ["object"], ["{}"], next(model.parameters()).device)

    def forward(images, patch_size=None):
        out = model(images, queries.to(images.device), None, patch_size=patch_size)
        return {k: out[k] for k in ("logits", "boxes", "objectness") if k in out}

    return forward


TASK = Task(
    name="detection",
    build_datasets=build_datasets,
    build_model=build_model,
    make_loss=make_loss,
    evaluate=evaluate,
    load_model=load_model,
    predict=predict,
    predict_options=PREDICT_OPTIONS,
    image_forward=image_forward,
    collate=collate,
    runlocal="configs/detection/scenes.py:runlocal",
)

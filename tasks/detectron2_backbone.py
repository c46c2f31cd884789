"""FlexiViT as a detectron2 backbone: ViTDet's simple feature pyramid on a FlexiViT, a patch size per iteration.

In a LazyConfig (configs/detectron2/faster_rcnn_flexivit_scenes.py is a complete Faster R-CNN):

    from tasks.detectron2_backbone import FlexiViTBackbone
    model.backbone = L(FlexiViTBackbone)(name="flexivit_base", pretrained="flexivit_b_i1k",
                                         train_patch_sizes=[48, 40, 30, 24, 20, 16, 15, 12, 10, 8], test_patch_size=16)

or in a yacs config, after ``add_flexivit_config(cfg)``: ``cfg.MODEL.BACKBONE.NAME = "build_flexivit_backbone"``.

The pyramid follows ViTDet (Li et al., "Exploring Plain Vision Transformer Backbones for Object Detection", 2022,
Sec. 3; detectron2's ``SimpleFeaturePyramid``): from the last feature map only, scale 4 = two stride-2 transposed
convs with LN + GELU between, 2 = one transposed conv, 1 = identity, 1/2 = max-pool; each then a 1x1 conv + LN and a
3x3 conv + LN; outputs p2-p5 (+ p6 by max-pooling p5) at strides 4-64.

A FlexiViT's token stride is the patch size of the call, but detectron2 builds the RPN's anchors, the ROI poolers'
scales and the heads' input shapes once, from ``output_shape()``. So the token map is resampled to a fixed nominal
stride of 16 (the grid of input / 16) before the pyramid, and every patch size feeds the same heads at the same
strides (docs/reference.md §8). The training patch size is drawn from ``(seed, iteration)`` with the engine's sampler,
the iteration read from detectron2's ``EventStorage`` (set by the trainer before every step, identical on all ranks,
restored on resume), so data-parallel ranks agree and a resumed run continues the same sequence (paper Sec. 3.3).

detectron2 is not on PyPI. This module imports without it (detectron2's names are then unbound) and every entry
point raises an ImportError that says how to install it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import flexivit
from flexivit.pi_resize import to_2tuple
from tasks.common.dense import dense_backbone, pad_to_multiple, tokens_to_map
from tasks.common.scenes import SPLITS

INSTALL_HINT = (
    "detectron2 is not on PyPI: install it from its source repository, CPU-only for example, from this repository's "
    "root, with\n    git clone https://github.com/facebookresearch/detectron2 ../detectron2 && "
    "FORCE_CUDA=0 .venv/bin/pip install --no-build-isolation -e ../detectron2\n"
    "(outside this repository: a detectron2/ folder in it would shadow the package; see docs/detectron2.md)"
)

try:
    from detectron2.layers import Conv2d, ShapeSpec, get_norm
    from detectron2.modeling import BACKBONE_REGISTRY, Backbone
    from detectron2.modeling.backbone.fpn import LastLevelMaxPool
    from detectron2.utils.events import get_event_storage
except ImportError as error:
    _IMPORT_ERROR: ImportError | None = error
    Backbone = nn.Module  # a stand-in base so that the class below can be defined; its constructor raises first
else:
    _IMPORT_ERROR = None

NOMINAL_STRIDE = 16  # the stride every patch size's token map is resampled to (ViTDet's patch 16)


def require_detectron2() -> None:
    """Raise a clear ImportError, with the install instructions, when detectron2 cannot be imported."""
    if _IMPORT_ERROR is not None:
        raise ImportError(f"{INSTALL_HINT}\n(import failed: {_IMPORT_ERROR})") from _IMPORT_ERROR


def resample_to_stride(
    features: torch.Tensor, patch_size: tuple[int, int], stride: int, size: tuple[int, int]
) -> torch.Tensor:
    """A token map (B, D, gh, gw) at stride ``patch_size`` -> (B, D, *size) at ``stride``, aligned in pixels.

    Token (r, c) covers pixels [r * ph, (r + 1) * ph) of the input padded to a multiple of the patch size; output
    cell (i, j) covers [i * stride, (i + 1) * stride). Interpolating by the scale factor ph / stride itself (not by
    the output size) maps cell centres onto token centres exactly even when the padded extent is not a multiple of
    the stride; the cells past ``size`` (the padding) are cropped. Downsampling by 2 or more (patch <= 8) is
    antialiased: plain bilinear would read only 2 of every 4 tokens per axis at patch 4, while the antialiasing filter
    averages all the tokens under a cell. (For ratios under 2 it is left out: PyTorch's discretised triangle filter
    then shifts a linear ramp by up to 0.7 px, where plain bilinear reproduces it exactly.)
    """
    ph, pw = patch_size
    if (ph, pw) != (stride, stride):
        scale = (ph / stride, pw / stride)  # dyadic for patch sizes over 16: exact in floating point
        features = F.interpolate(
            features, scale_factor=scale, mode="bilinear", align_corners=False, recompute_scale_factor=False,
            antialias=min(scale) <= 0.5,
        )  # fmt: skip
    if features.shape[-2] < size[0] or features.shape[-1] < size[1]:
        raise ValueError(f"a {tuple(features.shape[-2:])} map at stride {stride} does not cover {size}")
    return features[..., : size[0], : size[1]]


class FlexiViTBackbone(Backbone):
    """A registered FlexiViT (head dropped) and ViTDet's simple feature pyramid, as a detectron2 ``Backbone``.

    Args:
        name: a ``flexivit.list_models()`` name; ``overrides`` any FlexiViT keyword arguments.
        pretrained: a release name, a FlexiViT / timm / big_vision file, or a ``tools.train`` workdir (its last
            checkpoint); the kernel and position grid are flexified on load as in ``flexivit.create_model``. None
            when ``train.init_checkpoint`` replaces every weight anyway (``--eval-only``).
        train_patch_sizes, seed: the engine's ``UniformSampler`` draws the training patch size of iteration ``t``
            from ``(seed, t)``; one size gives fixed training.
        test_patch_size: the patch size in eval mode; set the attribute (or use :func:`evaluate_patch_sizes`) to
            evaluate one model at several.
        out_channels, scale_factors, norm: the pyramid (ViTDet: 256, (4, 2, 1, 0.5), "LN").
        with_p6: add p6 = max-pool(p5), as FPN's ``LastLevelMaxPool`` (the RPN of Faster / Mask R-CNN reads it).
        square_pad: if > 0, detectron2 pads every batch to this square (ViTDet's large-scale jitter recipe).
    """

    def __init__(
        self,
        name: str = "flexivit_base",
        pretrained: str | None = None,
        overrides: dict | None = None,
        train_patch_sizes: Sequence[int] = flexivit.PAPER_PATCH_SIZES,
        test_patch_size: int | Sequence[int] = 16,
        seed: int = 0,
        out_channels: int = 256,
        scale_factors: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
        norm: str = "LN",
        with_p6: bool = True,
        square_pad: int = 0,
    ):
        require_detectron2()
        super().__init__()
        self.vit = dense_backbone(name, pretrained, overrides)
        self.sampler = flexivit.UniformSampler(train_patch_sizes, seed=seed)
        self.test_patch_size = to_2tuple(test_patch_size, "test_patch_size")
        self._square_pad = square_pad

        dim, use_bias = self.vit.width, norm == ""
        self.stages = nn.ModuleDict()
        strides = {}
        for scale in scale_factors:
            if scale == 4.0:  # two stride-2 transposed convs, LN + GELU between
                half = dim // 2
                layers = [nn.ConvTranspose2d(dim, half, 2, stride=2), get_norm(norm, half), nn.GELU()]
                layers.append(nn.ConvTranspose2d(half, dim // 4, 2, stride=2))
                stage_dim = dim // 4
            elif scale == 2.0:
                layers, stage_dim = [nn.ConvTranspose2d(dim, dim // 2, 2, stride=2)], dim // 2
            elif scale == 1.0:
                layers, stage_dim = [], dim
            elif scale == 0.5:
                layers, stage_dim = [nn.MaxPool2d(2, stride=2)], dim
            else:
                raise ValueError(f"scale factor {scale} is not one of ViTDet's 4, 2, 1, 0.5")
            layers += [
                Conv2d(stage_dim, out_channels, 1, bias=use_bias, norm=get_norm(norm, out_channels)),
                Conv2d(out_channels, out_channels, 3, padding=1, bias=use_bias, norm=get_norm(norm, out_channels)),
            ]
            stride = int(NOMINAL_STRIDE / scale)
            level = f"p{int(math.log2(stride))}"
            self.stages[level] = nn.Sequential(*layers)
            strides[level] = stride
        self.top_block = LastLevelMaxPool() if with_p6 else None
        if with_p6:
            if self.top_block.in_feature not in strides:
                raise ValueError(f"p6 is pooled from {self.top_block.in_feature}, which scale_factors do not make")
            strides[f"p{int(math.log2(max(strides.values()))) + 1}"] = 2 * max(strides.values())
        # Inputs padded to a multiple of the coarsest pyramid stride (not p6's, which is pooled with ceil as in FPN)
        # make every level exactly input / stride, as output_shape() declares.
        self._size_divisibility = max(stride for level, stride in strides.items() if level in self.stages)
        self._out_feature_strides = strides
        self._out_feature_channels = dict.fromkeys(strides, out_channels)
        self._out_features = list(strides)

    @property
    def size_divisibility(self) -> int:
        return self._size_divisibility

    @property
    def padding_constraints(self) -> dict[str, int]:
        # Spelled as ImageList.from_tensors reads it (ViTDet's SimpleFeaturePyramid misspells the key).
        return {"size_divisibility": self._size_divisibility, "square_size": self._square_pad}

    def current_patch_size(self) -> tuple[int, int]:
        """The training iteration's sampled patch size in train mode, ``test_patch_size`` in eval mode."""
        if not self.training:
            return self.test_patch_size
        try:
            iteration = get_event_storage().iter
        except AssertionError as error:  # detectron2 asserts when no EventStorage is open
            raise RuntimeError(
                "a training-mode forward reads its iteration from detectron2's EventStorage: run it in a detectron2 "
                "trainer or inside `with EventStorage(iteration):`, or call .eval() to use test_patch_size"
            ) from error
        return to_2tuple(self.sampler(iteration))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, H, W), H and W multiples of ``size_divisibility`` -> {"p2": (B, C, H/4, W/4), ..., "p6": ...}."""
        height, width = images.shape[-2:]
        if height % self._size_divisibility or width % self._size_divisibility:
            raise ValueError(
                f"input {height}x{width} is not a multiple of size_divisibility={self._size_divisibility}: pad it "
                "with detectron2's ImageList.from_tensors(images, backbone.size_divisibility)"
            )
        patch = self.current_patch_size()
        if self.training:  # into detectron2's metrics.json / TensorBoard; exact, as the sizes are not noisy
            get_event_storage().put_scalar("patch_size", patch[0], smoothing_hint=False)
        # Pad to a multiple of the patch size so no border is dropped (Segmenter's rule, as tasks.segmentation).
        out = self.vit.forward_features(pad_to_multiple(images, patch), patch_size=patch)
        tokens = tokens_to_map(out["tokens"], out["grid"])  # (B, D, gh, gw) at stride = patch
        size = (height // NOMINAL_STRIDE, width // NOMINAL_STRIDE)
        x = resample_to_stride(tokens, patch, NOMINAL_STRIDE, size)  # (B, D, H/16, W/16)
        features = {level: stage(x) for level, stage in self.stages.items()}
        if self.top_block is not None:
            (p6,) = self.top_block(features[self.top_block.in_feature])
            features[self._out_features[-1]] = p6
        return features

    def output_shape(self) -> dict[str, ShapeSpec]:
        return {
            level: ShapeSpec(channels=self._out_feature_channels[level], stride=self._out_feature_strides[level])
            for level in self._out_features
        }


# ---------------------------------------------------------------------------------------------- yacs configs


def add_flexivit_config(cfg) -> None:
    """Add ``cfg.MODEL.FLEXIVIT`` (the FlexiViTBackbone arguments) to a detectron2 yacs config."""
    require_detectron2()
    from detectron2.config import CfgNode

    cfg.MODEL.FLEXIVIT = CfgNode()
    c = cfg.MODEL.FLEXIVIT
    c.NAME = "flexivit_base"
    c.PRETRAINED = ""  # a release name, a file or a tools.train workdir; "" for random init
    c.OVERRIDES = CfgNode(new_allowed=True)  # FlexiViT keyword arguments, lower case as in Python
    c.TRAIN_PATCH_SIZES = list(flexivit.PAPER_PATCH_SIZES)
    c.TEST_PATCH_SIZE = 16
    c.SEED = 0
    c.SCALE_FACTORS = [4.0, 2.0, 1.0, 0.5]
    c.NORM = "LN"
    c.SQUARE_PAD = 0


def build_flexivit_backbone(cfg, input_shape: ShapeSpec) -> FlexiViTBackbone:
    """The yacs entry point (``cfg.MODEL.BACKBONE.NAME = "build_flexivit_backbone"``), after add_flexivit_config."""
    require_detectron2()
    if "FLEXIVIT" not in cfg.MODEL:
        raise KeyError("cfg.MODEL.FLEXIVIT is missing: call tasks.detectron2_backbone.add_flexivit_config(cfg) first")
    c = cfg.MODEL.FLEXIVIT
    return FlexiViTBackbone(
        name=c.NAME,
        pretrained=c.PRETRAINED or None,
        overrides={**dict(c.OVERRIDES), "in_chans": input_shape.channels},
        train_patch_sizes=list(c.TRAIN_PATCH_SIZES),
        test_patch_size=c.TEST_PATCH_SIZE,
        seed=c.SEED,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        scale_factors=list(c.SCALE_FACTORS),
        norm=c.NORM,
        square_pad=c.SQUARE_PAD,
    )


if _IMPORT_ERROR is None and "build_flexivit_backbone" not in BACKBONE_REGISTRY:  # not twice on a module reload
    BACKBONE_REGISTRY.register(build_flexivit_backbone)


# ---------------------------------------------------------------------------------------------- data and evaluation


def register_scenes(root: str | Path, split: str) -> str:
    """Register a split of the generated scenes (tasks.common.scenes) with detectron2; returns the dataset name.

    The COCO instances JSON ``<root>/coco/instances_{split}.json`` with its images in ``<root>/images/<ADE folder>``
    becomes ``flexivit_scenes_{split}`` in DatasetCatalog / MetadataCatalog (what COCOEvaluator reads). Registering
    the same files again is a no-op; another root replaces the earlier registration (the last call wins).
    """
    require_detectron2()
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    if split not in SPLITS:
        raise ValueError(f"unknown scenes split {split!r}; use one of {sorted(SPLITS)}")
    root = Path(root)
    json_file, image_root = root / "coco" / f"instances_{split}.json", root / "images" / SPLITS[split][1]
    if not json_file.is_file():
        raise FileNotFoundError(
            f"{json_file} not found: write the scenes first, e.g. python -m tools.make_scenes --out {root} "
            "--num-train 2000 --num-val 200"
        )
    name = f"flexivit_scenes_{split}"
    if name in DatasetCatalog.list():
        if MetadataCatalog.get(name).get("json_file") == str(json_file):
            return name
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {}, str(json_file), str(image_root))
    return name


def evaluate_patch_sizes(model: nn.Module, data_loader, evaluator, patch_sizes: Iterable[int]) -> dict[int, dict]:
    """detectron2's ``inference_on_dataset`` once per patch size: {patch size: the evaluator's results}.

    The backbone's ``test_patch_size`` is set for each run and restored afterwards (paper Sec. 3: one FlexiViT
    evaluated at every patch size).
    """
    require_detectron2()
    from detectron2.evaluation import inference_on_dataset

    backbone = getattr(model, "module", model).backbone  # unwrap DistributedDataParallel
    if not isinstance(backbone, FlexiViTBackbone):
        raise TypeError(f"model.backbone is a {type(backbone).__name__}, not a FlexiViTBackbone")
    before = backbone.test_patch_size
    results = {}
    try:
        for patch in patch_sizes:
            backbone.test_patch_size = to_2tuple(patch, "patch size")
            results[patch] = inference_on_dataset(model, data_loader, evaluator)
    finally:
        backbone.test_patch_size = before
    return results

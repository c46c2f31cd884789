"""FlexiViT: one Vision Transformer for all patch sizes (Beyer et al., CVPR 2023), in PyTorch.

>>> import flexivit, torch
>>> model = flexivit.create_model("flexivit_small", num_classes=10)
>>> images = torch.randn(2, 3, 240, 240)
>>> model(images, patch_size=30).shape, model(images, patch_size=8).shape
(torch.Size([2, 10]), torch.Size([2, 10]))
"""

from .checkpoint import load_model, read_checkpoint, save_model
from .deploy import fix_patch_size, to_timm
from .files import CheckpointError
from .model import FlexiViT, in_eval_mode
from .patch_sizes import (
    PAPER_PATCH_SIZES,
    CurriculumSampler,
    FixedSampler,
    UniformSampler,
    WeightedSampler,
    build_sampler,
    tiling_patch_sizes,
)
from .pi_resize import bilinear_resize_patch_embed, pi_resize_patch_embed, resize_posemb
from .registry import VARIANTS, create_model, list_models, register_model
from .releases import RELEASES

__version__ = "0.1.0"

__all__ = [
    "in_eval_mode",
    "PAPER_PATCH_SIZES",
    "RELEASES",
    "VARIANTS",
    "CheckpointError",
    "CurriculumSampler",
    "FixedSampler",
    "FlexiViT",
    "UniformSampler",
    "WeightedSampler",
    "bilinear_resize_patch_embed",
    "build_sampler",
    "create_model",
    "fix_patch_size",
    "list_models",
    "load_model",
    "pi_resize_patch_embed",
    "read_checkpoint",
    "register_model",
    "resize_posemb",
    "save_model",
    "tiling_patch_sizes",
    "to_timm",
]

"""Weight decay of the configs that follow a big_vision recipe: big_vision's decoupled ``wd`` converted for torch's
AdamW, against the recipes' published values and against one optimiser step written out (docs/reference.md §13)."""

from __future__ import annotations

import pytest
import torch

from configs.contrastive.common import base_config as contrastive_base
from configs.panoptic.common import base_config as panoptic_base
from tasks.common.config import load_config
from tasks.common.optim import big_vision_weight_decay, build_optimizer, build_scheduler

# (big_vision config, its lr, its wd, torch AdamW's weight_decay at that lr)
RECIPES = {
    "flexivit/i1k_deit3_distill.py": (1e-4, 1e-5, 0.1),
    "flexivit/i21k_distill.py": (1e-4, 1e-5, 0.1),
    "image_text/lit_coco.py": (1e-3, 1e-2, 10.0),
    "image_text/siglip_lit_coco.py": (1e-3, 1e-2, 10.0),
    "uvim/vqvae_coco_panoptic.py": (4e-4, 4e-5, 0.1),
    "uvim/train_coco_panoptic_pretrained.py": (1e-3, 1e-6, 1e-3),
}


@pytest.mark.parametrize("recipe", RECIPES)
def test_conversion_of_each_cited_recipe(recipe):
    lr, wd, expected = RECIPES[recipe]
    assert big_vision_weight_decay(wd, lr) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("wd, lr", [(-1e-4, 1e-3), (1e-4, 0.0), (float("nan"), 1e-3), (1e-4, float("inf"))])
def test_conversion_refuses_values_that_mean_nothing(wd, lr):
    with pytest.raises(ValueError, match="wd >= 0 and lr > 0"):
        big_vision_weight_decay(wd, lr)


# Each config that follows a recipe: torch's lr * weight_decay is the decay per step (before the schedule), which
# must be the recipe's wd whatever lr the config itself uses.
CONFIGS = {
    "classification i1k_deit3_distill": (lambda: load_config("configs/classification/i1k_deit3_distill.py"), 1e-5),
    "classification i21k_distill": (lambda: load_config("configs/classification/i21k_distill.py"), 1e-5),
    "contrastive base (LiT)": (contrastive_base, 1e-2),
    "contrastive flickr30k (LiT)": (lambda: load_config("configs/contrastive/flickr30k.py"), 1e-2),
    "panoptic stage I": (lambda: panoptic_base(1), 4e-5),
    "panoptic stage II": (lambda: panoptic_base(2), 1e-6),
    "panoptic scenes stage I": (lambda: load_config("configs/panoptic/scenes.py:stage=1"), 4e-5),
    "panoptic scenes stage II": (lambda: load_config("configs/panoptic/scenes.py:stage=2"), 1e-6),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_configs_decay_per_step_as_their_recipe(name):
    build, wd = CONFIGS[name]
    optim = build().optim
    assert optim.name == "adamw"
    assert optim.lr * optim.weight_decay == pytest.approx(wd, rel=1e-9), name


def test_one_adamw_step_changes_a_kernel_as_big_vision_does():
    # big_vision (optax chain: adam -> scale(lr) -> add_decayed_weights(wd) -> schedule -> scale(-1)):
    #   kernel += -sched * (lr * adam_update + wd * kernel);  bias (not decayed) += -sched * lr * adam_update
    # At the first step Adam's bias-corrected update is g / (|g| + eps). sched(0) = 1/4 (warmup of 4 steps).
    lr, wd, eps = 1e-3, 1e-2, 1e-8
    torch.manual_seed(0)
    layer = torch.nn.Linear(5, 3).double()
    kernel, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    g_kernel, g_bias = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    optimizer = build_optimizer(layer, name="adamw", lr=lr, weight_decay=big_vision_weight_decay(wd, lr))
    scheduler = build_scheduler(optimizer, total_steps=10, warmup_steps=4, kind="cosine")
    layer.weight.grad, layer.bias.grad = g_kernel.clone(), g_bias.clone()
    optimizer.step()
    scheduler.step()
    sched = 0.25
    expected_kernel = kernel - sched * (lr * g_kernel / (g_kernel.abs() + eps) + wd * kernel)
    expected_bias = bias - sched * lr * g_bias / (g_bias.abs() + eps)
    torch.testing.assert_close(layer.weight.detach(), expected_kernel, rtol=0, atol=1e-15)
    torch.testing.assert_close(layer.bias.detach(), expected_bias, rtol=0, atol=1e-15)
    # Passing big_vision's value straight to AdamW would decay 1 / lr = 1000 times too weakly: a visible difference.
    too_weak = kernel - sched * (lr * g_kernel / (g_kernel.abs() + eps) + lr * wd * kernel)
    assert (expected_kernel - too_weak).abs().max() > 1e-4

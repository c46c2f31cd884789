"""The deployment fast path (flexivit.deploy) and the model's own fast paths (patch resize, no-autograd blocks)."""

import pytest
import torch
import torch.nn.functional as F

import flexivit
from flexivit import fast_paths, fix_patch_size
from flexivit.checkpoint import load_model, save_model
from flexivit.pi_resize import PI_CACHE, POSEMB_CACHE, clear_caches, pi_resize_patch_embed

IMAGE = 96
# Wide enough (width 128) that resizing the patches is the cheaper way at patch 48.
SMALL = dict(depth=2, num_heads=2, num_classes=5, head_zero_init=False)


def _model(**overrides) -> flexivit.FlexiViT:
    torch.manual_seed(0)
    return flexivit.create_model("flexivit_mu", **{**SMALL, **overrides}).eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))


# 48: above the 32x32 kernel, grid 2; 16: below it, grid 6; (24, 12): a non-square patch, grid 4x8. None of these
# grids is the stored 7x7, so the position embedding is resized too.
@pytest.mark.parametrize("patch", [48, 16, (24, 12)])
@pytest.mark.parametrize("kernel_resize", ["pi", "bilinear"])
def test_fixed_model_equals_flexible_model_at_its_patch_size(images, patch, kernel_resize):
    model = _model(kernel_resize=kernel_resize)
    fixed = fix_patch_size(model, patch, IMAGE)
    with torch.no_grad():
        want = model(images, patch_size=patch)
        got = fixed(images)  # the default patch size is the fixed one
        assert torch.equal(fixed(images, patch_size=patch), got)
        features = fixed.forward_features(images)
    if fast_paths.resizes_patches(model.patch_embed, features["patch_size"], 2 * features["tokens"].shape[1]):
        # Above the kernel's size the flexible model resizes the patches instead of the kernel: the same sums in
        # another order.
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(got, want)  # the very same computation, bit for bit
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    assert features["grid"] == (IMAGE // ph, IMAGE // pw)
    assert fixed.patch_embed.proj.weight.shape[-2:] == (ph, pw)
    assert fixed.pos_embed.shape[1] == (IMAGE // ph) * (IMAGE // pw)


def test_fixed_model_does_no_resize_work(images):
    model = _model()
    fixed = fix_patch_size(model, 16, IMAGE)
    clear_caches()  # fix_patch_size itself resized once; from here on nothing may be computed
    with torch.no_grad():
        fixed(images)
        fixed(images, patch_size=16)
    assert PI_CACHE.computed == 0 and POSEMB_CACHE.computed == 0
    # The resizes hand back the stored parameters themselves: no copy, no matmul.
    assert fixed.patch_embed.resized_weight((16, 16)) is fixed.patch_embed.proj.weight
    assert fixed.posemb_for_grid((6, 6)).data_ptr() == fixed.pos_embed.data_ptr()


def test_fixing_leaves_the_flexible_model_alone_and_keeps_the_rest(images):
    model = _model()
    model.train()
    model.blocks[0].attn.qkv.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fixed = fix_patch_size(model, 24, IMAGE)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.patch_embed.proj.weight.shape[-2:] == (32, 32) and model.posemb_grid == (7, 7)
    assert fixed.training and not fixed.blocks[0].attn.qkv.weight.requires_grad
    shared = [k for k in before if not k.startswith(("patch_embed.proj.weight", "pos_embed"))]
    assert all(torch.equal(before[k], fixed.state_dict()[k]) for k in shared)
    # A copy, not shared storage: training the fixed model does not move the flexible one.
    assert fixed.head.weight.data_ptr() != model.head.weight.data_ptr()
    fixed(images).sum().backward()
    assert fixed.patch_embed.proj.weight.grad is not None and model.patch_embed.proj.weight.grad is None


def test_fixed_model_checkpoint_rebuilds_it(images, tmp_path):
    model = _model()
    model.reset_classifier(7, zero_init=False)  # kwargs must follow the head, not the constructor's num_classes
    fixed = fix_patch_size(model, (24, 12), IMAGE)
    save_model(fixed, tmp_path / "fixed.pt")
    loaded = load_model(tmp_path / "fixed.pt").eval()
    assert loaded.patch_size == (24, 12) and loaded.posemb_grid == (4, 8)
    with torch.no_grad():
        assert torch.equal(loaded(images), fixed(images))


def test_fix_patch_size_rejects_a_patch_larger_than_the_image():
    with pytest.raises(ValueError, match="does not fit"):
        fix_patch_size(_model(), 128, IMAGE)


# The model computes blocks differently without autograd (GELU and residual adds in place, flexivit/model.py):
# the results must be those of the autograd path, and block outputs kept by return_blocks must stay intact.
def test_inference_path_equals_autograd_path(images):
    model = _model()
    with torch.no_grad():
        fast = model.forward_features(images, patch_size=16, return_blocks=True)
    slow = model.forward_features(images, patch_size=16, return_blocks=True)
    torch.testing.assert_close(fast["tokens"], slow["tokens"], rtol=0, atol=1e-6)
    for a, b in zip(fast["blocks"], slow["blocks"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    with torch.inference_mode():
        torch.testing.assert_close(model(images, patch_size=16), slow["pooled"] @ model.head.weight.T + model.head.bias)


def test_stochastic_depth_still_applies_without_autograd(images):
    # drop_path in training mode under no_grad (e.g. a teacher left in train mode) keeps its randomness: from the
    # same seed, the very draws of the autograd path.
    model = _model(drop_path_rate=0.5).train()
    twins = images[:1].expand(2, -1, -1, -1)  # one image twice: only per-sample drops tell the two apart
    outs = []
    for seed in range(4):
        torch.manual_seed(seed)
        with torch.no_grad():
            outs.append(model(twins, patch_size=16))
        torch.manual_seed(seed)
        torch.testing.assert_close(outs[-1], model(twins, patch_size=16).detach(), rtol=0, atol=1e-6)
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
    assert any(not torch.allclose(o[0], o[1]) for o in outs)  # dropped per sample, not for the whole batch


@pytest.mark.parametrize("patch", [48, 40, (48, 40)])
def test_resizing_patches_equals_resizing_the_kernel(images, patch):
    # <x, PI(w)> = <PI^T x, w>: above the kernel's 32x32 the model resizes the patches, forward and backward alike.
    model = _model()
    embed = model.patch_embed
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    assert fast_paths.resizes_patches(embed, (ph, pw), 2 * (IMAGE // ph) * (IMAGE // pw))
    weights = torch.randn(2, model.width, IMAGE // ph, IMAGE // pw)
    got = embed(images, (ph, pw))
    (grad_got,) = torch.autograd.grad((got * weights).sum(), embed.proj.weight)
    want = F.conv2d(images, pi_resize_patch_embed(embed.proj.weight, (ph, pw)), embed.proj.bias, stride=(ph, pw))
    (grad_want,) = torch.autograd.grad((want * weights).sum(), embed.proj.weight)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_got, grad_want, rtol=1e-5, atol=1e-4)
    assert not fast_paths.resizes_patches(embed, (16, 16), 2 * 36) and not fast_paths.resizes_patches(
        embed, (48, 16), 2 * 6
    )

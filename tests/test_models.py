"""Contract tests generated from the registry: every registered model at several patch sizes."""

import math

import pytest
import torch

import flexivit
from flexivit import fast_paths

# Tiny images keep even ViT-L cheap: the contract does not depend on the image size.
IMAGE = 96
PATCHES = [48, 16, (24, 12)]


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", flexivit.list_models())
def test_registered_model_contract(name, images):
    model = flexivit.create_model(name, num_classes=3, head_zero_init=False)
    for patch in PATCHES:
        out = model.forward_features(images, patch_size=patch)
        ph, pw = (patch, patch) if isinstance(patch, int) else patch
        grid = (IMAGE // ph, IMAGE // pw)
        assert out["grid"] == grid and out["patch_size"] == (ph, pw)
        assert out["tokens"].shape == (2, grid[0] * grid[1], model.width)
        assert out["cls"].shape == out["pooled"].shape == (2, model.width)
        logits = model.forward_head(out)
        assert logits.shape == (2, 3) and torch.isfinite(logits).all()
        model.zero_grad()
        logits.square().sum().backward()
        # Gradients reach the two underlying, patch-size dependent parameters (paper Sec. 3.3).
        assert model.patch_embed.proj.weight.grad.abs().sum() > 0
        assert model.pos_embed.grad.abs().sum() > 0
        assert model.cls_token.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "name,width,depth,heads,kernel,grid",
    [
        ("flexivit_tiny", 192, 12, 3, 32, 7),
        ("flexivit_small", 384, 12, 6, 32, 7),
        ("flexivit_base", 768, 12, 12, 32, 7),
        ("flexivit_large", 1024, 24, 16, 32, 7),
        ("vit_base_patch16", 768, 12, 12, 16, 15),
        ("vit_base_patch30", 768, 12, 12, 30, 8),
    ],
)
def test_variant_shapes(name, width, depth, heads, kernel, grid):
    kw = flexivit.registry.model_kwargs(name)
    assert (kw["width"], kw["depth"], kw["num_heads"]) == (width, depth, heads)
    model = flexivit.create_model(name)
    assert model.patch_embed.proj.weight.shape == (width, 3, kernel, kernel)
    assert model.pos_embed.shape == (1, grid * grid, width)


def test_parameter_count_matches_timm_for_a_fixed_vit():
    timm = pytest.importorskip("timm")
    ours = flexivit.create_model("vit_base_patch16", num_classes=1000)
    theirs = timm.create_model("vit_base_patch16_224", img_size=240, class_token=True, no_embed_class=True)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ours) == count(theirs)


def test_unknown_model_lists_valid_names():
    with pytest.raises(KeyError, match="flexivit_small.*") as err:
        flexivit.create_model("flexivit_huge")
    assert "vit_base_patch16" in str(err.value)


def test_overrides_and_default_patch_size():
    model = flexivit.create_model("flexivit_mu", depth=2, patch_size=24, num_classes=4)
    assert len(model.blocks) == 2
    out = model.forward_features(torch.randn(1, 3, 240, 240))
    assert out["grid"] == (10, 10)


def test_grid_argument_uses_big_vision_grid_units():
    model = flexivit.create_model("flexivit_mu", depth=1)
    x = torch.randn(1, 3, 240, 240)
    assert model.forward_features(x, grid=8)["patch_size"] == (30, 30)
    torch.testing.assert_close(model(x, grid=8), model(x, patch_size=30))


def test_border_that_does_not_tile_is_dropped_like_a_strided_conv():
    model = flexivit.create_model("flexivit_mu", depth=1).eval()
    x = torch.randn(1, 3, 100, 100)
    out = model.forward_features(x, patch_size=16)
    assert out["grid"] == (6, 6)
    # Changing the dropped border (the last 4 rows and columns) changes nothing.
    y = x.clone()
    y[..., 96:, :] = 0
    y[..., :, 96:] = 0
    torch.testing.assert_close(model(y, patch_size=16), model(x, patch_size=16))


def test_patch_larger_than_image_is_a_clear_error():
    model = flexivit.create_model("flexivit_mu", depth=1)
    with pytest.raises(ValueError, match=r"patch size \(64, 64\) does not fit the image of size \(48, 48\)"):
        model(torch.randn(1, 3, 48, 48), patch_size=64)
    with pytest.raises(ValueError, match="patch_size must be an int or a pair"):
        model(torch.randn(1, 3, 48, 48), patch_size=(1, 2, 3))


def test_posemb_added_before_class_token_and_none_on_it():
    # With zero blocks' effect removed, the class token output is independent of the position embedding.
    model = flexivit.create_model("flexivit_mu", depth=1).eval()
    x = torch.randn(2, 3, 64, 64)
    captured = []
    model.blocks[0].register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    model(x, patch_size=16)
    tokens = captured[0]
    embed = model.patch_embed(x, (16, 16)).flatten(2).transpose(1, 2)
    torch.testing.assert_close(tokens[:, 0], model.cls_token[0].expand(2, -1))
    torch.testing.assert_close(tokens[:, 1:], embed + model.posemb_for_grid((4, 4)))


def test_model_equals_an_independent_computation():
    # Algorithm 1 of the paper, written out by hand: PI-resized conv, resized posemb, pre-norm blocks.
    torch.manual_seed(0)
    model = flexivit.create_model("flexivit_mu", depth=2, num_classes=5, head_zero_init=False).eval()
    x = torch.randn(2, 3, 60, 60)
    p, g = 12, 5
    w = flexivit.pi_resize_patch_embed(model.patch_embed.proj.weight, p)
    h = torch.nn.functional.conv2d(x, w, model.patch_embed.proj.bias, stride=p).flatten(2).transpose(1, 2)
    h = h + flexivit.resize_posemb(model.pos_embed.view(1, 7, 7, -1), g).reshape(1, g * g, -1)
    h = torch.cat([model.cls_token.expand(2, -1, -1), h], 1)
    for blk in model.blocks:
        y = blk.norm1(h)
        q, k, v = blk.attn.qkv(y).chunk(3, dim=-1)
        split = lambda t: t.view(2, -1, 2, 64).transpose(1, 2)  # noqa: E731
        a = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(64), -1) @ split(v)
        h = h + blk.attn.proj(a.transpose(1, 2).reshape(2, -1, 128))
        z = blk.mlp.fc1(blk.norm2(h))
        h = h + blk.mlp.fc2(0.5 * z * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3))))
    want = model.head(model.norm(h)[:, 0])
    torch.testing.assert_close(model(x, patch_size=p), want, rtol=1e-5, atol=1e-5)


def test_gap_pooling_and_intermediates():
    model = flexivit.create_model("flexivit_mu", depth=3, pool="gap")
    out = model.forward_features(torch.randn(2, 3, 48, 48), patch_size=12, return_blocks=[0, -1])
    torch.testing.assert_close(out["pooled"], out["tokens"].mean(1))
    assert len(out["blocks"]) == 2 and out["blocks"][0].shape == (2, 1 + 16, 128)
    torch.testing.assert_close(model.norm(out["blocks"][-1])[:, 1:], out["tokens"])
    assert len(model.forward_features(torch.randn(1, 3, 48, 48), return_blocks=True)["blocks"]) == 3


def test_query_key_value_are_each_xavier_initialised_as_in_flax():
    # big_vision: flax MultiHeadDotProductAttention(kernel_init=xavier_uniform) with separate (D, D) query, key and
    # value kernels, so each is U(-b, b) with b = sqrt(6 / (D + D)). Xavier on the fused (3D, D) matrix would give
    # b = sqrt(6 / 4D), about 0.71 of it. 65,536 draws per third: the max is within 1 % of b and the std within 2 %
    # of b / sqrt(3) (the std estimate's own spread is ~0.2 %).
    torch.manual_seed(0)
    D = 256
    model = flexivit.FlexiViT(width=D, depth=2, num_heads=4)
    bound = math.sqrt(6 / (D + D))
    for block in model.blocks:
        for name, third in zip(("query", "key", "value"), block.attn.qkv.weight.detach().chunk(3), strict=True):
            assert third.abs().max() <= bound and third.abs().max() > 0.99 * bound, name
            assert third.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02), name
            assert abs(third.mean().item()) < 0.01 * bound, name
        # The output projection is one (D, D) kernel in flax too.
        assert block.attn.proj.weight.abs().max() <= bound


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = flexivit.create_model("flexivit_mu", depth=2, num_classes=3, head_zero_init=False)
    x = torch.randn(2, 3, 48, 48)
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        model(x, patch_size=8).sum().backward()
        grads.append(model.patch_embed.proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_bilinear_kernel_resize_option_differs_from_pi():
    model = flexivit.create_model("vit_mu_patch8", depth=1, num_classes=3, head_zero_init=False).eval()
    naive = flexivit.create_model("vit_mu_patch8", depth=1, num_classes=3, kernel_resize="bilinear").eval()
    naive.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 48, 48)
    torch.testing.assert_close(naive(x, patch_size=8), model(x, patch_size=8))  # same at the stored size
    assert (naive(x, patch_size=16) - model(x, patch_size=16)).abs().max() > 1e-3


@pytest.mark.parametrize("patch", [16, 20, 48])
def test_training_after_an_evaluation_under_inference_mode(patch):
    # Lightning / Hugging Face evaluate under torch.inference_mode(): the resize matrices cached there must still
    # serve a training step at the same patch size (an inference tensor cannot be saved for backward).
    flexivit.pi_resize.clear_caches()
    model = flexivit.create_model("flexivit_mu", depth=1, num_classes=3, head_zero_init=False)
    images = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        under_inference = model(images, patch_size=patch)
    with torch.no_grad():
        under_no_grad = model(images, patch_size=patch)
    torch.testing.assert_close(under_inference, under_no_grad, rtol=0, atol=0)
    model(images, patch_size=patch).square().sum().backward()  # raised "Inference tensors cannot be saved"
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0 and model.pos_embed.grad.abs().sum() > 0


def test_bf16_autocast_keeps_the_residual_stream_in_float32():
    # Under autocast only the matmuls run in bf16; the position embedding, the class token and the 2 * depth residual
    # additions stay in float32 (as in timm), so the logits stay close to the float32 ones.
    torch.manual_seed(0)
    model = flexivit.create_model("flexivit_mu", depth=4, num_classes=10, head_zero_init=False)
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(images, patch_size=8)
    for grad in (False, True):  # the no-grad path adds residuals differently (flexivit/model.py)
        with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.forward_features(images, patch_size=8, return_blocks=True)
            logits = model.forward_head(out)
        assert all(block.dtype == torch.float32 for block in out["blocks"]), [b.dtype for b in out["blocks"]]
        assert out["tokens"].dtype == torch.float32
        # Measured: 0.78 % relative error (0.86 % with the bf16 stream of before); bf16 rounds to 8 mantissa bits.
        assert ((logits.float() - reference).norm() / reference.norm()).item() < 0.02
    # One training step in bf16 is finite and moves the weights.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    labels = torch.arange(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(images, patch_size=8).float(), labels)
    loss.backward()  # outside autocast, as the engine does
    before = model.head.weight.detach().clone()
    optimizer.step()
    assert torch.isfinite(loss) and all(torch.isfinite(p).all() for p in model.parameters())
    assert not torch.equal(before, model.head.weight)


def test_bf16_training_gradients_follow_the_float32_ones():
    # Training in bf16 on CPU takes its own attention path (flexivit/model.py): its gradients must still be those of
    # the float32 model to bf16's precision.
    torch.manual_seed(0)
    model = flexivit.create_model("flexivit_mu", depth=2, num_classes=10, head_zero_init=False)
    images = torch.randn(4, 3, 48, 48, generator=torch.Generator().manual_seed(1))

    def gradients(dtype):
        model.zero_grad()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = model(images, patch_size=8).float().logsumexp(-1).sum()
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.blocks.parameters()])

    reference, low = gradients(None), gradients(torch.bfloat16)
    # Measured: ~1 % relative error; a wrong attention (say, an unscaled softmax) is off by far more.
    assert ((low - reference).norm() / reference.norm()).item() < 0.04


# ---------------------------------------------------------------------------------------------- fast paths
# Each path of flexivit/fast_paths.py against the plain expression it stands for (flexivit/model.py).


@pytest.mark.parametrize("kernel_resize", ["pi", "bilinear"])
@pytest.mark.parametrize("patch", [8, 16, (8, 12), 32, 48, (48, 40)])
def test_patch_embedding_equals_the_strided_conv_of_algorithm_1(kernel_resize, patch):
    # The GEMM over the patches (and, above the 32x32 kernel with PI-resize, the resized patches) against F.conv2d with
    # the resized kernel, forward and backward. 100 px leaves an untiled border for every patch size but 8 and 32.
    torch.manual_seed(0)
    embed = flexivit.create_model("flexivit_mu", depth=1, kernel_resize=kernel_resize).patch_embed
    images = torch.randn(2, 3, 100, 100, generator=torch.Generator().manual_seed(1))
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    resized = fast_paths.resizes_patches(embed, (ph, pw), num_patches=2 * (100 // ph) * (100 // pw))
    assert resized == (kernel_resize == "pi" and patch in (48, (48, 40)))  # the cheaper way for width 128
    weights = torch.randn(2, 128, 100 // ph, 100 // pw, generator=torch.Generator().manual_seed(2))
    got = embed(images, (ph, pw))
    want = torch.nn.functional.conv2d(images, embed.resized_weight((ph, pw)), embed.proj.bias, stride=(ph, pw))
    grads = [torch.autograd.grad((y * weights).sum(), [embed.proj.weight, embed.proj.bias]) for y in (got, want)]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(*grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-4)


def test_patches_are_resized_only_where_that_is_cheaper():
    embed = flexivit.create_model("flexivit_mu", depth=1).patch_embed  # 32x32 kernel, width 128
    assert fast_paths.resizes_patches(embed, (48, 48), num_patches=4)
    assert not fast_paths.resizes_patches(embed, (32, 32), num_patches=4)  # the kernel itself: no resize at all
    assert not fast_paths.resizes_patches(embed, (16, 16), num_patches=36)  # below the kernel
    assert not fast_paths.resizes_patches(embed, (48, 16), num_patches=12)  # below it on one axis


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_written_out_attention_equals_the_fused_kernel(dtype):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 32, generator=generator).to(dtype).requires_grad_() for _ in range(3))
    out = torch.randn(2, 3, 17, 32, generator=generator)
    got = fast_paths.written_out_attention(q, k, v)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got, want, **tol)
    for g, w in zip(
        torch.autograd.grad((got.float() * out).sum(), [q, k, v]),
        torch.autograd.grad((want.float() * out).sum(), [q, k, v]),
        strict=True,
    ):
        torch.testing.assert_close(g, w, **tol)
    # Only training in low precision on CPU takes it: inference and float32 keep the fused kernel.
    assert fast_paths.writes_out_attention(q) == (dtype != torch.float32)
    with torch.no_grad():
        assert not fast_paths.writes_out_attention(q)


@pytest.mark.parametrize("autocast", [False, True])
def test_mlp_without_autograd_is_bit_identical(autocast):
    torch.manual_seed(0)
    mlp = flexivit.create_model("flexivit_mu", depth=1).blocks[0].mlp
    x = torch.randn(2, 10, 128)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), torch.no_grad():
        got = mlp(x)  # GELU in place
        want = mlp.fc2(mlp.act(mlp.fc1(x)))  # the plain expression
    assert torch.equal(got, want) and got.dtype == want.dtype


@pytest.mark.parametrize("autocast", [False, True])
def test_block_without_autograd_equals_the_plain_block(autocast, monkeypatch):
    torch.manual_seed(0)
    block = flexivit.create_model("flexivit_mu", depth=1).blocks[0].eval()
    x = torch.randn(5, 17, 128, generator=torch.Generator().manual_seed(1))
    kept = x.clone()

    def plain(x):  # Block.forward's autograd expression, with the plain MLP
        mlp = block.mlp
        x = x + block.attn(block.norm1(x))
        return x + mlp.fc2(mlp.act(mlp.fc1(block.norm2(x))))

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), torch.no_grad():
        want = plain(x)
        assert torch.equal(block(x), want)  # residuals added in place: bit for bit
        # A batch whose MLP activation exceeds the limit runs in groups of images: only GEMM rounding may differ.
        calls = []
        block.attn.register_forward_hook(lambda *args: calls.append(args[1][0].shape[0]))
        monkeypatch.setattr(fast_paths, "CPU_ACTIVATION_BYTES", 2 * 17 * 512 * 4)  # two images per group
        grouped = block(x)
    assert calls == [2, 2, 1]
    torch.testing.assert_close(grouped, want, rtol=0, atol=1e-5 if not autocast else 1e-2)
    assert torch.equal(x, kept)  # the input is never written (return_blocks keeps it)


def test_model_without_autograd_equals_the_model_with_it():
    # All paths at once, in float32: no_grad (GELU, residuals in place, batch groups at patch 4) against autograd.
    torch.manual_seed(0)
    model = flexivit.create_model("flexivit_mu", depth=2, num_classes=5, head_zero_init=False).eval()
    images = torch.randn(16, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    for patch in (4, 16, 48):
        with torch.no_grad():
            fast = model.forward_features(images, patch_size=patch, return_blocks=True)
        slow = model.forward_features(images, patch_size=patch, return_blocks=True)
        torch.testing.assert_close(fast["tokens"], slow["tokens"], rtol=0, atol=1e-5)
        for a, b in zip(fast["blocks"], slow["blocks"], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_reset_classifier_updates_the_constructor_arguments_a_checkpoint_rebuilds_from():
    model = flexivit.create_model("flexivit_mu", depth=1, width=32, num_heads=2, num_classes=10)
    model.reset_classifier(3)
    rebuilt = flexivit.FlexiViT(**model.kwargs)
    rebuilt.load_state_dict(model.state_dict())  # a head of 3 classes, as the constructor arguments now say
    assert rebuilt.head.out_features == 3


def test_in_eval_mode_restores_the_mode_also_when_the_function_raises():
    model = flexivit.create_model("flexivit_mu", depth=1, width=32, num_heads=2)
    seen = []

    @flexivit.in_eval_mode
    def look(m, fail=False):
        seen.append(m.training)
        if fail:
            raise RuntimeError("boom")
        return "done"

    model.train()
    assert look(model) == "done" and model.training
    with pytest.raises(RuntimeError, match="boom"):
        look(model, fail=True)
    assert model.training and seen == [False, False]
    model.eval()
    look(model)
    assert not model.training

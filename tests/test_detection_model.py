"""OWL-ViT model and loss (tasks/detection/model.py, losses.py): the box prior against its formula at every grid,
the class head's masking and template averaging, one-shot queries, Hungarian matching against brute force, the
focal and GIoU terms against torchvision, and the loss's federated rule and normalisations computed by hand."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torchvision.ops as tvo

import flexivit
from tasks.common import distributed
from tasks.contrastive.model import ImageTextModel, build_text_tower
from tasks.detection import losses
from tasks.detection.losses import (
    cxcywh_to_xyxy,
    detection_loss,
    match,
    matching_cost,
    sigmoid_focal_loss,
    xyxy_to_cxcywh,
)
from tasks.detection.model import (
    PROMPT_TEMPLATES_LVIS_EVAL,
    PROMPT_TEMPLATES_TRAIN,
    ClassHead,
    OwlViT,
    box_bias,
    one_shot_query_index,
)

# ----------------------------------------------------------------------------- numpy references


def np_logit(x):
    return np.log(x + 1e-4) - np.log1p(-x + 1e-4)


def np_box_bias(image_hw, patch):
    """The prior written out per token: bottom-right corner of the patch, size of the patch, both / image size."""
    (H, W), (ph, pw) = image_hw, patch
    gh, gw = H // ph, W // pw
    rows = []
    for r in range(gh):
        for c in range(gw):
            rows.append([min((c + 1) * pw / W, 1.0), min((r + 1) * ph / H, 1.0), pw / W, ph / H])
    return np_logit(np.array(rows, dtype=np.float64)), (gh, gw)


def np_focal(x, t, alpha=0.3, gamma=2.0):
    p = 1 / (1 + np.exp(-x))
    ce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
    p_t = p * t + (1 - p) * (1 - t)
    return ce * (1 - p_t) ** gamma * (alpha * t + (1 - alpha) * (1 - t))


def np_xyxy(b):
    b = np.asarray(b, dtype=np.float64)
    return np.stack(
        [b[..., 0] - b[..., 2] / 2, b[..., 1] - b[..., 3] / 2, b[..., 0] + b[..., 2] / 2, b[..., 1] + b[..., 3] / 2], -1
    )


def np_giou(a, b):
    """GIoU of two xyxy boxes, from the definition (Rezatofighi et al. 2019)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (hull - union) / hull


def np_cost(logits, pred, tgt, labels, valid, alpha=0.3, gamma=2.0):
    """The matching cost entry by entry: focal-style class cost over the target's positive valid labels + L1 on
    cxcywh - GIoU."""
    N, M = len(pred), len(tgt)
    cost = np.zeros((N, M))
    p = 1 / (1 + np.exp(-logits))
    for i in range(N):
        for j in range(M):
            c = 0.0
            for q in range(logits.shape[1]):
                if valid[q] and labels[j, q]:
                    c += alpha * (1 - p[i, q]) ** gamma * -np.log(p[i, q])
                    c -= (1 - alpha) * p[i, q] ** gamma * -np.log(1 - p[i, q])
            l1 = np.abs(pred[i] - tgt[j]).sum()
            cost[i, j] = c + l1 - np_giou(np_xyxy(pred[i]), np_xyxy(tgt[j]))
    return cost


def random_boxes(gen, n):
    centre = torch.rand(n, 2, generator=gen) * 0.6 + 0.2
    size = torch.rand(n, 2, generator=gen) * 0.3 + 0.05
    return torch.cat([centre, size], dim=1)


# ----------------------------------------------------------------------------- tiny models


def tiny_image_text() -> ImageTextModel:
    torch.manual_seed(0)
    image = flexivit.create_model("flexivit_mu", depth=1, width=32, num_heads=2, num_classes=0)
    text = build_text_tower("openclip", width=32, layers=1, heads=2, context_length=16)
    return ImageTextModel(image=image, text=text, embed_dim=16, image_proj=True, text_proj=True)


@pytest.fixture(scope="module")
def owl() -> OwlViT:
    model = OwlViT.from_image_text(tiny_image_text()).eval()
    # The class projection starts at std 1e-6; a visible one makes the logit checks sensitive.
    torch.nn.init.normal_(model.class_head.proj.weight, std=0.3)
    return model


# ----------------------------------------------------------------------------- box bias


@pytest.mark.parametrize(
    "image_hw, patch",
    [((48, 48), (16, 16)), ((48, 48), (16, 12)), ((64, 48), (16, 16)), ((48, 48), (20, 20)), ((50, 36), (12, 8))],
)
def test_box_bias_is_the_bottom_right_corner_prior(image_hw, patch):
    expected, grid = np_box_bias(image_hw, patch)
    got = box_bias(grid, patch, image_hw, dtype=torch.float64)
    assert got.shape == (grid[0] * grid[1], 4)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-12)
    gh, gw = grid
    tiled = image_hw == (gh * patch[0], gw * patch[1])
    # Where the patches tile the image it is the reference's (c+1)/gw, 1/gw per axis; where they do not it is not.
    ref = np_logit(np.array([[(c + 1) / gw, (r + 1) / gh, 1 / gw, 1 / gh] for r in range(gh) for c in range(gw)]))
    assert np.allclose(got.numpy(), ref, atol=1e-9) == tiled


def test_box_bias_rejects_a_grid_that_does_not_fit():
    with pytest.raises(ValueError, match="does not fit"):
        box_bias((4, 4), 16, (48, 48))


def test_boxes_at_init_are_the_prior_of_each_calls_grid(owl):
    images = torch.randn(2, 3, 48, 48)
    queries = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1)
    for patch in (16, 8, 20, 16):  # back to 16: nothing was cached for the last size
        out = owl(images, queries, patch_size=patch)
        expected, grid = np_box_bias((48, 48), (patch, patch))
        assert out["grid"] == grid
        assert out["boxes"].shape == (2, grid[0] * grid[1], 4)
        prior = torch.sigmoid(torch.from_numpy(expected)).float()
        torch.testing.assert_close(out["boxes"], prior.expand(2, -1, -1), rtol=0, atol=1e-6)
        assert out["logits"].shape == (2, grid[0] * grid[1], 3)


# ----------------------------------------------------------------------------- class head


def test_class_head_formula_masking_and_gradients():
    torch.manual_seed(1)
    head = ClassHead(8, 4)
    torch.nn.init.normal_(head.proj.weight)
    tokens = torch.randn(2, 5, 8)
    queries = torch.nn.functional.normalize(torch.randn(2, 3, 4), dim=-1).requires_grad_(True)
    valid = torch.tensor([[True, False, True], [True, True, False]])
    logits, embeds = head(tokens, queries, valid)

    # The formula written out: cosine with the normalised projection, shifted then scaled per token.
    proj = tokens @ head.proj.weight.T + head.proj.bias
    e = proj / (proj.norm(dim=-1, keepdim=True) + 1e-6)
    shift = tokens @ head.shift.weight.T + head.shift.bias
    scale = torch.nn.functional.elu(tokens @ head.scale.weight.T + head.scale.bias) + 1
    full = (e @ queries.transpose(1, 2) + shift) * scale
    torch.testing.assert_close(embeds, e)
    mask = valid[:, None, :].expand_as(logits)
    torch.testing.assert_close(logits[mask], full[mask])
    assert torch.all(logits[~mask] == -1e6)

    weights = torch.randn_like(logits)
    (logits * weights).sum().backward()
    assert torch.all(queries.grad[~valid] == 0)
    assert torch.all(queries.grad[valid].abs().sum(-1) > 0)

    # Changing an invalid query changes nothing.
    other = queries.detach().clone()
    other[~valid] = 100.0
    torch.testing.assert_close(head(tokens, other, valid)[0], logits, rtol=0, atol=0)
    # Unmasked, shared (Q, E) queries broadcast over the batch.
    shared = head(tokens, queries[0].detach())[0]
    torch.testing.assert_close(shared[0], full[0].detach())


def test_class_head_init_and_shift_scale_shapes():
    torch.manual_seed(2)
    head = ClassHead(64, 32)
    assert head.shift.bias.item() == pytest.approx(-4.59512, abs=1e-5)
    assert head.proj.weight.std().item() == pytest.approx(1e-6, rel=0.1)
    assert torch.all(head.proj.bias == 0)
    shift, scale = head.shift_and_scale(torch.randn(3, 7, 64))
    assert shift.shape == (3, 7, 1) and scale.shape == (3, 7, 1)
    assert torch.all(scale > 0)  # elu + 1 > 0


def test_template_mean_query_gives_the_mean_of_template_logits():
    torch.manual_seed(3)
    head = ClassHead(8, 6)
    torch.nn.init.normal_(head.proj.weight)
    tokens = torch.randn(2, 5, 8)
    per_template = torch.nn.functional.normalize(torch.randn(4, 3, 6), dim=-1)  # (T, C, E)
    mean_query = per_template.mean(0)
    assert mean_query.norm(dim=-1).max() < 0.99  # so a re-normalised mean would give other logits
    expected = torch.stack([head(tokens, q)[0] for q in per_template]).mean(0)
    torch.testing.assert_close(head(tokens, mean_query)[0], expected, rtol=0, atol=1e-5)


def test_embed_prompts_is_the_template_ensemble(owl):
    names, templates = ["shirt", "ankle boot"], PROMPT_TEMPLATES_LVIS_EVAL[:3]
    images = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        queries = owl.embed_prompts(names, templates, batch_size=4)  # 6 prompts in two batches
        per_template = [owl.embed_text(owl.tokenize([t.format(n) for n in names])) for t in templates]
        torch.testing.assert_close(per_template[0].norm(dim=-1), torch.ones(2))
        torch.testing.assert_close(queries, torch.stack(per_template).mean(0))
        expected = torch.stack([owl(images, q, patch_size=16)["logits"] for q in per_template]).mean(0)
        got = owl(images, queries, patch_size=16)["logits"]
    assert queries.shape == (2, 16) and queries.norm(dim=-1).max() < 0.9999
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="no '{}'"):
        owl.embed_prompts(names, ["a photo"])


def test_prompt_templates():
    assert len(PROMPT_TEMPLATES_TRAIN) == 81 and PROMPT_TEMPLATES_TRAIN[0] == "{}"
    assert len(set(PROMPT_TEMPLATES_TRAIN)) == 81 and all("{}" in t for t in PROMPT_TEMPLATES_TRAIN)
    assert "itap of my {}." in PROMPT_TEMPLATES_TRAIN and "a tattoo of the {}." in PROMPT_TEMPLATES_TRAIN
    assert len(PROMPT_TEMPLATES_LVIS_EVAL) == 7 and set(PROMPT_TEMPLATES_LVIS_EVAL) <= set(PROMPT_TEMPLATES_TRAIN)


# ----------------------------------------------------------------------------- the model


def test_model_under_bf16_autocast_keeps_float32_logits_and_exact_masking(owl):
    images = torch.randn(2, 3, 48, 48)
    queries = torch.nn.functional.normalize(torch.randn(2, 4, 16), dim=-1)
    valid = torch.tensor([[True, True, False, False], [True, False, True, False]])
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        out = owl(images, queries, valid, patch_size=12)
    assert out["logits"].dtype == torch.float32 and out["boxes"].dtype == torch.float32
    assert torch.all(out["logits"][~valid[:, None, :].expand_as(out["logits"])] == -1e6)
    assert torch.isfinite(out["logits"]).all()


def test_mul_ln_merges_the_class_token(owl):
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        raw = owl.image.forward_features(images, 16)
        merged = owl.image_features(images, 16)
    expected = torch.nn.functional.layer_norm(raw["tokens"] * raw["cls"][:, None], (32,), eps=1e-6)
    torch.testing.assert_close(merged["tokens"], expected)  # the new LayerNorm starts at identity affine
    assert owl.merged_norm.eps == 1e-6 and merged["grid"] == (3, 3) and merged["patch_size"] == (16, 16)


def test_from_image_text_shares_towers_and_kwargs_rebuild_the_model():
    pair = tiny_image_text()
    model = OwlViT.from_image_text(pair, objectness=True)
    assert model.image is pair.image and model.text is pair.text and model.text_proj is pair.text_proj
    assert model.embed_dim == 16 and model.objectness_enabled
    rebuilt = OwlViT.from_kwargs(model.kwargs)
    rebuilt.load_state_dict(model.state_dict())
    images, queries = torch.randn(1, 3, 48, 48), torch.randn(2, 16)
    with torch.no_grad():
        a, b = model.eval()(images, queries, patch_size=8), rebuilt.eval()(images, queries, patch_size=8)
    for key in ("logits", "boxes", "class_embeds", "objectness"):
        torch.testing.assert_close(a[key], b[key])
    assert a["objectness"].shape == (1, 36)
    model.set_grad_checkpointing(True)
    assert model.image.grad_checkpointing
    with pytest.raises(ValueError, match="classification head"):
        OwlViT(
            flexivit.create_model("flexivit_mu", depth=1, width=32, num_heads=2, num_classes=3),
            pair.text,
            pair.text_proj,
            16,
        )


def test_objectness_head_does_not_train_the_features():
    model = OwlViT.from_image_text(tiny_image_text(), objectness=True)
    out = model(torch.randn(2, 3, 48, 48), torch.randn(2, 16), patch_size=16)
    out["objectness"].sum().backward()
    assert all(p.grad is None for p in model.image.parameters())
    assert all(p.grad is None for p in model.merged_norm.parameters())
    assert model.objectness_head.mlp[0].weight.grad.abs().sum() > 0


def test_one_shot_query_picks_the_least_typical_of_the_best_overlaps():
    query = torch.tensor([0.5, 0.5, 0.4, 0.4])
    boxes = torch.tensor(
        [
            [0.5, 0.5, 0.4, 0.4],  # IoU 1
            [0.51, 0.5, 0.4, 0.4],  # IoU ~0.95 >= 0.8
            [0.6, 0.5, 0.4, 0.4],  # IoU 0.6: out
            [0.1, 0.1, 0.1, 0.1],  # IoU 0
        ]
    )
    embeds = torch.nn.functional.normalize(
        torch.tensor([[0.8, 0.6, 0.0], [0.6, -0.8, 0.0], [-1.0, 0.0, 0.0], [0.8, 0.6, 0.0]]), dim=-1
    )
    # Similarity to the mean (0.3, 0.1, 0): 0.3, 0.1, -0.3, 0.3. Box 2 is least typical overall, box 1 among the
    # candidates {0, 1}, box 0 has the best IoU.
    torch.testing.assert_close(embeds @ embeds.mean(0), torch.tensor([0.3, 0.1, -0.3, 0.3]))
    assert one_shot_query_index(boxes, embeds, query) == 1
    # No overlap at all: GIoU picks the nearest box.
    assert one_shot_query_index(boxes[2:], embeds[2:], torch.tensor([0.9, 0.9, 0.05, 0.05])) == 0


def test_image_query_embedding_is_a_class_embedding_of_the_image(owl):
    images = torch.randn(1, 3, 48, 48)
    box = torch.tensor([2 / 3, 2 / 3, 1 / 3, 1 / 3])  # the prior box of token 4 (centre row and column)
    query = owl.image_query_embedding(images, box, patch_size=16)
    with torch.no_grad():
        out = owl(images, torch.zeros(1, 16), patch_size=16)
        head = owl.class_head.proj
        raw = torch.nn.functional.linear(owl.image_features(images, 16)["tokens"][0], head.weight, head.bias)
    index = one_shot_query_index(out["boxes"][0], raw, box)
    torch.testing.assert_close(query, out["class_embeds"][0, index])
    assert index == 4  # the zero-initialised box head predicts the priors: only token 4 overlaps
    with pytest.raises(ValueError, match="one image"):
        owl.image_query_embedding(torch.randn(2, 3, 48, 48), box)


def test_image_query_selects_on_the_raw_class_embeddings():
    # scenic's inference code and HF's embed_image_query compare the *unnormalised* class projections with their
    # mean (docs/reference.md §8). Constructed tokens: the box (pixels 24..56 x 24..40 of 48 px) overlaps the priors
    # of tokens 4 and 5 equally (IoU 1/2 each), so both are candidates. Token 4's embedding points the typical way
    # but is tiny, token 5's is long and less typical; every other token is (1, 0). Raw: similarities to the mean
    # 0.014 (token 4) and 15.8 (token 5) -> token 4. Normalised: 0.96 and 0.64 -> token 5, the wrong pick.
    model = OwlViT.from_image_text(tiny_image_text()).eval()
    with torch.no_grad():
        model.class_head.proj.weight.copy_(torch.eye(16, 32))  # raw class embedding = the token's first 16 values
        model.class_head.proj.bias.zero_()
    tokens = torch.zeros(1, 9, 32)
    tokens[0, :, 0] = 1.0
    tokens[0, 4, :2] = torch.tensor([0.01, 0.0])
    tokens[0, 5, :2] = torch.tensor([6.0, 8.0])
    model.image_features = lambda images, patch_size=None: {"tokens": tokens, "grid": (3, 3), "patch_size": (16, 16)}
    box = torch.tensor([40 / 48, 32 / 48, 32 / 48, 16 / 48])
    query = model.image_query_embedding(torch.zeros(1, 3, 48, 48), box, patch_size=16)
    raw = tokens[0, :, :16]
    similarity = raw[[4, 5]] @ raw.mean(0)
    assert similarity.argmin() == 0  # token 4 by the reference's rule
    normalised = raw / (raw.norm(dim=-1, keepdim=True) + 1e-6)
    assert (normalised[[4, 5]] @ normalised.mean(0)).argmin() == 1  # the two rules really disagree here
    torch.testing.assert_close(query, normalised[4])


# ----------------------------------------------------------------------------- losses


def test_box_conversions_match_torchvision():
    boxes = random_boxes(torch.Generator().manual_seed(0), 10)
    torch.testing.assert_close(cxcywh_to_xyxy(boxes), tvo.box_convert(boxes, "cxcywh", "xyxy"))
    xyxy = tvo.box_convert(boxes, "cxcywh", "xyxy")
    torch.testing.assert_close(xyxy_to_cxcywh(xyxy), tvo.box_convert(xyxy, "xyxy", "cxcywh"))


@pytest.mark.parametrize("alpha, gamma", [(0.3, 2.0), (0.25, 1.5), (-1.0, 0.0)])
def test_focal_loss_matches_torchvision(alpha, gamma):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 6, 5, generator=gen) * 3
    targets = (torch.rand(4, 6, 5, generator=gen) < 0.3).float()
    expected = tvo.sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="none")
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets, alpha, gamma), expected)
    if alpha == 0.3:
        got = sigmoid_focal_loss(logits.double(), targets.double()).numpy()
        np.testing.assert_allclose(got, np_focal(logits.double().numpy(), targets.double().numpy()), rtol=1e-9)


def random_matching_case(seed, N, M, Q=4):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, Q, generator=gen) * 2
    valid = torch.tensor([True, True, False, True])[:Q]
    logits[:, ~valid] = torch.randn(N, int((~valid).sum()), generator=gen) * 20  # would matter if not masked
    labels = (torch.rand(M, Q, generator=gen) < 0.5).float()
    labels[:, 2] = 1.0  # a label on the invalid slot, which must be ignored
    return logits, random_boxes(gen, N), random_boxes(gen, M), labels, valid


def test_matching_cost_is_the_focal_l1_giou_cost():
    logits, pred, tgt, labels, valid = random_matching_case(0, 5, 3)
    expected = np_cost(logits.double().numpy(), pred.double().numpy(), tgt.double().numpy(), labels.numpy(), valid)
    got = matching_cost(logits, pred, tgt, labels, valid)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, atol=1e-6)
    weighted = matching_cost(logits, pred, tgt, labels, valid, weights={"l1": 2.0})
    l1 = np.abs(pred.double().numpy()[:, None] - tgt.double().numpy()[None]).sum(-1)
    np.testing.assert_allclose(weighted.numpy(), expected + l1, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("N, M", [(5, 3), (4, 4), (3, 4)])
def test_match_equals_brute_force(N, M):
    for seed in range(8):
        logits, pred, tgt, labels, valid = random_matching_case(seed, N, M)
        cost = np_cost(logits.double().numpy(), pred.double().numpy(), tgt.double().numpy(), labels.numpy(), valid)
        rows, cols = match(logits, pred, tgt, labels, valid)
        assert rows.dtype == torch.long and len(rows) == min(N, M)
        k = min(N, M)
        # Every injective assignment of k predictions to k targets.
        best = min(
            (sum(cost[i, j] for i, j in zip(ps, ts, strict=True)), ps, ts)
            for ps in itertools.permutations(range(N), k)
            for ts in itertools.combinations(range(M), k)
        )
        assert cost[rows.numpy(), cols.numpy()].sum() == pytest.approx(best[0], abs=1e-9)
        assert sorted(zip(rows.tolist(), cols.tolist(), strict=True)) == sorted(zip(best[1], best[2], strict=True))


def test_match_without_targets_is_empty():
    rows, cols = match(
        torch.randn(4, 3),
        random_boxes(torch.Generator(), 4),
        torch.zeros(0, 4),
        torch.zeros(0, 3),
        torch.ones(3, dtype=torch.bool),
    )
    assert rows.shape == (0,) and cols.shape == (0,) and rows.dtype == torch.long


def test_detection_loss_by_hand():
    # One image, 3 predictions, 2 valid queries + 1 invalid, 2 targets + 1 padding row.
    logits = torch.tensor([[1.0, -2.0, 0.5], [-1.0, 0.3, -0.7], [0.2, 0.1, 3.0]], requires_grad=True)
    boxes = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.3, 0.2], [0.5, 0.5, 0.9, 0.9]], requires_grad=True)
    tgt = torch.tensor([[0.72, 0.68, 0.3, 0.25], [0.31, 0.29, 0.22, 0.2], [0.0, 0.0, 0.0, 0.0]])
    labels = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    qv = torch.tensor([True, True, False])
    bv = torch.tensor([True, True, False])
    loss, terms = detection_loss(logits[None], boxes[None], tgt[None], bv[None], labels[None], qv[None])
    # The obvious matching: prediction 0 <-> target 1, prediction 1 <-> target 0, prediction 2 unmatched.
    assert [r.tolist() for r in match(logits, boxes, tgt[:2], labels[:2], qv)] == [[0, 1], [1, 0]]
    t = np.array([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]])
    class_expected = np_focal(logits.detach().numpy()[:, :2].astype(np.float64), t).sum() / 3  # 3 positive labels
    pairs = [(0, 1), (1, 0)]
    src, dst = np_xyxy(boxes.detach().numpy()), np_xyxy(tgt.numpy())
    l1_expected = sum(np.abs(src[i] - dst[j]).sum() for i, j in pairs) / 2
    giou_expected = sum(1 - np_giou(src[i], dst[j]) for i, j in pairs) / 2
    assert terms["class"].item() == pytest.approx(class_expected, rel=1e-5)
    assert terms["l1"].item() == pytest.approx(l1_expected, rel=1e-5)
    assert terms["giou"].item() == pytest.approx(giou_expected, rel=1e-5)
    assert loss.item() == pytest.approx(class_expected + l1_expected + giou_expected, rel=1e-5)
    # The GIoU term is 1 - torchvision's GIoU of the matched pairs.
    tv = tvo.generalized_box_iou(torch.from_numpy(src[[0, 1]]), torch.from_numpy(dst[[1, 0]])).diagonal()
    assert terms["giou"].item() == pytest.approx((1 - tv).mean().item(), rel=1e-5)
    weighted, _ = detection_loss(
        logits[None],
        boxes[None],
        tgt[None],
        bv[None],
        labels[None],
        qv[None],
        weights={"class": 2.0, "l1": 5.0, "giou": 0.5},
    )
    assert weighted.item() == pytest.approx(2 * class_expected + 5 * l1_expected + 0.5 * giou_expected, rel=1e-5)
    loss.backward()
    assert torch.all(logits.grad[:, 2] == 0)


def test_queries_outside_the_federated_set_change_nothing():
    gen = torch.Generator().manual_seed(5)
    B, N, Q, M = 2, 6, 5, 3
    logits = torch.randn(B, N, Q, generator=gen)
    boxes = random_boxes(gen, B * N).view(B, N, 4)
    tgt = random_boxes(gen, B * M).view(B, M, 4)
    bv = torch.tensor([[True, True, False], [True, True, True]])
    labels = (torch.rand(B, M, Q, generator=gen) < 0.5).float()
    qv = torch.tensor([[True, False, True, True, False], [True, True, False, True, False]])

    def run(lg, lb):
        lg, bx = lg.clone().requires_grad_(True), boxes.clone().requires_grad_(True)
        loss, _ = detection_loss(lg, bx, tgt, bv, lb, qv)
        loss.backward()
        return loss, lg.grad, bx.grad

    base = run(logits, labels)
    other_logits, other_labels = logits.clone(), labels.clone()
    inv = ~qv[:, None, :].expand(B, N, Q)
    other_logits[inv] = torch.randn(int(inv.sum()), generator=gen) * 30  # large: would move the matching if used
    other_labels[~qv[:, None, :].expand(B, M, Q)] = 1.0
    changed = run(other_logits, other_labels)
    assert changed[0].item() == base[0].item()
    torch.testing.assert_close(changed[1], base[1], rtol=0, atol=0)
    torch.testing.assert_close(changed[2], base[2], rtol=0, atol=0)
    assert torch.all(base[1][inv] == 0) and base[1][~inv].abs().min() > 0


def two_image_batch():
    """Image 0: 1 box with 1 label; image 1: 3 boxes with 1 + 2 + 2 = 5 labels. Predictions near their targets."""
    tgt = torch.tensor(
        [
            [[0.3, 0.3, 0.2, 0.2], [0, 0, 0, 0], [0, 0, 0, 0]],
            [[0.25, 0.25, 0.2, 0.2], [0.75, 0.25, 0.2, 0.2], [0.5, 0.75, 0.3, 0.2]],
        ]
    )
    bv = torch.tensor([[True, False, False], [True, True, True]])
    labels = torch.zeros(2, 3, 3)
    labels[0, 0, 1] = 1
    labels[1, 0, 0] = 1
    labels[1, 1, [1, 2]] = 1
    labels[1, 2, [0, 2]] = 1
    qv = torch.ones(2, 3, dtype=torch.bool)
    gen = torch.Generator().manual_seed(7)
    boxes = torch.zeros(2, 4, 4)
    boxes[:, :3] = tgt + 0.02 * torch.randn(2, 3, 4, generator=gen)
    boxes[0, 1:3] = torch.tensor([[0.8, 0.8, 0.1, 0.1], [0.1, 0.9, 0.1, 0.1]])
    boxes[:, 3] = torch.tensor([0.9, 0.1, 0.1, 0.1])
    logits = 0.3 * torch.randn(2, 4, 3, generator=gen)
    return logits, boxes, tgt, bv, labels, qv


def per_image_sums(logits, boxes, tgt, labels):
    """Class, L1 and 1-GIoU sums per image, with prediction i matched to target i (checked by the caller)."""
    out = []
    for b, m in ((0, 1), (1, 3)):
        targets = torch.zeros(4, 3)
        targets[:m] = labels[b, :m]
        c = tvo.sigmoid_focal_loss(logits[b], targets, alpha=0.3, gamma=2.0, reduction="sum").item()
        src, dst = cxcywh_to_xyxy(boxes[b, :m]), cxcywh_to_xyxy(tgt[b, :m])
        l1 = (src - dst).abs().sum().item()
        g = (1 - tvo.generalized_box_iou(src, dst).diagonal()).sum().item()
        out.append((c, l1, g))
    return out


def test_per_image_and_global_normalisation():
    logits, boxes, tgt, bv, labels, qv = two_image_batch()
    for b, m in ((0, 1), (1, 3)):
        rows, cols = match(logits[b], boxes[b], tgt[b, :m], labels[b, :m], qv[b])
        assert rows.tolist() == cols.tolist() == list(range(m))
    (c0, l0, g0), (c1, l1, g1) = per_image_sums(logits, boxes, tgt, labels)
    _, per_image = detection_loss(logits, boxes, tgt, bv, labels, qv, normalizer="per_image")
    _, glob = detection_loss(logits, boxes, tgt, bv, labels, qv)  # "global" is the default
    assert per_image["class"].item() == pytest.approx((c0 / 1 + c1 / 5) / 2, rel=1e-5)
    assert per_image["l1"].item() == pytest.approx((l0 / 1 + l1 / 3) / 2, rel=1e-5)
    assert per_image["giou"].item() == pytest.approx((g0 / 1 + g1 / 3) / 2, rel=1e-5)
    assert glob["class"].item() == pytest.approx((c0 + c1) / 6, rel=1e-5)
    assert glob["l1"].item() == pytest.approx((l0 + l1) / 4, rel=1e-5)
    assert glob["giou"].item() == pytest.approx((g0 + g1) / 4, rel=1e-5)
    with pytest.raises(ValueError, match="normalizer"):
        detection_loss(logits, boxes, tgt, bv, labels, qv, normalizer="mean")


def test_global_normaliser_is_all_reduced_over_ranks(monkeypatch):
    batch = two_image_batch()
    loss, terms = detection_loss(*batch)
    calls = []

    def doubled(values):  # as if a second rank held the same counts
        calls.append(values.clone())
        return values * 2

    monkeypatch.setattr(distributed, "all_reduce_sum", doubled)
    halved, halved_terms = detection_loss(*batch)
    assert len(calls) == 1 and calls[0].tolist() == [6.0, 4.0]
    assert halved.item() == pytest.approx(loss.item() / 2, rel=1e-6)
    for key in terms:
        assert halved_terms[key].item() == pytest.approx(terms[key].item() / 2, rel=1e-6)
    # With a world size of 2 the all-reduced count is averaged back: per-rank loss unchanged (DETR's convention).
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    assert detection_loss(*batch)[0].item() == pytest.approx(loss.item(), rel=1e-6)


def test_loss_without_boxes_is_pure_negatives_and_keeps_the_graph():
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(2, 4, 3, generator=gen).requires_grad_(True)
    boxes = random_boxes(gen, 8).view(2, 4, 4).requires_grad_(True)
    loss, terms = detection_loss(
        logits,
        boxes,
        torch.zeros(2, 0, 4),
        torch.zeros(2, 0, dtype=torch.bool),
        torch.zeros(2, 0, 3),
        torch.ones(2, 3, dtype=torch.bool),
    )
    expected = tvo.sigmoid_focal_loss(logits.detach(), torch.zeros(2, 4, 3), alpha=0.3, gamma=2.0, reduction="sum")
    assert terms["class"].item() == pytest.approx(expected.item(), rel=1e-6)  # divided by max(0, 1) = 1
    assert terms["l1"].item() == 0 and terms["giou"].item() == 0
    loss.backward()
    assert boxes.grad is not None and torch.all(boxes.grad == 0)  # connected, so DDP sees every parameter used


def test_loss_rejects_mismatched_shapes():
    logits, boxes, tgt, bv, labels, qv = two_image_batch()
    with pytest.raises(ValueError, match="target_labels has shape"):
        detection_loss(logits, boxes, tgt, bv, labels[..., :2], qv)


def test_loss_with_the_model_backpropagates(owl):
    model = OwlViT.from_image_text(tiny_image_text())
    logits, boxes, tgt, bv, labels, qv = two_image_batch()
    queries = torch.nn.functional.normalize(torch.randn(2, 3, 16), dim=-1)
    out = model(torch.randn(2, 3, 48, 48), queries, qv, patch_size=24)
    loss, _ = detection_loss(out["logits"], out["boxes"], tgt, bv, labels, qv)
    loss.backward()
    assert math.isfinite(loss.item())
    assert model.box_head.mlp[-1].weight.grad.abs().sum() > 0
    assert model.class_head.shift.bias.grad.abs().sum() > 0
    assert losses.DEFAULT_WEIGHTS == {"class": 1.0, "l1": 1.0, "giou": 1.0}


def test_make_loss_queries_each_slot_with_its_class_prompt_and_reads_no_config():
    # One template, so the draw is fixed: each valid slot (b, q) must be queried with embed_text(names[queries[b, q]]),
    # whatever the slots' order; the invalid slot (class -1) contributes nothing. An independent path: embeddings.
    from tasks.detection import make_loss

    base = OwlViT.from_image_text(tiny_image_text())
    model = OwlViT(
        base.image, base.text, base.text_proj, 16, query_names=["cat", "dog", "bird", "fish"], train_templates=["{}"]
    )
    torch.nn.init.normal_(model.class_head.proj.weight, std=0.3)
    _, _, tgt, bv, labels, _ = two_image_batch()
    queries = torch.tensor([[3, 0, -1], [2, 0, 3]])
    qv = queries >= 0
    images = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(3))
    loss, terms = make_loss(None, None)(model, (images, tgt, bv, labels, queries, qv), 24, 0)
    with torch.no_grad():
        embeds = model.embed_text(model.tokenize(model.query_names))[queries.clamp(min=0)]  # (B, Q, E)
        out = model(images, embeds, qv, patch_size=24)
    want, want_terms = detection_loss(out["logits"], out["boxes"], tgt, bv, labels, qv)
    torch.testing.assert_close(loss.detach(), want, rtol=1e-6, atol=1e-6)
    assert terms.keys() == want_terms.keys() and loss.requires_grad

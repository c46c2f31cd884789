"""Shared loss pieces and the classification loss against hand computations: distillation, mixup, label smoothing,
the consistency term; the teacher's own view and normalisation (paper Sec. 3.5, FunMatch)."""

import math

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

import flexivit
from tasks import classification
from tasks.common.config import Config
from tasks.common.losses import distillation_loss, mix, mixed_cross_entropy, mixup_ratio, soft_cross_entropy
from tasks.common.transforms import ConsistentViews, InputRenormalization

LOGITS = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0]])
TEACHER = torch.tensor([[1.0, 0.0, -1.0], [-2.0, 0.5, 1.5]])


def test_distillation_loss_equals_a_hand_computation():
    want = 0.0
    for s_row, t_row in zip(LOGITS.tolist(), TEACHER.tolist(), strict=True):
        p = [math.exp(t) / sum(math.exp(v) for v in t_row) for t in t_row]
        log_q = [s - math.log(sum(math.exp(v) for v in s_row)) for s in s_row]
        want += -sum(pi * lq for pi, lq in zip(p, log_q, strict=True)) / len(LOGITS)
    assert distillation_loss(LOGITS, TEACHER).item() == pytest.approx(want, rel=1e-6)
    # KL(teacher || student) plus the teacher's entropy, which does not depend on the student.
    p = TEACHER.softmax(-1)
    kl = torch.nn.functional.kl_div(LOGITS.log_softmax(-1), p, reduction="batchmean")
    entropy = -(p * p.log()).sum(-1).mean()
    assert distillation_loss(LOGITS, TEACHER).item() == pytest.approx((kl + entropy).item(), rel=1e-6)


def test_soft_cross_entropy_over_valid_positions_of_a_dense_map():
    logits, target = torch.randn(2, 3, 4, 5), torch.rand(2, 3, 4, 5).softmax(1)
    valid = torch.rand(2, 4, 5) > 0.5
    per_pixel = -(target * logits.log_softmax(1)).sum(1)
    assert soft_cross_entropy(logits, target, dim=1, valid=valid).item() == pytest.approx(
        per_pixel[valid].mean().item(), rel=1e-6
    )


def test_mixup_and_label_smoothing_equal_soft_target_cross_entropy():
    images, labels = torch.randn(4, 3, 2, 2), torch.tensor([0, 2, 1, 2])
    (mixed,) = mix(0.7, images)
    torch.testing.assert_close(mixed[1], 0.7 * images[1] + 0.3 * images[2])  # each example with the reversed batch
    logits = torch.randn(4, 3)
    for ratio, smooth in [(None, 0.0), (None, 0.1), (0.7, 0.0), (0.7, 0.1)]:
        onehot = torch.nn.functional.one_hot(labels, 3).double()
        target = onehot if ratio is None else ratio * onehot + (1 - ratio) * onehot.flip(0)
        target = (1 - smooth) * target + smooth / 3  # smoothing spreads eps uniformly over the 3 classes
        want = -(target * logits.double().log_softmax(-1)).sum(-1).mean()
        got = mixed_cross_entropy(logits, labels, ratio, label_smoothing=smooth)
        assert got.item() == pytest.approx(want.item(), rel=1e-6), (ratio, smooth)


def test_mixup_ratio_is_a_beta_draw_from_the_seeded_global_rng():
    torch.manual_seed(5)
    got = [mixup_ratio(0.8) for _ in range(3)]
    torch.manual_seed(5)
    assert got == [torch.distributions.Beta(0.8, 0.8).sample().item() for _ in range(3)]
    draws = [mixup_ratio(0.8) for _ in range(2000)]
    assert np.mean(draws) == pytest.approx(0.5, abs=0.03) and np.var(draws) == pytest.approx(0.25 / 2.6, rel=0.15)


def config_for(**train):
    base = dict(mixup=0.0, label_smoothing=0.0, consistency=dict(weight=0.0, sizes=[]))
    return Config(seed=3, train={**base, **train}, distill=dict(patch_size=8))


def small_model():
    torch.manual_seed(0)
    return flexivit.create_model("flexivit_mu", depth=1, width=32, num_heads=2, base_patch_size=16, num_classes=3,
                                 head_zero_init=False)  # fmt: skip


def test_classification_consistency_term_matches_a_hand_computation():
    model, images, labels = small_model(), torch.randn(4, 3, 24, 24), torch.tensor([0, 1, 2, 1])
    config = config_for(consistency=dict(weight=0.5, sizes=[12, 6]))
    loss, terms = classification.make_loss(config, None)(model, (images, labels), 8, 7)
    other = flexivit.UniformSampler([12, 6], seed=config.seed + 1)(7)  # the second size: from (seed + 1, step)
    at_8, at_other = model(images, patch_size=8), model(images, patch_size=other)
    ce = torch.nn.functional.cross_entropy(at_8, labels)
    term = -(at_8.detach().softmax(-1) * at_other.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(terms["ce"], ce)
    torch.testing.assert_close(terms["consistency"], term)
    torch.testing.assert_close(loss, ce + 0.5 * term)
    loss.backward()  # the target is detached: the term's gradient flows through the second size only
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0


def test_distillation_gives_the_teacher_its_own_mixed_view():
    model, labels = small_model(), torch.tensor([0, 1, 2, 1])
    student, teacher_view = torch.randn(4, 3, 24, 24), torch.randn(4, 3, 32, 32)
    seen = {}

    def teacher(images, patch_size):
        seen["images"], seen["patch_size"] = images, patch_size
        return torch.randn(len(images), 3, generator=torch.Generator().manual_seed(0))

    torch.manual_seed(11)
    loss, terms = classification.make_loss(config_for(mixup=0.8), None, teacher)(
        model, (student, teacher_view, labels), 8, 0
    )
    torch.manual_seed(11)
    ratio = mixup_ratio(0.8)
    torch.testing.assert_close(seen["images"], ratio * teacher_view + (1 - ratio) * teacher_view.flip(0))
    assert seen["patch_size"] == 8 and set(terms) == {"distill"}
    (mixed,) = mix(ratio, student)
    torch.testing.assert_close(loss, distillation_loss(model(mixed, patch_size=8), teacher(seen["images"], 8)))


def test_consistent_views_are_one_crop_at_two_sizes():
    # An image whose pixel value is its column index: a view's mean column tells which region it shows.
    image = torch.arange(64, dtype=torch.uint8).repeat(64, 1)[None].expand(3, 64, 64).contiguous()
    views = ConsistentViews((24, 40), crop_scale=(0.1, 0.5), hflip=True, value_range=(0.0, 1.0))
    for seed in range(10):
        torch.manual_seed(seed)
        small, large = views(image)
        assert small.shape == (3, 24, 24) and large.shape == (3, 40, 40)
        assert small.mean().item() == pytest.approx(large.mean().item(), abs=1.5 / 255)  # the same region
        assert torch.sign(small[0, 0, -1] - small[0, 0, 0]) == torch.sign(large[0, 0, -1] - large[0, 0, 0])  # flip
        down = v2.functional.resize(large, [24, 24], antialias=True)
        assert (down - small).abs().mean().item() < 1.5 / 255


def test_teacher_renormalisation_equals_feeding_imagenet_statistics():
    teacher = small_model().eval()
    unit = torch.rand(2, 3, 24, 24)  # pixels in [0, 1]
    student_view = 2 * unit - 1  # the student's [-1, 1]
    imagenet = v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])(unit)
    wrapped = InputRenormalization(teacher, [-1.0, 1.0], "imagenet")
    with torch.no_grad():
        torch.testing.assert_close(wrapped(student_view, patch_size=12), teacher(imagenet, patch_size=12))
        torch.testing.assert_close(wrapped(student_view, patch_size=6), teacher(imagenet, patch_size=6))

"""The analyses across patch sizes (flexivit/analysis.py, tools/analyze.py): CKA, relevance, similarity, ensembles."""

import csv

import pytest
import torch
from markers import needs_fashion_mnist

import flexivit
from flexivit import analysis
from tools import analyze, train


def _model(**overrides):
    torch.manual_seed(0)
    kw = dict(depth=2, width=64, num_heads=2, base_patch_size=16, posemb_grid=7, num_classes=5, head_zero_init=False)
    return flexivit.create_model("flexivit_mu", **{**kw, **overrides}).eval()


def test_cka_of_a_representation_with_itself_and_an_orthogonal_transform_is_one():
    torch.manual_seed(0)
    x = torch.randn(100, 40)
    q, _ = torch.linalg.qr(torch.randn(40, 40))
    assert analysis.linear_cka(x, x) == pytest.approx(1.0, abs=1e-10)
    assert analysis.linear_cka(x, 3.0 * x @ q) == pytest.approx(1.0, abs=1e-10)  # invariant to rotation and scale
    assert analysis.linear_cka(x, torch.randn(100, 40)) < 0.6  # unrelated features are not similar
    cka = analysis.MinibatchCKA()
    for part in x.split(25):
        cka.update(part, part @ q)
    assert cka.value() == pytest.approx(1.0, abs=1e-10)


def test_linear_cka_equals_its_definition():
    torch.manual_seed(1)
    x, y = torch.randn(30, 8).double(), torch.randn(30, 5).double()
    h = torch.eye(30, dtype=torch.float64) - 1 / 30
    xc, yc = h @ x, h @ y  # for linear kernels CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)
    expected = (yc.T @ xc).norm() ** 2 / ((xc.T @ xc).norm() * (yc.T @ yc).norm())
    assert analysis.linear_cka(x, y) == pytest.approx(float(expected), rel=1e-10)


def test_minibatch_cka_agrees_with_the_full_batch_value():
    torch.manual_seed(0)
    x = torch.randn(2048, 50)
    y = x @ torch.randn(50, 30) + 2 * torch.randn(2048, 30)
    cka = analysis.MinibatchCKA()
    for i in range(0, 2048, 256):
        cka.update(x[i : i + 256], y[i : i + 256])
    # Stated tolerance (docs/analysis.md): 0.02 at 8 batches of 256; measured 0.006.
    assert abs(cka.value() - analysis.linear_cka(x, y)) < 0.02
    with pytest.raises(ValueError, match="at least 4"):
        cka.update(x[:3], y[:3])


def test_relevance_maps_sum_to_one_and_move_with_a_shifted_image():
    model = _model()
    with torch.no_grad():
        model.pos_embed.zero_()  # without position embeddings, shifting by whole patches permutes the tokens
    torch.manual_seed(0)
    image = torch.randn(2, 3, 48, 48)
    rel = analysis.attention_relevance(model, image, 8)
    assert rel.shape == (2, 6, 6)
    torch.testing.assert_close(rel.sum((1, 2)), torch.ones(2))
    assert (rel >= 0).all() and rel.std() > 0  # not uniform
    shifted = analysis.attention_relevance(model, image.roll(8, dims=-1), 8)  # one patch to the right
    torch.testing.assert_close(shifted, rel.roll(1, dims=-1), atol=1e-5, rtol=1e-4)
    rollout = analysis.attention_rollout(model, image, 8)
    torch.testing.assert_close(rollout.sum((1, 2)), torch.ones(2))
    torch.testing.assert_close(analysis.attention_rollout(model, image.roll(8, dims=-1), 8), rollout.roll(1, -1))
    # The forward is restored: the fused attention again, the same logits as before.
    with torch.no_grad():
        torch.testing.assert_close(model(image, patch_size=8), _model_logits(model, image))


def _model_logits(model, image):
    copy = _model()
    copy.load_state_dict(model.state_dict())
    return copy(image, patch_size=8)


def test_relevance_follows_the_chosen_class():
    model = _model()
    image = torch.randn(1, 3, 48, 48)
    maps = [analysis.attention_relevance(model, image, 12, target=[c]) for c in range(3)]
    assert not torch.allclose(maps[0], maps[1])  # another class, another gradient, another map


def test_token_similarity_is_one_at_the_seed_itself():
    model = _model()
    image = torch.randn(3, 3, 48, 48)
    same = analysis.token_similarity(model, image, 8, 8)
    assert same.shape == (6, 6) and same[3, 3] == pytest.approx(1.0, abs=1e-5)
    assert same.max() == pytest.approx(1.0, abs=1e-5) and same.min() < 0.99
    assert analysis.token_similarity(model, image, 8, 4).shape == (12, 12)


def test_ensemble_of_one_size_is_the_single_model():
    model = _model()
    image = torch.randn(4, 3, 48, 48)
    with torch.no_grad():
        single = model(image, patch_size=12)
        torch.testing.assert_close(analysis.ensemble_logits(model, image, [12]), single.log_softmax(-1))
        two = analysis.ensemble_logits(model, image, [12, 8]).exp()
        torch.testing.assert_close(two, (single.softmax(-1) + model(image, patch_size=8).softmax(-1)) / 2)


@needs_fashion_mnist
def test_analyze_command_writes_every_analysis(tmp_path):
    workdir = tmp_path / "run"
    train.main(["--config", "configs/classification/fashion_mnist.py:runlocal", "--workdir", str(workdir),
                "--set", "eval.final=False"])  # fmt: skip
    out = tmp_path / "analysis"
    analyze.main(["--workdir", str(workdir), "--num-images", "16", "--batch", "8", "--max-ensemble", "2",
                  "--out", str(out)])  # fmt: skip
    for name in ("cka_p12_vs_p8.png", "cka_p12_vs_p6.png", "attention.png", "similarity.png", "ensemble.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name
    with open(out / "ensemble.csv", newline="") as f:
        rows = {row["patch sizes"]: row for row in csv.DictReader(f)}
    assert set(rows) == {"12", "8", "6", "12+8", "12+6", "8+6"}
    assert float(rows["12+8"]["gflops"]) == pytest.approx(float(rows["12"]["gflops"]) + float(rows["8"]["gflops"]))
    # The cheapest size can afford only itself; a dearer single size may be beaten by a cheaper one, never the reverse.
    assert rows["12"]["best single within its GFLOPs"] == "12" and float(rows["12"]["ensemble - single"]) == 0.0
    assert all(float(rows[size]["ensemble - single"]) <= 0.0 for size in ("8", "6"))
    with open(out / "cka.csv", newline="") as f:
        cka = list(csv.DictReader(f))
    assert {row["kind"] for row in cka} == {"map", "cls"} and all(
        -0.01 <= float(r["cka same block"]) <= 1.01 for r in cka
    )
    assert "## CKA against patch 12" in (out / "analysis.md").read_text()


@pytest.mark.parametrize("name", ["none", "coarse_to_fine", "uniform_then_target"])
def test_curricula_spend_the_compute_of_the_fixed_run_and_end_at_the_target(name):
    from configs.classification import fashion_mnist_curriculum as cur
    from tasks.common.config import load_config

    config = load_config(f"configs/classification/fashion_mnist_curriculum.py:curriculum={name},target=8,budget=600")
    stages, steps = config.patch_sizes.stages, config.train.steps
    assert stages[-1][1] == {"kind": "fixed", "sizes": [8]} and config.eval.patch_sizes == [8]
    ends = [start for start, _ in stages[1:]] + [steps]
    spent = sum(
        (end - start) * sum(cur.step_flops(p, 8) for p in spec["sizes"]) / len(spec["sizes"])
        for (start, spec), end in zip(stages, ends, strict=True)
    )
    assert spent == pytest.approx(600 * cur.step_flops(8, 8), rel=0.01)  # equal compute, up to rounding of steps
    sampler = flexivit.build_sampler(**config.patch_sizes)
    assert sampler(steps - 1) == 8 and (name == "none" or sampler(0) != 8)


def test_analyze_reads_a_segmentation_backbone(tmp_path):
    workdir = tmp_path / "seg"
    train.main(["--config", "configs/segmentation/scenes.py:runlocal", "--workdir", str(workdir),
                "--set", "train.steps=2", "eval.final=False"])  # fmt: skip
    out = tmp_path / "analysis"
    analyze.main(["--workdir", str(workdir), "--what", "cka", "attention", "similarity", "--patch-sizes", "16", "8",
                  "--num-images", "8", "--batch", "4", "--out", str(out)])  # fmt: skip
    text = (out / "analysis.md").read_text()
    assert "attention rollout (no head)" in text  # Segmenter's backbone has no classification head
    assert (out / "cka_p16_vs_p8.png").exists() and (out / "similarity.png").exists()
    with pytest.raises(SystemExit, match="the segmentation backbone has no class head"):
        analyze.main(["--workdir", str(workdir), "--what", "ensemble", "--out", str(out)])

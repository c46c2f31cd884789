"""The task contract of classification, contrastive and segmentation: the loss made once from the config, models
rebuilt from a training checkpoint alone (bit for bit), and predictions on users' images of any size whose answer is
known because the head was set by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import flexivit
import tasks
from tasks import classification, contrastive, segmentation
from tasks.common.config import Config, load_config
from tasks.common.train_state import save_train_state
from tasks.common.transforms import data_eval_transform
from tasks.segmentation.inference import InferenceSettings
from tasks.segmentation.inference import predict as predict_scores
from tasks.segmentation.model import Segmenter

CLASSES = ["shirt", "bag", "shoe"]
CONTRASTIVE = "configs/contrastive/fashion_mnist.py:runlocal"


def user_images() -> list[Image.Image]:
    """Two RGB images of different sizes and aspect ratios, as a user would give them."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)) for h, w in [(37, 45), (60, 28)]]


def classifier() -> flexivit.FlexiViT:
    torch.manual_seed(0)
    return flexivit.create_model("flexivit_mu", depth=1, width=32, num_heads=2, base_patch_size=16,
                                 num_classes=len(CLASSES), head_zero_init=False).eval()  # fmt: skip


def classification_config(**data) -> Config:
    return Config(task="classification", seed=0, data=dict(image_size=24, eval_crop_ratio=0.875,
                                                            value_range=[-1.0, 1.0], **data))  # fmt: skip


def save_checkpoint(workdir, model, config, info):
    """A training checkpoint as the engine writes it (weights changed from any fresh model's, so that equal outputs
    after loading prove the weights were loaded)."""
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return save_train_state(workdir, 2, model, optimizer, scheduler, scaler, config, info=info)


# ------------------------------------------------------------------------------------------------ the contract


def test_each_task_declares_the_engine_features_its_loss_honours():
    assert tasks.get_task("classification").engine_features == {"consistency", "distill", "mixup"}
    assert tasks.get_task("segmentation").engine_features == {"consistency"}
    assert tasks.get_task("contrastive").engine_features == set()
    assert all(tasks.get_task(name).export_refusal == "" for name in ("classification", "contrastive", "segmentation"))
    train = dict(mixup=0.0, consistency=dict(weight=0.0, sizes=[]))
    with pytest.raises(tasks.TaskError, match="task contrastive does not support distill"):
        tasks.check_engine_features(contrastive.TASK, Config(train=train, distill=dict(patch_size=8)))
    with pytest.raises(tasks.TaskError, match="task segmentation does not support train.mixup"):
        tasks.check_engine_features(segmentation.TASK, Config(train={**train, "mixup": 0.2}, distill=None))
    tasks.check_engine_features(classification.TASK, Config(train={**train, "mixup": 0.2}, distill=dict(a=1)))


# ------------------------------------------------------------------------------------------------ classification


def test_classification_loss_is_cross_entropy_of_the_net_and_reads_the_config_once():
    model, images, labels = classifier().train(), torch.randn(4, 3, 24, 24), torch.tensor([0, 1, 2, 1])
    config = Config(seed=3, train=dict(mixup=0.0, label_smoothing=0.0, consistency=dict(weight=0.0, sizes=[])))
    loss_fn = classification.make_loss(config, CLASSES)
    config.train.update(label_smoothing=0.5, mixup=0.8)  # after make_loss: no effect on the loss already made
    loss, terms = loss_fn(model, (images, labels), 8, 0)
    assert set(terms) == {"ce"} and terms["ce"] is loss
    assert torch.equal(loss, F.cross_entropy(model(images, patch_size=8), labels))
    smoothed = classification.make_loss(Config(config, train={**config.train, "mixup": 0.0}), CLASSES)
    want = F.cross_entropy(model(images, patch_size=8), labels, label_smoothing=0.5)
    torch.testing.assert_close(smoothed(model, (images, labels), 8, 0)[0], want, rtol=0, atol=0)


def test_classification_predicts_the_top_classes_of_images_of_any_size():
    model, config = classifier(), classification_config()
    with torch.no_grad():  # a head that ignores the image: the answer is softmax(bias) for every image
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([0.0, 3.0, 1.0]))
    images = user_images()
    predictions = classification.predict(model, config, CLASSES, images, 8, {})
    probs = torch.tensor([0.0, 3.0, 1.0]).softmax(-1)
    for prediction in predictions:
        assert [t["class"] for t in prediction.record["top"]] == ["bag", "shoe", "shirt"]  # default top 3
        assert [t["prob"] for t in prediction.record["top"]] == pytest.approx(probs[[1, 2, 0]].tolist(), abs=1e-6)
        assert prediction.summary == f"bag {probs[1]:.2f}, shoe {probs[2]:.2f}, shirt {probs[0]:.2f}"
        assert prediction.image is None and prediction.legend is None
    assert len(classification.predict(model, config, CLASSES, images, 8, {"topk": 1})[0].record["top"]) == 1


def test_classification_predict_preprocesses_as_the_validation_images_at_the_patch_size():
    model, config, images = classifier(), classification_config(), user_images()
    transform = data_eval_transform(config.data)
    for patch in (8, (12, 6)):
        predictions = classification.predict(model, config, CLASSES, images, patch, {"topk": 3})
        with torch.no_grad():
            probs = model(torch.stack([transform(i) for i in images]), patch_size=patch).softmax(-1)
        for prediction, p in zip(predictions, probs, strict=True):
            order = p.argsort(descending=True).tolist()
            assert [t["class"] for t in prediction.record["top"]] == [CLASSES[i] for i in order]
            assert [t["prob"] for t in prediction.record["top"]] == pytest.approx(p[order].tolist(), abs=1e-6)


def test_classification_load_model_and_load_run_round_trip_bit_for_bit(tmp_path):
    model, config = classifier(), classification_config()
    checkpoint = save_checkpoint(tmp_path, model, config, CLASSES)
    images = torch.randn(2, 3, 24, 24)
    run = tasks.load_run(tmp_path)  # the workdir alone: no dataset
    assert run.task is classification.TASK and run.info == CLASSES
    for loaded in (classification.load_model(checkpoint), run.model):
        with torch.no_grad():
            for patch in (8, 6):
                assert torch.equal(loaded(images, patch_size=patch), model(images, patch_size=patch))


def test_classification_load_model_refuses_another_tasks_checkpoint(tmp_path):
    save_checkpoint(tmp_path, tiny_segmenter(), Config(seed=0), ["a", "b"])
    with pytest.raises(flexivit.CheckpointError, match="not a classification checkpoint"):
        classification.load_model(tmp_path)


# ------------------------------------------------------------------------------------------------ contrastive


@pytest.fixture(scope="module")
def lit_model():
    config = load_config(CONTRASTIVE)
    torch.manual_seed(0)
    return contrastive.build_model(config.model).eval(), config


def test_contrastive_ranks_the_query_whose_embedding_matches_the_image_first(lit_model):
    model, config = lit_model
    images, queries = user_images(), ["a dark coat", "a light bag", "a sneaker"]
    transform = data_eval_transform(config.data)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        e = model.encode_image(torch.stack([transform(i) for i in images]), 8, normalize=True)  # (2, D)
        targets = torch.stack([e[0], e[1], -F.normalize(e[0] + e[1], dim=0)])  # q0 -> image 0, q1 -> image 1
        text = model.text(model.tokenize(queries))  # (3, width)
        model.text_proj.weight.copy_(targets.T @ torch.linalg.pinv(text.T))  # text_proj(text[i]) = targets[i]
    try:
        predictions = contrastive.predict(model, config, {"classnames": []}, images, 8, {"queries": queries})
    finally:
        model.load_state_dict(state)
    first, second = (p.record["top"] for p in predictions)
    assert [t["query"] for t in first] == ["a dark coat", "a light bag", "a sneaker"]
    assert [t["query"] for t in second] == ["a light bag", "a dark coat", "a sneaker"]
    assert first[0]["similarity"] == pytest.approx(1.0, abs=1e-4)
    assert first[1]["similarity"] == pytest.approx(float(e[0] @ e[1]), abs=1e-4)
    assert predictions[0].summary.startswith("'a dark coat' 1.000, 'a light bag'")


def test_contrastive_default_queries_are_the_zero_shot_class_prompts(lit_model):
    model, config = lit_model
    info = {"classnames": CLASSES}
    prompts = [config.data.zeroshot.templates[0].format(name) for name in CLASSES]
    assert contrastive.class_prompts(config, info) == prompts
    predictions = contrastive.predict(model, config, info, user_images(), 12, {"topk": 2})
    assert all(len(p.record["top"]) == 2 and {t["query"] for t in p.record["top"]} <= set(prompts) for p in predictions)
    no_zeroshot = Config(config, data={**config.data, "zeroshot": None})
    assert contrastive.class_prompts(no_zeroshot, info) == CLASSES  # no templates: the names as they are
    with pytest.raises(ValueError, match="--queries"):
        contrastive.predict(model, no_zeroshot, {"classnames": []}, user_images(), 12, {})


def test_contrastive_image_forward_is_the_normalised_image_embedding(lit_model):
    model, _ = lit_model
    images = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        out = contrastive.TASK.image_forward(model)(images, patch_size=8)
        assert torch.equal(out, model.encode_image(images, 8, normalize=True))
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2))


def test_contrastive_load_model_rebuilds_both_towers_bit_for_bit(tmp_path):
    config = load_config(f"{CONTRASTIVE},mode=clip,loss=sigmoid")
    torch.manual_seed(0)
    model = contrastive.build_model(config.model).eval()
    info = {"classnames": CLASSES}
    save_checkpoint(tmp_path, model, config, info)
    run = tasks.load_run(tmp_path)
    loaded = run.model
    assert run.info == info and loaded.kwargs == model.kwargs and loaded.logit_bias is not None
    images, tokens = torch.randn(2, 3, 24, 24), model.tokenize(["a bag", "a dark coat"])
    with torch.no_grad():
        assert torch.equal(loaded(images, tokens, patch_size=6)["image_features"],
                           model(images, tokens, patch_size=6)["image_features"])  # fmt: skip
        assert torch.equal(loaded.encode_text(tokens), model.encode_text(tokens))
        assert torch.equal(loaded.logit_bias, model.logit_bias) and torch.equal(loaded.logit_scale, model.logit_scale)
    records = [[p.record for p in contrastive.predict(m, config, info, user_images(), 8, {})] for m in (model, loaded)]
    assert records[0] == records[1]
    with pytest.raises(flexivit.CheckpointError, match="not a contrastive checkpoint"):
        contrastive.load_model(save_checkpoint(tmp_path / "cls", classifier(), config, CLASSES))


# ------------------------------------------------------------------------------------------------ segmentation


def tiny_segmenter(num_classes: int = 2, **inference) -> Segmenter:
    torch.manual_seed(0)
    backbone = flexivit.FlexiViT(width=32, depth=1, num_heads=2, base_patch_size=16, posemb_grid=4, patch_size=8)
    return Segmenter(backbone=backbone, num_classes=num_classes, inference=InferenceSettings(**inference)).eval()


def segmentation_config(test_scale=None) -> Config:
    return Config(task="segmentation", seed=0, data=dict(test_scale=test_scale, value_range=[-1.0, 1.0]))


def test_segmentation_mask_is_the_palette_colour_of_the_argmax_at_the_input_size():
    model, names = tiny_segmenter(num_classes=4), ["sky", "road", "car", "tree"]
    images = user_images()
    colours = segmentation.palette(4)
    assert len({tuple(c) for c in colours}) == 4  # distinct
    for test_scale in (None, [40, 20]):  # as they are, and resized to fit 40x20 (the mask is still at the input size)
        config = segmentation_config(test_scale)
        predictions = segmentation.predict(model, config, names, images, 8, {})
        for image, prediction in zip(images, predictions, strict=True):
            assert prediction.image.size == image.size and prediction.overlay
            x = segmentation.EvalTransform(scale=test_scale and tuple(test_scale), value_range=[-1.0, 1.0])
            with torch.no_grad():
                scores = predict_scores(model, x.image(image)[None], 8, model.inference, (image.height, image.width))
            labels = scores.argmax(1)[0].numpy()
            np.testing.assert_array_equal(np.asarray(prediction.image), colours[labels])
            present, counts = np.unique(labels, return_counts=True)
            want = {names[c]: n / labels.size for c, n in zip(present, counts, strict=True)}
            assert prediction.record["classes"] == pytest.approx(want)
            assert list(prediction.record["classes"]) == sorted(want, key=lambda n: -want[n])  # largest first
            assert prediction.legend.height == 20 * len(want)


def test_segmentation_with_a_hand_set_decoder_paints_one_class_and_its_legend():
    model, names = tiny_segmenter(num_classes=3, mode="slide", crop=24, stride=16), ["sky", "road", "car"]
    with torch.no_grad():  # every pixel is "car"
        model.decoder.head.weight.zero_()
        model.decoder.head.bias.copy_(torch.tensor([0.0, 1.0, 5.0]))
    predictions = segmentation.predict(model, segmentation_config(), names, user_images(), (8, 6), {})
    car = segmentation.palette(3)[2]
    for image, prediction in zip(user_images(), predictions, strict=True):
        assert prediction.record == {"classes": {"car": 1.0}} and prediction.summary == "car 100%"
        assert (np.asarray(prediction.image) == car).all() and prediction.image.size == image.size
        legend = np.asarray(prediction.legend)
        assert legend.shape[0] == 20 and (legend[10, 10] == car).all()  # the swatch, then the name in black
        assert (legend[:, 24:] < 100).any()


def test_segmentation_load_run_round_trips_bit_for_bit(tmp_path):
    model = tiny_segmenter(num_classes=3, flip=True)
    save_checkpoint(tmp_path, model, segmentation_config(), ["sky", "road", "car"])
    run = tasks.load_run(tmp_path)
    assert run.task is segmentation.TASK and run.info == ["sky", "road", "car"]
    images = torch.randn(2, 3, 30, 26)
    with torch.no_grad():
        assert torch.equal(run.model(images, patch_size=7), model(images, patch_size=7))

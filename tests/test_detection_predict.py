"""Detection through the task contract on a user's images: ``TASK.predict`` (eval preprocessing, boxes back in each
original image's pixels, threshold, class-wise NMS, top-k, free-text vs default queries, the drawn picture),
``TASK.image_forward`` under ``torch.export`` at one patch size, and a checkpoint alone predicting like its model."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import flexivit
from tasks import Prediction, get_task
from tasks.common.config import Config
from tasks.contrastive.model import build_text_tower
from tasks.detection import OwlViT
from tasks.detection.inference import PALETTE, draw_detections

TASK = get_task("detection")
S = 48  # data.image_size: the padded square
EVAL_TEMPLATES = ["a photo of a {}.", "the {}."]
CONFIG = Config(task="detection", data=dict(image_size=S, value_range=[-1.0, 1.0], eval_templates=EVAL_TEMPLATES))


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _normalised(xywh, hw) -> list[float]:
    """Pixel [x, y, w, h] of an (h, w) image -> normalised cxcywh of the padded S x S square (eval's resize)."""
    scale = S / max(hw)
    x, y, w, h = (v * scale / S for v in xywh)
    return [x + w / 2, y + h / 2, w, h]


class Planned(torch.nn.Module):
    """A stand-in OWL-ViT whose outputs are planned per image, in pixels of the original image: token 0 the target
    box for query 1 (0.95), token 1 a shifted duplicate of it for query 1 (0.90, IoU ~0.8), token 2 the target box
    for query 0 (0.80), token 3 a box in the padding (0.99), token 4 a box below the threshold (0.05)."""

    def __init__(self, plans, query_names=("cat", "dog")):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))  # predict reads the device from the parameters
        self.plans, self.query_names, self.calls, self.prompts, self.inputs = plans, list(query_names), 0, [], []

    def embed_prompts(self, names, templates, device):
        self.prompts.append((list(names), list(templates)))
        return torch.zeros(len(names), 4, device=device)

    def forward(self, images, query_embeds, query_valid=None, patch_size=None):
        hw, target, padding = self.plans[self.calls]
        self.calls += 1
        self.inputs.append((images.clone(), patch_size))
        x, y, w, h = target
        rows = [(target, 1, 0.95), ([x + 2, y + 2, w, h], 1, 0.90), (target, 0, 0.80), (padding, 0, 0.99)]
        rows.append(([0, 0, w, h], 0, 0.05))
        logits = torch.full((1, 8, query_embeds.shape[0]), -20.0)
        boxes = torch.full((1, 8, 4), 0.5)
        for token, (box, query, score) in enumerate(rows):
            boxes[0, token] = torch.tensor(_normalised(box, hw))
            logits[0, token, query] = _logit(score)
        return {"logits": logits, "boxes": boxes}


# (h, w) of the originals: one landscape (padded below), one portrait (padded on the right).
PLANS = [
    ((60, 90), [9.0, 6.0, 30.0, 45.0], [10.0, 70.0, 20.0, 15.0]),
    ((100, 40), [4.0, 50.0, 30.0, 40.0], [50.0, 10.0, 20.0, 20.0]),
]


def _images(fill=255) -> list[Image.Image]:
    return [Image.new("RGB", (w, h), (fill, fill, fill)) for (h, w), _, _ in PLANS]


def test_known_boxes_come_back_in_each_originals_pixels_after_threshold_and_classwise_nms():
    model = Planned(PLANS)
    predictions = TASK.predict(model, CONFIG, None, _images(), (8, 16), {"queries": ["a bag", "a shoe"]})
    assert len(predictions) == 2 and all(isinstance(p, Prediction) for p in predictions)
    for prediction, ((h, w), target, _) in zip(predictions, PLANS, strict=True):
        detections = prediction.record["detections"]
        # The duplicate (same query) is suppressed; the same box for the other query stays (class-wise NMS); the
        # box in the padding and the one under 0.1 are gone.
        assert [(d["label"], d["category_id"]) for d in detections] == [("a shoe", 1), ("a bag", 0)]
        assert [d["score"] for d in detections] == pytest.approx([0.95, 0.80], abs=1e-6)
        for d in detections:
            np.testing.assert_allclose(d["bbox"], target, atol=0.011)  # rounded to 0.01 px
        assert prediction.summary == "2 boxes: a shoe 0.95, a bag 0.80"
        assert prediction.record["queries"] == ["a bag", "a shoe"]
        assert json.loads(json.dumps(prediction.record)) == prediction.record
        assert prediction.image.size == (w, h) and not prediction.overlay
    # Free-text queries are used as written; the model ran at the given patch size on eval-preprocessed squares:
    # white pixels at 1 and the bottom / right padding at the value range's 0, i.e. -1.
    assert model.prompts == [(["a bag", "a shoe"], ["{}"])]
    (landscape, patch), (portrait, _) = model.inputs
    assert patch == (8, 16) and landscape.shape == portrait.shape == (1, 3, S, S)
    assert landscape[0, :, :32].eq(1).all() and landscape[0, :, 32:].eq(-1).all()  # 60x90 -> 32x48
    assert portrait[0, :, :, :19].eq(1).all() and portrait[0, :, :, 19:].eq(-1).all()  # 100x40 -> 48x19


def test_default_queries_are_the_class_names_with_the_evaluation_templates():
    model = Planned(PLANS)
    predictions = TASK.predict(model, CONFIG, {"classnames": ["cat", "dog"]}, _images(), 16, {})
    assert model.prompts == [(["cat", "dog"], EVAL_TEMPLATES)]
    assert [d["label"] for d in predictions[0].record["detections"]] == ["dog", "cat"]
    assert predictions[0].record["queries"] == ["cat", "dog"]


@pytest.mark.parametrize(
    "options, expected",
    [
        ({"topk": 1}, [0.95]),
        ({"score_threshold": 0.85}, [0.95]),
        ({"nms_iou": 1.0}, [0.95, 0.90, 0.80]),  # nothing suppressed: the duplicate is back
        ({"score_threshold": 0.01, "nms_iou": 1.0}, [0.95, 0.90, 0.80, 0.05]),  # the padding box stays out
    ],
)
def test_options_threshold_nms_and_topk(options, expected):
    predictions = TASK.predict(Planned(PLANS), CONFIG, None, _images()[:1], 16, options)
    assert [d["score"] for d in predictions[0].record["detections"]] == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    "options, match",
    [({"queries": []}, "queries"), ({"queries": ["a bag", " "]}, "queries"), ({"score_threshold": 1.5}, "score"),
     ({"nms_iou": 0}, "nms_iou"), ({"topk": 0}, "topk"), ({"topk": 2.5}, "topk")],
)  # fmt: skip
def test_bad_options_are_named(options, match):
    with pytest.raises(ValueError, match=match):
        TASK.predict(Planned(PLANS), CONFIG, None, _images()[:1], 16, options)


def test_no_box_above_the_threshold_says_so():
    prediction = TASK.predict(Planned(PLANS), CONFIG, None, _images()[:1], 16, {"score_threshold": 0.99})[0]
    assert prediction.record["detections"] == [] and prediction.summary == "0 boxes scoring >= 0.99"
    assert np.array_equal(np.asarray(prediction.image), np.asarray(_images()[0]))


def test_drawn_boxes_change_the_picture_only_on_their_outline_and_label():
    image = Image.new("RGB", (120, 100), (90, 90, 90))
    detection = {"bbox": [30.0, 40.0, 50.0, 40.0], "score": 0.5, "category_id": 0, "label": "a bag"}
    drawn = draw_detections(image, [detection])
    assert drawn.size == image.size and np.asarray(image).max() == 90  # the input is left as it was
    changed = (np.asarray(drawn) != np.asarray(image)).any(-1)  # (H, W)
    ys, xs = changed.nonzero()
    assert tuple(np.asarray(drawn)[60, 30]) == PALETTE[0] and tuple(np.asarray(drawn)[79, 55]) == PALETTE[0]
    assert xs.min() == 30 and ys.max() == 79 and xs.max() < 120  # left / bottom edges, the label may run right
    inside_box = (ys >= 40) & (ys < 80)
    assert xs[inside_box].max() == 79  # right edge of the box
    assert not changed[43:77, 33:77].any()  # the interior shows the image
    assert changed[:40].any() and not changed[:40, :30].any()  # the label sits above the box, from its left edge
    assert not changed[80:].any()


def _tiny_owl() -> OwlViT:
    torch.manual_seed(0)
    image = flexivit.create_model("flexivit_mu", depth=1, width=32, num_heads=2, num_classes=0)
    text = build_text_tower("openclip", width=32, layers=1, heads=2, context_length=16)
    model = OwlViT(image, text, torch.nn.Linear(32, 32, bias=False), 32, objectness=True, query_names=["cat", "dog"])
    torch.nn.init.normal_(model.class_head.proj.weight, std=0.3)
    return model.eval()


def _photos() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((60, 90), (130, 37))]


@pytest.mark.parametrize("patch", [16, (8, 16)])
def test_a_real_model_predicts_inside_each_image(patch):
    photos = _photos()
    options = {"score_threshold": 0.0, "topk": 7, "queries": ["a bag", "a shoe", "a hat"]}
    for photo, prediction in zip(photos, TASK.predict(_tiny_owl(), CONFIG, None, photos, patch, options), strict=True):
        w, h = photo.size
        detections = prediction.record["detections"]
        assert len(detections) == 7 and prediction.summary.startswith("7 boxes: ")
        scores = [d["score"] for d in detections]
        assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
        for d in detections:
            x, y, bw, bh = d["bbox"]
            assert x >= 0 and y >= 0 and bw > 0 and bh > 0 and x + bw <= w + 0.01 and y + bh <= h + 0.01
            assert d["label"] == ["a bag", "a shoe", "a hat"][d["category_id"]]
        assert prediction.image.size == photo.size and prediction.image.mode == "RGB"


def test_a_checkpoint_alone_predicts_like_the_model_that_wrote_it(tmp_path):
    from tasks.common.train_state import save_train_state

    model = _tiny_owl()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    info = {"classnames": ["cat", "dog"], "train_templates": list(model.train_templates)}
    path = save_train_state(tmp_path, 1, model, optimizer, scheduler, scaler, CONFIG, info=info)
    loaded = TASK.load_model(path).eval()
    options = {"score_threshold": 0.0, "topk": 5}
    want = TASK.predict(model, CONFIG, info, _photos(), 8, options)
    got = TASK.predict(loaded, CONFIG, info, _photos(), 8, options)
    assert [p.record for p in got] == [p.record for p in want]  # default queries: the stored class names
    assert [np.asarray(p.image).tobytes() for p in got] == [np.asarray(p.image).tobytes() for p in want]


def test_image_forward_exports_at_one_patch_size_with_the_queries_as_constants():
    assert TASK.export_refusal == ""
    model = _tiny_owl()
    fixed = copy.deepcopy(model)
    fixed.image = flexivit.fix_patch_size(fixed.image, (8, 16), (32, 48))
    text_calls = []
    fixed.text.register_forward_hook(lambda *args: text_calls.append(1))

    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model, self.forward_fn = fixed, TASK.image_forward(fixed)

        def forward(self, images):
            return self.forward_fn(images, patch_size=(8, 16))

    wrapper = Fixed().eval()
    assert len(text_calls) == 1  # the queries were embedded once, when image_forward was made
    example = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    with torch.enable_grad():
        program = torch.export.export(
            wrapper, (example,), dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1, max=64)}}
        )
    assert len(text_calls) == 1  # nor traced into the graph
    images = torch.randn(3, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    exported = program.module()(images)
    with torch.no_grad():
        flexible = TASK.image_forward(model)(images, patch_size=(8, 16))  # the flexible model at that size
    assert set(exported) == {"logits", "boxes", "objectness"} and exported["logits"].shape == (3, 12, 2)
    for key, value in flexible.items():
        torch.testing.assert_close(exported[key], value)

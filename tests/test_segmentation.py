"""Semantic segmentation: metrics against independent computations and mmseg, the decoder at any patch size,
sliding-window inference, readers of the real layouts, the joint train transform, and the task's evaluator."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from markers import needs_fashion_mnist
from PIL import Image

import flexivit
from tasks import segmentation
from tasks.common.dense import tokens_to_map
from tasks.segmentation import data as seg_data
from tasks.segmentation.inference import InferenceSettings, predict, slide_logits, window_boxes
from tasks.segmentation.metrics import confusion_matrix, segmentation_metrics
from tasks.segmentation.model import LinearDecoder, Segmenter
from tasks.segmentation.transforms import TrainTransform, rescale_size

LABELME_VOC = Path("/usr/share/doc/labelme-examples/examples/semantic_segmentation/data_dataset_voc")


def tiny_segmenter(num_classes: int = 5, **inference) -> Segmenter:
    torch.manual_seed(0)
    backbone = flexivit.FlexiViT(width=32, depth=1, num_heads=2, base_patch_size=16, posemb_grid=4, patch_size=8)
    return Segmenter(backbone=backbone, num_classes=num_classes, inference=InferenceSettings(**inference)).eval()


def random_labels(rng, shape, num_classes, ignore_fraction=0.2, absent=()):
    labels = rng.integers(0, num_classes, size=shape)
    for c in absent:
        labels[labels == c] = (c + 1) % num_classes
    labels[rng.random(shape) < ignore_fraction] = 255
    return torch.from_numpy(labels)


# ------------------------------------------------------------------------------------------------------ metrics


def independent_metrics(preds, labels, num_classes):
    """Per class, straight from the definitions, with plain numpy and no confusion matrix."""
    iou, acc = [], []
    correct = labelled = 0
    for c in range(num_classes):
        inter = union = gt = 0
        for p, t in zip(preds, labels, strict=True):
            p, t = p.numpy(), t.numpy()
            valid = t != 255
            inter += np.sum((p == c) & (t == c) & valid)
            union += np.sum(((p == c) | (t == c)) & valid)
            gt += np.sum((t == c) & valid)
        iou.append(inter / union if union else np.nan)
        acc.append(inter / gt if gt else np.nan)
    for p, t in zip(preds, labels, strict=True):
        valid = t != 255
        correct += int((p[valid] == t[valid]).sum())
        labelled += int(valid.sum())
    return np.array(iou), np.array(acc), correct / labelled


def test_metrics_match_an_independent_computation_with_ignored_pixels():
    rng = np.random.default_rng(0)
    k = 6
    # Class 4 is never labelled (IoU 0 where predicted, Acc undefined); class 5 is neither labelled nor predicted.
    labels = [random_labels(rng, (17, 23), k, absent=(4, 5)) for _ in range(3)]
    preds = [torch.from_numpy(rng.integers(0, 5, size=(17, 23))) for _ in range(3)]
    confusion = sum(confusion_matrix(p, t, k) for p, t in zip(preds, labels, strict=True))
    ours = segmentation_metrics(confusion, [f"c{i}" for i in range(k)])
    iou, acc, aacc = independent_metrics(preds, labels, k)
    np.testing.assert_allclose(list(ours["IoU"].values()), iou, rtol=1e-12)
    np.testing.assert_allclose(list(ours["Acc"].values()), acc, rtol=1e-12)
    assert ours["IoU"]["c4"] == 0.0 and np.isnan(ours["Acc"]["c4"]) and np.isnan(ours["IoU"]["c5"])
    assert ours["mIoU"] == pytest.approx(np.nanmean(iou), abs=1e-12)
    assert ours["mAcc"] == pytest.approx(np.nanmean(acc), abs=1e-12)
    assert ours["aAcc"] == pytest.approx(aacc, abs=1e-12)
    perfect = segmentation_metrics(sum(confusion_matrix(t.clone(), t, k) for t in labels))
    assert perfect["mIoU"] == perfect["aAcc"] == perfect["mAcc"] == 1.0


def test_metrics_match_mmseg_iou_metric():
    # Skips only when mmseg cannot be imported; any other error (e.g. an mmcv version mmseg rejects) fails.
    try:
        from mmseg.evaluation import IoUMetric
    except ImportError as e:
        pytest.skip(f"mmsegmentation is not importable ({e}); install: bash tools/install_mmseg.sh")
    rng = np.random.default_rng(1)
    k = 8
    # Class 6 is predicted but never labelled (IoU 0, Acc NaN); class 7 is neither (both NaN).
    labels = [random_labels(rng, (31, 29), k, absent=(6, 7)) for _ in range(4)]
    preds = [torch.from_numpy(rng.integers(0, k - 1, size=(31, 29))) for _ in range(4)]
    metric = IoUMetric(iou_metrics=["mIoU"])
    metric.dataset_meta = {"classes": [f"c{i}" for i in range(k)]}
    metric.process({}, [{"pred_sem_seg": {"data": p[None]}, "gt_sem_seg": {"data": t[None]}}
                        for p, t in zip(preds, labels, strict=True)])  # fmt: skip
    theirs = metric.compute_metrics(metric.results)  # percentages rounded to 2 decimals
    ours = segmentation_metrics(sum(confusion_matrix(p, t, k) for p, t in zip(preds, labels, strict=True)))
    for key in ("aAcc", "mIoU", "mAcc"):
        assert theirs[key] == pytest.approx(round(100 * ours[key], 2), abs=1e-4), key  # mmseg: float32, 2 decimals
    # Per class and unrounded, from the areas mmseg accumulated (float32 histograms: exact for these counts).
    areas = [sum(r[i] for r in metric.results) for i in range(4)]
    per_class = IoUMetric.total_area_to_metrics(*areas, metrics=["mIoU"])
    np.testing.assert_allclose(list(ours["IoU"].values()), per_class["IoU"], rtol=1e-6)
    np.testing.assert_allclose(list(ours["Acc"].values()), per_class["Acc"], rtol=1e-6)
    assert per_class["IoU"][6] == ours["IoU"]["6"] == 0.0 and np.isnan(ours["Acc"]["6"]) and np.isnan(ours["IoU"]["7"])


def test_confusion_matrix_names_labels_outside_the_classes():
    with pytest.raises(ValueError, match=r"labels \[7\] are outside 0..4"):
        confusion_matrix(torch.zeros(2, 2, dtype=torch.long), torch.tensor([[0, 7], [255, 1]]), 5)


# ------------------------------------------------------------------------------------------------------ model


@pytest.mark.parametrize("patch", [8, 7, 10, 16, (6, 9), 64])
def test_logits_have_the_input_size_for_patch_sizes_that_do_not_divide_it(patch):
    model = tiny_segmenter(num_classes=4)
    images = torch.randn(2, 3, 45, 50)
    logits = model(images, patch_size=patch)
    assert logits.shape == (2, 4, 45, 50) and torch.isfinite(logits).all()
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    features = model.backbone.forward_features(F.pad(images, (0, -50 % pw, 0, -45 % ph)), patch)
    assert features["grid"] == (-(-45 // ph), -(-50 // pw))  # padded, not cropped: no border is dropped
    assert segmentation.TASK.token_grid((45, 50), (ph, pw)) == features["grid"]  # what the tools are told
    logits.sum().backward()  # gradients reach the backbone at every size
    assert model.backbone.patch_embed.proj.weight.grad.abs().sum() > 0


def test_linear_decoder_is_a_1x1_convolution_on_the_token_map():
    # mmseg's FCNHead(num_convs=0) is a 1x1 conv on the (B, D, gh, gw) map: the same numbers.
    decoder = LinearDecoder(width=16, num_classes=3)
    tokens, grid = torch.randn(2, 12, 16), (3, 4)
    conv = F.conv2d(tokens_to_map(tokens, grid), decoder.head.weight[..., None, None], decoder.head.bias)
    torch.testing.assert_close(decoder(tokens, grid), conv)
    assert tokens_to_map(tokens, grid)[1, :, 2, 1].equal(tokens[1, 2 * 4 + 1])  # row-major grid order


@torch.no_grad()
@pytest.mark.parametrize("patch", [8, 10])
def test_sliding_window_equals_whole_image_when_one_window_covers_it(patch):
    model = tiny_segmenter()
    images = torch.randn(2, 3, 40, 56)
    whole = predict(model, images, patch, InferenceSettings(mode="whole"))
    for crop, stride in [((40, 56), 8), (64, 32), (512, 512)]:
        slide = predict(model, images, patch, InferenceSettings(mode="slide", crop=crop, stride=stride))
        torch.testing.assert_close(slide, whole, rtol=0, atol=0)


@torch.no_grad()
def test_sliding_windows_tile_the_image_and_average_overlaps():
    boxes = window_boxes((100, 150), crop=64, stride=48)
    assert len(boxes) == 2 * 3  # mmseg: (h - crop + stride - 1) // stride + 1 windows per direction
    assert all(y2 - y1 == 64 and x2 - x1 == 64 for y1, y2, x1, x2 in boxes)
    assert max(b[1] for b in boxes) == 100 and max(b[3] for b in boxes) == 150
    # A per-pixel model gives the same logits however the image is tiled, so the averaging must return them exactly.
    weight = torch.randn(4, 3, 1, 1)

    def per_pixel(x, patch_size):
        return F.conv2d(x, weight)

    images = torch.randn(1, 3, 100, 150)
    torch.testing.assert_close(slide_logits(per_pixel, images, 8, 64, 48), per_pixel(images, 8))


@torch.no_grad()
def test_flip_and_scales_average_probabilities_at_the_label_size():
    model = tiny_segmenter(num_classes=3)
    images = torch.randn(2, 3, 32, 40)
    settings = InferenceSettings(mode="slide", crop=24, stride=16, flip=True, scales=(0.75, 1.0, 1.5))
    scores = predict(model, images, 8, settings, out_size=(64, 80))
    assert scores.shape == (2, 3, 64, 80)
    torch.testing.assert_close(scores.sum(1), torch.ones(2, 64, 80))
    single = predict(model, images, 8, InferenceSettings(), out_size=(64, 80))  # logits resized to the label
    expected = F.interpolate(model(images, patch_size=8), size=(64, 80), mode="bilinear", align_corners=False)
    torch.testing.assert_close(single, expected)


def test_loss_ignores_255_and_the_consistency_term_matches_a_hand_computation():
    from tasks.common.config import Config

    model = tiny_segmenter(num_classes=3).train()
    images, masks = torch.randn(2, 3, 32, 32), torch.full((2, 32, 32), 255)
    masks[:, :8, :8] = 1
    config = Config(seed=0, train=dict(consistency=dict(weight=0.0, sizes=[])))
    loss, terms = segmentation.make_loss(config, ["a", "b", "c"])(model, (images, masks), 8, 0)
    logits = model(images, patch_size=8)
    ce = F.cross_entropy(logits[..., :8, :8], masks[:, :8, :8])
    torch.testing.assert_close(loss, ce)
    assert set(terms) == {"ce"}
    # The term at the second size (16, the only one) against the detached prediction at 8, on labelled pixels only.
    loss_fn = segmentation.make_loss(config, ["a", "b", "c"])
    config.train.consistency.update(weight=0.5, sizes=[16])  # read once, by make_loss: the loss above keeps 0
    assert set(loss_fn(model, (images, masks), 8, 0)[1]) == {"ce"}
    loss, terms = segmentation.make_loss(config, ["a", "b", "c"])(model, (images, masks), 8, 0)
    target = logits.detach().softmax(1)[..., :8, :8]
    other = model(images, patch_size=16).log_softmax(1)[..., :8, :8]
    want = -(target * other).sum(1).mean()
    torch.testing.assert_close(terms["consistency"], want)
    torch.testing.assert_close(loss, ce + 0.5 * want)


# ------------------------------------------------------------------------------------------------------ data


def write_png(path: Path, array: np.ndarray, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8), mode=mode).save(path)


def test_ade20k_reader_reduces_labels_by_one_and_reads_its_class_table(tmp_path):
    labels = np.array([[0, 1, 2], [150, 150, 0]], np.uint8)
    for split in ("training", "validation"):
        write_png(tmp_path / "images" / split / "ADE_x_1.jpg", np.zeros((2, 3, 3)), "RGB")
        write_png(tmp_path / "annotations" / split / "ADE_x_1.png", labels)
    rows = [f"{i}\t0.1\t1\t1\t{name}" for i, name in enumerate(["wall", "building;edifice"] + ["x"] * 148, 1)]
    (tmp_path / "objectInfo150.txt").write_text("Idx\tRatio\tTrain\tVal\tName\n" + "\n".join(rows) + "\n")
    dataset = seg_data.build_segmentation_dataset("ade20k", "validation", tmp_path)
    image, mask = dataset[0]
    assert image.mode == "RGB" and dataset.classes[:2] == ["wall", "building"] and len(dataset.classes) == 150
    np.testing.assert_array_equal(mask, [[255, 0, 1], [149, 149, 255]])


def test_cityscapes_label_ids_become_train_ids(tmp_path):
    table = seg_data.cityscapes_train_id_table()
    assert table[7] == 0 and table[26] == 13 and table[33] == 18 and table[0] == table[34] == table[255] == 255
    assert seg_data.CITYSCAPES_CLASSES[0] == "road" and seg_data.CITYSCAPES_CLASSES[18] == "bicycle"
    assert sorted(table[table != 255]) == list(range(19))
    label_ids = np.array([[7, 8, 0], [26, 33, 4]], np.uint8)
    stem = "aachen/aachen_000000_000019"
    write_png(tmp_path / "leftImg8bit" / "val" / f"{stem}_leftImg8bit.png", np.zeros((2, 3, 3)), "RGB")
    write_png(tmp_path / "gtFine" / "val" / f"{stem}_gtFine_labelIds.png", label_ids)
    _, mask = seg_data.build_segmentation_dataset("cityscapes", "val", tmp_path)[0]
    np.testing.assert_array_equal(mask, [[0, 1, 255], [13, 18, 255]])
    # labelTrainIds files, where present, are used as they are.
    write_png(tmp_path / "gtFine" / "val" / f"{stem}_gtFine_labelTrainIds.png", table[label_ids])
    dataset = seg_data.build_segmentation_dataset("cityscapes", "val", tmp_path)
    assert dataset.label_map is None and np.array_equal(dataset[0][1], mask)


@pytest.mark.skipif(not LABELME_VOC.is_dir(), reason="Debian package labelme-examples not installed")
def test_labelme_voc_class_pngs_read_as_class_indices():
    dataset = seg_data.build_segmentation_dataset(
        "folder", "val", LABELME_VOC, images="JPEGImages", masks="SegmentationClassPNG"
    )
    assert len(dataset) == 3 and len(dataset.classes) == 21 and dataset.classes[15] == "person"
    for (_, mask_path), (image, mask) in zip(dataset.pairs, dataset, strict=True):
        # labelme's .npy twin of each PNG: class indices, -1 where the PNG has 255 (__ignore__).
        reference = np.load(LABELME_VOC / "SegmentationClass" / f"{mask_path.stem}.npy")
        np.testing.assert_array_equal(mask, np.where(reference < 0, 255, reference))
        assert image.size == mask.shape[::-1] and Image.open(mask_path).mode == "P"  # palette indices, not colours
    assert {int(v) for _, m in dataset for v in np.unique(m)} >= {0, 15, 255}


def test_colour_masks_are_rejected(tmp_path):
    write_png(tmp_path / "m.png", np.zeros((2, 2, 3)), "RGB")
    with pytest.raises(ValueError, match="mode RGB"):
        seg_data.read_mask(tmp_path / "m.png")


def test_train_transform_moves_image_and_mask_together():
    # Every pixel's colour encodes its label, so any misalignment between image and mask shows.
    rng = np.random.default_rng(0)
    labels = np.kron(rng.integers(0, 5, size=(6, 8)), np.ones((10, 10), np.int64)).astype(np.uint8)  # 60x80 blocks
    image = Image.fromarray(np.repeat(labels[..., None] * 50, 3, axis=-1).astype(np.uint8))
    transform = TrainTransform(crop=64, scale=None, ratio_range=(0.5, 1.5), photometric=False, value_range=(0, 1))
    for seed in range(5):
        torch.manual_seed(seed)
        x, y = transform(image, labels)
        torch.manual_seed(seed)
        assert torch.equal(transform(image, labels)[1], y)  # reproducible from the seed
        assert x.shape == (3, 64, 64) and y.shape == (64, 64) and y.dtype == torch.int64
        labelled = y != 255
        assert (x[:, ~labelled] == 0).all()  # padding: image 0, mask 255
        agree = ((x[0] * 255 / 50).round() == y)[labelled].float().mean()
        assert agree > 0.9  # all but block edges, where the image is interpolated and the mask is not
    assert rescale_size((512, 683), (2048, 512)) == (512, 683) and rescale_size((1024, 2048), (2048, 512)) == (
        512,
        1024,
    )


# ------------------------------------------------------------------------------------------------------ evaluator


def test_evaluate_equals_a_direct_computation_on_images_of_two_sizes():
    rng = np.random.default_rng(2)
    model = tiny_segmenter(num_classes=4, mode="slide", crop=24, stride=16)
    items = [(torch.randn(3, h, w), random_labels(rng, (h, w), 4)) for h, w in [(32, 40), (32, 40), (24, 30)]]
    results = segmentation.evaluate(model, items, [8, 10], torch.device("cpu"), batch_size=2)
    for patch in (8, 10):
        confusion = torch.zeros(4, 4, dtype=torch.int64)
        with torch.no_grad():
            for image, mask in items:
                logits = predict(model, image[None], patch, model.inference)
                confusion += confusion_matrix(logits.argmax(1)[0], mask, 4)
        expected = segmentation_metrics(confusion)
        assert results[patch]["mIoU"] == pytest.approx(expected["mIoU"], abs=1e-12)
        assert results[patch]["aAcc"] == pytest.approx(expected["aAcc"], abs=1e-12)
        assert results[patch]["n"] == 3


def test_checkpoint_kwargs_are_json_serialisable():
    json.dumps(tiny_segmenter().kwargs)


def test_load_model_rebuilds_a_training_checkpoint_from_the_file_alone(tmp_path):
    from tasks.common.config import Config
    from tasks.common.train_state import save_train_state

    model = tiny_segmenter(mode="slide", crop=(24, 16), stride=12, flip=True, scales=(1.0, 1.5)).eval()
    with torch.no_grad():  # weights no fresh model has, so that equal outputs prove the loading
        for param in model.parameters():
            param.add_(torch.randn_like(param))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    save_train_state(tmp_path, 3, model, optimizer, scheduler, scaler, Config(seed=0))
    loaded = segmentation.load_model(tmp_path)  # a workdir: its last checkpoint
    assert loaded.inference == model.inference and loaded.num_classes == model.num_classes
    images = torch.randn(2, 3, 40, 36)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images, patch_size=8), model(images, patch_size=8), rtol=0, atol=0)
    # flexivit.load_model names the loader to use instead of failing on the nested arguments.
    checkpoint = next((tmp_path / "checkpoints").glob("ckpt_*.pt"))
    with pytest.raises(flexivit.CheckpointError, match="tasks.segmentation.load_model"):
        flexivit.load_model(checkpoint)
    plain = tmp_path / "plain.pt"
    flexivit.save_model(model.backbone, plain)
    with pytest.raises(flexivit.CheckpointError, match="not a segmentation checkpoint"):
        segmentation.load_model(plain)


@needs_fashion_mnist
@pytest.mark.parametrize("name", ["scenes", "ade20k", "cityscapes"])
def test_runlocal_configs_build_train_and_evaluate_on_generated_scenes(name):
    # The engine's smoke test (tests/test_engine.py) runs these presets end to end; this one checks the task alone.
    from tasks.common.config import load_config

    config = load_config(f"configs/segmentation/{name}.py:runlocal")
    train_set, train_tf, val_set, classes = segmentation.build_datasets(config.data)
    model = segmentation.build_model(config.model, classes)
    batch = [torch.stack(t) for t in zip(*(train_tf(train_set[i]) for i in range(2)), strict=True)]
    assert batch[0].shape == (2, 3, config.data.image_size, config.data.image_size)
    loss, _ = segmentation.make_loss(config, classes)(model, batch, config.patch_sizes.sizes[0], 0)
    loss.backward()
    results = segmentation.evaluate(model, val_set, config.eval.patch_sizes, torch.device("cpu"), batch_size=4)
    assert set(results) == set(config.eval.patch_sizes)
    assert all(np.isfinite(v) for r in results.values() for v in r.values())

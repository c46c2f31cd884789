"""The detection task end to end: evaluation wrappers against lvis / pycocotools run directly, the task face on the
runlocal config (train, checkpoint, evaluate, the per-step patch size), towers from a contrastive checkpoint, the
labelme photos through inference, a checkpoint that alone rebuilds the model (prompts included) and trains like it
(``TASK.make_loss``), and evaluation in two processes (results gathered to the main one only, one results file per
patch size)."""

from __future__ import annotations

import copy
import json
import sys

import numpy as np
import pytest
import torch
from markers import needs_fashion_mnist

import flexivit
from tasks import detection
from tasks.common.config import Config, load_config
from tasks.contrastive.model import ImageTextModel, build_text_tower
from tasks.detection import evaluation
from tasks.detection.data import LABELME_COCO_ROOT, clean_coco_json, read_labelme_coco
from tasks.detection.transforms import EvalTransform
from tools import eval as eval_tool
from tools import train

RUNLOCAL = "configs/detection/scenes.py:runlocal"


# ------------------------------------------------------------------------------------------------ evaluation


def _lvis_gt() -> dict:
    """Four 100x80 images, five categories (r, r, c, f, f); image 1 verifies category 4 absent, image 2 marks
    category 3 not exhaustive."""
    images = [
        {
            "id": i,
            "height": 80,
            "width": 100,
            "file_name": f"{i}.jpg",
            "neg_category_ids": [],
            "not_exhaustive_category_ids": [],
        }
        for i in range(1, 5)
    ]
    images[0]["neg_category_ids"] = [4]
    images[1]["not_exhaustive_category_ids"] = [3]
    frequency = {1: "r", 2: "r", 3: "c", 4: "f", 5: "f"}
    categories = [{"id": c, "name": f"class{c}", "frequency": f, "image_count": 1} for c, f in frequency.items()]
    boxes = [
        (1, 1, [10, 10, 30, 20]),
        (1, 3, [50, 30, 40, 40]),
        (2, 2, [5, 5, 20, 60]),
        (2, 3, [40, 10, 30, 30]),
        (3, 4, [20, 20, 50, 50]),
        (3, 5, [0, 0, 15, 15]),
        (4, 5, [60, 40, 35, 35]),
        (4, 1, [10, 50, 25, 25]),
    ]
    annotations = [
        {"id": k + 1, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3]}
        for k, (i, c, b) in enumerate(boxes)
    ]
    return {"images": images, "categories": categories, "annotations": annotations}


def _random_results(gt: dict, n: int = 40, seed: int = 0) -> list:
    """Jittered copies of the ground truth (some hit, some miss) and random boxes, with random scores; only
    categories verified for their image (positives or neg_category_ids) so that every detection counts."""
    rng = np.random.default_rng(seed)
    results = []
    for ann in gt["annotations"]:
        for _ in range(3):
            box = np.asarray(ann["bbox"], float) + rng.normal(0, 4, 4)
            box[2:] = np.maximum(box[2:], 2)
            results.append(
                {
                    "image_id": ann["image_id"],
                    "category_id": ann["category_id"],
                    "bbox": box.round(2).tolist(),
                    "score": float(rng.random()),
                }
            )
    for _ in range(n):
        image = gt["images"][rng.integers(len(gt["images"]))]
        results.append(
            {
                "image_id": image["id"],
                "category_id": int(rng.integers(1, 6)),
                "bbox": [float(v) for v in rng.uniform(0, 40, 4).round(2)],
                "score": float(rng.random()),
            }
        )
    return results


def _lvis_direct(gt_path, results) -> dict:
    from lvis import LVIS, LVISEval, LVISResults

    if not hasattr(np, "float"):
        np.float = float
    lvis_gt = LVIS(str(gt_path))
    evaluator = LVISEval(lvis_gt, LVISResults(lvis_gt, copy.deepcopy(results)), "bbox")
    evaluator.run()
    return evaluator.get_results()


def test_lvis_wrapper_equals_lvis_eval_run_directly(tmp_path):
    gt = _lvis_gt()
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    results = _random_results(gt)
    ours = evaluation.lvis_evaluate(tmp_path / "gt.json", copy.deepcopy(results))
    direct = _lvis_direct(tmp_path / "gt.json", results)
    assert set(ours) == set(evaluation.LVIS_KEYS)
    for key in evaluation.LVIS_KEYS:
        expected = float("nan") if direct[key] == -1 else direct[key]
        np.testing.assert_allclose(ours[key], expected, rtol=1e-12, err_msg=key)
    assert 0 < ours["AP"] < 1  # neither trivial nor perfect


def test_coco_wrapper_equals_cocoeval_run_directly(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = _lvis_gt()
    for image in gt["images"]:
        del image["neg_category_ids"], image["not_exhaustive_category_ids"]
    for ann in gt["annotations"]:
        ann["iscrowd"] = 0
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    results = _random_results(gt, seed=1)
    ours = evaluation.coco_evaluate(tmp_path / "gt.json", copy.deepcopy(results))
    coco = COCO(str(tmp_path / "gt.json"))
    direct = COCOeval(coco, coco.loadRes(copy.deepcopy(results)), "bbox")
    direct.evaluate(), direct.accumulate(), direct.summarize()
    expected = [float("nan") if v == -1 else v for v in direct.stats[:6]]
    np.testing.assert_allclose([ours[k] for k in evaluation.COCO_KEYS], expected, rtol=1e-12)


def test_perfect_predictions_give_ap_1_and_empty_results_zero(tmp_path):
    gt = _lvis_gt()
    perfect = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in gt["annotations"]
    ]
    lvis = evaluation.lvis_evaluate(gt, copy.deepcopy(perfect))
    assert lvis["AP"] == pytest.approx(1.0) and lvis["APr"] == pytest.approx(1.0) and lvis["APf"] == pytest.approx(1.0)
    for image in gt["images"]:
        del image["neg_category_ids"], image["not_exhaustive_category_ids"]
    for ann in gt["annotations"]:
        ann["iscrowd"] = 0
    assert evaluation.coco_evaluate(gt, copy.deepcopy(perfect))["AP"] == pytest.approx(1.0)
    assert evaluation.lvis_evaluate(_lvis_gt(), [])["AP"] == 0.0


def test_federated_rule_unverified_class_changes_nothing_a_verified_negative_counts():
    gt = _lvis_gt()
    base = _random_results(gt, n=0, seed=2)
    ap = evaluation.lvis_evaluate(gt, copy.deepcopy(base))["AP"]
    # Category 2 is neither annotated in image 1 nor in its neg_category_ids: a confident detection of it is ignored.
    unverified = {"image_id": 1, "category_id": 2, "bbox": [60, 10, 20, 20], "score": 0.99}
    assert evaluation.lvis_evaluate(gt, copy.deepcopy(base) + [unverified])["AP"] == pytest.approx(ap, abs=1e-12)
    # Category 4 is verified absent in image 1: the same detection is a false positive and lowers AP.
    negative = dict(unverified, category_id=4)
    assert evaluation.lvis_evaluate(gt, copy.deepcopy(base) + [negative])["AP"] < ap - 1e-6


def test_results_with_unknown_ids_are_named():
    with pytest.raises(ValueError, match=r"category ids \[99\]"):
        evaluation.lvis_evaluate(_lvis_gt(), [{"image_id": 1, "category_id": 99, "bbox": [0, 0, 5, 5], "score": 1}])


def test_top_k_is_the_brute_force_best_pairs():
    torch.manual_seed(0)
    logits, boxes = torch.randn(12, 7), torch.rand(12, 4)
    scores, classes, picked = evaluation.top_k_detections(logits, boxes, k=20)
    pairs = sorted(((logits[n, c].sigmoid().item(), n, c) for n in range(12) for c in range(7)), reverse=True)[:20]
    assert scores.tolist() == pytest.approx([p[0] for p in pairs])
    assert classes.tolist() == [p[2] for p in pairs]
    assert torch.equal(picked, boxes[[p[1] for p in pairs]])
    assert len(evaluation.top_k_detections(logits, boxes, k=300)[0]) == 84  # capped at N * C


def test_pixel_boxes_round_trip_through_the_eval_transform():
    image = torch.zeros(3, 60, 90, dtype=torch.uint8)
    _, target = EvalTransform(48)(image, {"image_id": 1})
    xywh = torch.tensor([[9.0, 6.0, 30.0, 45.0]])  # pixels of the 90x60 original
    xyxy = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1) * target["scale"] / 48  # normalised, padded
    cxcywh = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], 1)
    back = evaluation.to_pixel_xywh(cxcywh, 48, target["scale"], target["orig_size"])
    torch.testing.assert_close(back, xywh, atol=1e-4, rtol=0)


def test_results_writer_streams_json_and_never_leaves_a_half_file(tmp_path):
    path = tmp_path / "results.json"
    with evaluation.ResultsWriter(path) as writer:
        writer.add(3, [1, 2], [[0, 0, 1.234, 2], [1, 1, 2, 2]], [0.5, 0.25])
        writer.add(4, [], [], [])
    assert json.loads(path.read_text()) == [
        {"image_id": 3, "category_id": 1, "bbox": [0, 0, 1.23, 2], "score": 0.5},
        {"image_id": 3, "category_id": 2, "bbox": [1, 1, 2, 2], "score": 0.25},
    ]
    before = path.read_text()
    with pytest.raises(RuntimeError), evaluation.ResultsWriter(path) as writer:
        writer.add(5, [1], [[0, 0, 1, 1]], [0.9])
        raise RuntimeError("crash in the middle of an evaluation")
    assert path.read_text() == before and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


# ------------------------------------------------------------------------------------------------ the task


@needs_fashion_mnist
def test_perfect_model_outputs_score_ap_1_through_the_whole_evaluate_path():
    """Un-padding, category-id mapping, streaming and scoring: a model that outputs the ground truth gets AP 1."""
    config = load_config(RUNLOCAL)
    _, _, val_set, _ = detection.build_datasets(config.data)
    records = val_set.images.records
    size = config.data.image_size
    c = len(val_set.classnames)

    class Oracle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def embed_prompts(self, names, templates, device):
            return torch.zeros(len(names), 4)

        def forward(self, images, queries, valid=None, patch_size=None):
            out_logits, out_boxes = [], []
            for _ in range(len(images)):
                r = records[self.calls]
                self.calls += 1
                scale = size / max(r.height, r.width)
                logits, boxes = torch.full((40, c), -20.0), torch.full((40, 4), 0.5)
                for m, (box, classes) in enumerate(zip(r.boxes, r.classes, strict=True)):
                    x, y, w, h = (torch.as_tensor(box, dtype=torch.float32) * scale / size).tolist()
                    boxes[m] = torch.tensor([x + w / 2, y + h / 2, w, h])
                    logits[m, list(classes)] = 20.0
                out_logits.append(logits), out_boxes.append(boxes)
            return {"logits": torch.stack(out_logits), "boxes": torch.stack(out_boxes)}

    results = detection.evaluate(Oracle(), val_set, [16], torch.device("cpu"), batch_size=3)
    assert results[16]["AP"] == pytest.approx(1.0, abs=1e-6)


@needs_fashion_mnist
def test_runlocal_trains_checkpoints_evaluates_and_follows_the_engine_sampler(tmp_path):
    config = load_config(RUNLOCAL)
    train.main(["--config", RUNLOCAL, "--workdir", str(tmp_path)])
    drawn = [json.loads(line)["patch_size"] for line in (tmp_path / "patch_sizes.jsonl").read_text().splitlines()]
    sampler = flexivit.build_sampler(**config.patch_sizes, seed=config.seed)
    assert [flexivit.pi_resize.to_2tuple(p) for p in drawn] == [
        flexivit.pi_resize.to_2tuple(sampler(step)) for step in range(config.train.steps)
    ]
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert {"train/class", "train/l1", "train/giou"} <= set().union(*log)  # the per-term losses are logged
    # The checkpoint alone rebuilds the model; tools.eval sweeps it with AP columns and names the best size.
    checkpoint = next((tmp_path / "checkpoints").glob("ckpt_00000004.pt"))
    model = detection.load_model(checkpoint)
    state, _ = flexivit.read_checkpoint(checkpoint)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    # The task's info travels in the checkpoint as plain lists of strings (weights_only loading accepts it).
    info = torch.load(checkpoint, weights_only=True)["info"]
    assert info == detection.build_datasets(config.data)[3] and info["classnames"] == model.query_names
    assert json.loads(json.dumps(info)) == info
    rows = eval_tool.main(["--workdir", str(tmp_path), "--timing-batch", "2", "--no-timing"])
    assert [r["patch_size"] for r in rows] == config.eval.patch_sizes
    assert all(0 <= r["AP"] <= 1 and "APr" in r for r in rows) and [r["best"] for r in rows].count("yes") == 1
    with pytest.raises(flexivit.CheckpointError, match="not a detection checkpoint"):
        plain = tmp_path / "plain.pt"
        flexivit.save_model(model.image, plain)
        detection.load_model(plain)


def _save_contrastive(tmp_path, image_kwargs, text_cfg) -> tuple[ImageTextModel, str]:
    image = flexivit.FlexiViT(**image_kwargs)
    model = ImageTextModel(image=image, text=build_text_tower(**text_cfg), embed_dim=image.width)
    path = tmp_path / "contrastive.pt"
    torch.save({"model": model.state_dict(), "model_kwargs": model.kwargs}, path)
    return model, str(path)


@needs_fashion_mnist
def test_towers_load_from_a_contrastive_checkpoint_and_a_mismatch_is_named(tmp_path):
    config = load_config(RUNLOCAL)
    _, _, _, info = detection.build_datasets(config.data)
    reference = detection.build_model(config.model, info)
    source, path = _save_contrastive(tmp_path, reference.image.kwargs, dict(config.model.text))
    loaded = detection.build_model(Config({**config.model, "init": path}), info)
    for prefix, tower in (("image.", source.image), ("text.", source.text), ("text_proj.", source.text_proj)):
        for key, value in tower.state_dict().items():
            assert torch.equal(loaded.state_dict()[prefix + key], value), prefix + key
    assert loaded.query_names == info["classnames"]
    wider = dict(config.model.text, width=48)
    with pytest.raises(flexivit.CheckpointError, match="does not fit the configured towers"):
        detection.build_model(Config({**config.model, "init": path, "text": wider}), info)


@needs_fashion_mnist
def test_an_empty_query_list_is_refused():
    config = load_config(RUNLOCAL)
    _, _, val_set, info = detection.build_datasets(config.data)
    model = detection.build_model(config.model, info)
    val_set.classnames = []
    with pytest.raises(ValueError, match="need class names"):
        detection.evaluate(model, val_set, [16], torch.device("cpu"))


@pytest.mark.skipif(not LABELME_COCO_ROOT.is_dir(), reason="Debian package labelme-examples not installed")
def test_labelme_photos_run_through_inference_end_to_end(tmp_path):
    images = read_labelme_coco(transform=EvalTransform(64))
    gt = clean_coco_json(
        LABELME_COCO_ROOT / "annotations.json",
        tmp_path / "gt.json",
        renumber_zero_ids=True,
        drop_categories=("_background_",),
    )
    text = build_text_tower("openclip", width=32, layers=1, heads=2, context_length=16)
    image = flexivit.create_model("flexivit_mu", depth=1, width=32, num_heads=2, num_classes=0)
    model = detection.OwlViT(image, text, torch.nn.Linear(32, 32, bias=False), 32)
    val_set = detection.EvalSet(images, gt, "coco", list(images.classes), ["a photo of a {}."], results_dir=tmp_path)
    results = detection.evaluate(model, val_set, [16, 8], torch.device("cpu"), batch_size=2)
    assert set(results) == {16, 8} and all(0 <= r["AP"] <= 1 for r in results.values())
    written = json.loads((tmp_path / "results_p8.rank0.json").read_text())
    assert len(written) == 300 * len(images)  # the top 300 per photo, no threshold
    assert {r["category_id"] for r in written} <= set(images.category_ids)
    assert all(r["bbox"][0] + r["bbox"][2] <= 1e-6 + w for r in written for w in [_width(images, r["image_id"])])


def _width(images, image_id) -> int:
    return next(r.width for r in images.records if r.image_id == image_id)


def test_scenes_config_arguments_choose_the_data_and_an_unknown_one_is_refused():
    plain, textured = load_config("configs/detection/scenes.py"), load_config("configs/detection/scenes.py:textured")
    assert plain.data.root == "data/scenes_plain" and plain.data.generate["background_value"] == [0.0, 0.0]
    assert plain.data.generate["max_occlusion"] == 0.0 and not plain.data.drop_rare_images
    assert textured.data.root == "data/scenes" and "background_value" not in textured.data.generate
    assert load_config("configs/detection/scenes.py:strict").data.drop_rare_images
    with pytest.raises(ValueError, match=r"unknown config argument\(s\) \['plain'\]"):
        load_config("configs/detection/scenes.py:plain")


# ------------------------------------------------------------------------------------------------ checkpoints and DDP


def _tiny_owl(query_names=("cat", "dog")) -> detection.OwlViT:
    """A tiny OWL-ViT with the same weights in every process (seeded), its class projection made visible."""
    torch.manual_seed(0)
    image = flexivit.create_model("flexivit_mu", depth=1, width=32, num_heads=2, num_classes=0)
    text = build_text_tower("openclip", width=32, layers=1, heads=2, context_length=16)
    model = detection.OwlViT(
        image, text, torch.nn.Linear(32, 32, bias=False), 32, query_names=query_names, train_templates=["a {}."]
    )
    torch.nn.init.normal_(model.class_head.proj.weight, std=0.3)
    return model.eval()


def test_a_checkpoint_alone_runs_inference_and_training_like_the_model_that_wrote_it(tmp_path):
    # The prompts' class names and templates live in model.kwargs, which the engine saves with the weights.
    from tasks.common.train_state import save_train_state

    model = _tiny_owl(query_names=["cat", "dog", "bird"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    info = {"classnames": ["cat", "dog", "bird"], "train_templates": ["a {}."]}
    path = save_train_state(tmp_path, 3, model, optimizer, scheduler, scaler, Config(task="detection"), info=info)
    loaded = detection.load_model(path).eval()
    assert loaded.query_names == ["cat", "dog", "bird"] and loaded.train_templates == ["a {}."]
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = detection.image_forward(model)(images, patch_size=8), detection.image_forward(loaded)(images, 8)
    for key in ("logits", "boxes"):
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    assert got["logits"].shape == (2, 16, 3)  # every stored class is queried
    boxes = torch.tensor([[[0.3, 0.3, 0.2, 0.2]], [[0.6, 0.5, 0.3, 0.4]]])
    queries, query_valid = torch.tensor([[0, 2], [1, 0]]), torch.tensor([[True, True], [True, False]])
    labels = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]])
    batch = (images, boxes, torch.ones(2, 1, dtype=torch.bool), labels, queries, query_valid)
    losses = []
    for net in (model, loaded):
        torch.manual_seed(5)  # the template draw of the step
        losses.append(detection.make_loss(Config(task="detection"), info)(net, batch, 8, 0)[0])
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=0)
    with pytest.raises(AttributeError):
        loaded.query_names = ["other"]  # read-only: what runs is what the checkpoint stores


def _tiny_coco(root) -> None:
    """Three 32 px images, two categories, boxes on the box priors at patch 16 (so AP > 0 at init)."""
    from torchvision.io import write_png

    root.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i, boxes in enumerate([[(8, 8, 1)], [(24, 24, 2), (8, 24, 1)], [(24, 8, 2)]]):
        write_png(torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(i)),
                  str(root / f"{i}.png"))  # fmt: skip
        images.append({"id": i + 1, "file_name": f"{i}.png", "height": 32, "width": 32})
        for x, y, c in boxes:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": c,
                                "bbox": [x, y, 16, 16], "area": 256, "iscrowd": 0})  # fmt: skip
    categories = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    gt = {"images": images, "annotations": annotations, "categories": categories}
    (root / "gt.json").write_text(json.dumps(gt))


def _tiny_eval_set(root, results_dir=None) -> detection.EvalSet:
    from tasks.detection.data import read_coco

    images = read_coco(root / "gt.json", root, transform=EvalTransform(32))
    return detection.EvalSet(images, root / "gt.json", "coco", ["cat", "dog"], ["{}"], results_dir=results_dir)


PATCHES = [16, (8, 16), (16, 8)]


def _evaluate_in_a_process_group(rank, world, init_file, root, out_file):
    import torch.distributed as dist

    from tasks.common import distributed

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    received, gather = [], distributed.gather_object

    def spy(obj):
        received.append(gather(obj))
        return received[-1]

    def everywhere(obj):
        raise AssertionError("the results were sent to every rank")

    distributed.gather_object, distributed.all_gather_object = spy, everywhere
    results = detection.evaluate(_tiny_owl(), _tiny_eval_set(root), PATCHES, torch.device("cpu"), batch_size=1)
    sizes = [None if r is None else [len(json.loads(part)) for part in r] for r in received]
    torch.save({"results": results, "received": sizes}, f"{out_file}.{rank}")
    dist.destroy_process_group()


@pytest.mark.skipif(sys.platform != "linux", reason="gloo process group")
def test_evaluation_in_two_processes_equals_one_and_only_the_main_one_gets_the_results(tmp_path):
    pytest.importorskip("pycocotools")
    import torch.multiprocessing as mp

    _tiny_coco(tmp_path / "coco")
    alone = detection.evaluate(
        _tiny_owl(), _tiny_eval_set(tmp_path / "coco", tmp_path), PATCHES, torch.device("cpu"), batch_size=1
    )
    assert all(alone[p]["AP"] > 0 for p in PATCHES)
    # Non-square patch sizes each get their own results file: (8, 16) and (16, 8) no longer share one.
    names = sorted(p.name for p in tmp_path.glob("results_*.json"))
    assert names == ["results_p16.rank0.json", "results_p16x8.rank0.json", "results_p8x16.rank0.json"]
    assert (tmp_path / "results_p16x8.rank0.json").read_text() != (tmp_path / "results_p8x16.rank0.json").read_text()
    # spawn, not fork: a forked worker can hang in the OpenMP pool that this process has already used.
    mp.spawn(_evaluate_in_a_process_group, args=(2, tmp_path / "pg", tmp_path / "coco", tmp_path / "r.pt"), nprocs=2)
    ranks = [torch.load(tmp_path / f"r.pt.{rank}", weights_only=True) for rank in range(2)]
    # Images 1 and 3 on rank 0, image 2 on rank 1, 300 detections cap -> all (token, class) pairs: 2x2x2, 4x2x2, 2x4x2.
    per_image = {16: 8, (8, 16): 16, (16, 8): 16}
    assert ranks[0]["received"] == [[2 * per_image[p], per_image[p]] for p in PATCHES]
    assert ranks[1]["received"] == [None] * len(PATCHES)  # the other rank never holds the results
    for r in ranks:
        assert r["results"] == alone

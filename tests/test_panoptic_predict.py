"""The panoptic tasks through the task contract (issue 25): their losses, stage II on a user's images, the refusals
of stage I, and both models rebuilt from their checkpoints alone."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import tasks
from tasks.common.config import load_config
from tasks.common.train_state import save_train_state
from tasks.panoptic import stage1, stage2
from tasks.panoptic.data import EvalTransform
from tasks.panoptic.inference import segment_colours

CONFIG = "configs/panoptic/scenes.py:stage={},runlocal"
# Categories as a checkpoint's info holds them: ids and names not 1..K / the scenes', one without a colour.
CATEGORIES = [
    {"id": 11, "name": "cat", "isthing": True, "color": [200, 40, 40]},
    {"id": 22, "name": "dog", "isthing": True, "color": None},
    {"id": 33, "name": "sky", "isthing": False, "color": [40, 90, 220]},
]
INFO = {"num_classes": 4, "image_size": 48, "max_instances": 8, "categories": CATEGORIES}


def save(workdir, model, config, info=INFO):
    """A checkpoint as the engine writes it (model state and kwargs, config, info)."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return save_train_state(workdir, 1, model, optimizer, scheduler, scaler, config, info=info)


@pytest.fixture(scope="module")
def uvim(tmp_path_factory):
    """``(model, config, checkpoint)``: a stage II of the runlocal sizes built by ``build_model`` with the extended
    info on a saved oracle whose heads are random (zero heads would predict every pixel void)."""
    root = tmp_path_factory.mktemp("uvim")
    config1, config2 = load_config(CONFIG.format(1)), load_config(CONFIG.format(2))
    torch.manual_seed(0)
    oracle = stage1.build_model(config1.model, INFO)
    with torch.no_grad():
        for head in (oracle.head_semantic, oracle.head_instance):
            head.weight.normal_(0, 0.5)
    oracle_ckpt = save(root / "oracle", oracle, config1)
    config2.model.oracle = str(oracle_ckpt)
    config2.data.value_range = [0.0, 1.0]  # not the default: predict must read it from the config
    model = stage2.build_model(config2.model, INFO).eval()
    return model, config2, save(root / "stage2", model, config2), oracle, oracle_ckpt


def test_the_tasks_declare_what_they_refuse():
    first, second = tasks.get_task("panoptic.stage1"), tasks.get_task("panoptic.stage2")
    assert first is stage1.TASK and second is stage2.TASK
    assert first.predict is None and "panoptic.stage2" in first.predict_refusal
    assert "ground-truth" in first.export_refusal and "autoregressive" in second.export_refusal
    assert second.predict is not None and second.predict_options == ()
    assert first.engine_features == second.engine_features == frozenset()
    config = load_config(CONFIG.format(2))
    config.distill = {"teacher": "runs/x"}
    with pytest.raises(tasks.TaskError, match=r"task panoptic.stage2 does not support distill"):
        tasks.check_engine_features(second, config)


def test_stage1_image_forward_runs_the_oracle_on_an_empty_target_at_its_one_patch_size(uvim):
    _, _, _, oracle, _ = uvim
    forward = stage1.image_forward(oracle.eval())
    images = torch.randn(2, 3, 48, 48)
    void = torch.zeros(2, 48, 48, dtype=torch.long)
    want = stage1.to_panoptic(oracle.decode(oracle.encode(images, void, void, update_dict=False)["quantised"], images))
    got = forward(images, patch_size=8)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True)) and got[0].shape == (2, 48, 48)
    with pytest.raises(ValueError, match="patch size 8 only, not 16"):
        forward(images, patch_size=16)


def test_the_losses_read_no_config_and_give_the_terms_by_hand(uvim):
    model, _, _, oracle, _ = uvim
    g = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 48, 48, generator=g)
    semantic = torch.randint(0, 4, (2, 48, 48), generator=g)
    instance = torch.randint(0, 8, (2, 48, 48), generator=g)
    batch = (images, semantic, instance)
    oracle.eval()  # no code dropout, no dictionary update: the same forward twice
    loss, terms = stage1.make_loss(None, INFO)(oracle, batch, 8, 0)
    want = stage1.oracle_loss(oracle(images, semantic, instance), semantic, instance)[0]
    assert torch.equal(loss, want) and torch.equal(loss, terms["semantic"] + terms["instance"])
    loss, terms = stage2.make_loss(None, INFO)(model, batch, 12, 0)
    codes = model.target_codes(images, semantic, instance)
    logits = model(images, codes, patch_size=12)
    assert torch.equal(loss, F.cross_entropy(logits.flatten(0, 1), (codes + 1).flatten()))
    assert terms["code_accuracy"] == (logits[..., 1:].argmax(-1) == codes).float().mean()


def reference_maps(model, config, image, patch):
    """Evaluation's path: the eval transform, stage II + oracle, the maps resized to the image by nearest."""
    transform = EvalTransform(48, tuple(config.data.value_range), 8)
    x = transform(image, torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long))[0]
    semantic, instance = model.predict(x[None], patch)
    maps = F.interpolate(torch.stack([semantic, instance], 1).float(), size=(image.height, image.width))
    return maps[0, 0].long().numpy(), maps[0, 1].long().numpy()


def test_stage2_predicts_a_colour_map_at_each_input_size_whose_colours_are_the_recorded_segments(uvim):
    model, config, _, _, _ = uvim
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(53, 37), (40, 64)]]
    predictions = stage2.predict(model, config, INFO, images, 8, {})
    by_id = {c["id"]: c for c in CATEGORIES}
    classes_seen = set()
    for image, prediction in zip(images, predictions, strict=True):
        assert prediction.overlay and prediction.image.size == image.size and prediction.image.mode == "RGB"
        semantic, instance = reference_maps(model, config, image, 8)
        colours = np.asarray(prediction.image)
        segments = prediction.record["segments_info"]
        assert len(segments) >= 2  # random heads: several segments, so the colouring is exercised
        key = semantic * 1000 + instance
        for segment in segments:
            mask = (colours == segment["color"]).all(-1)
            assert mask.sum() == segment["area"] > 0  # the segment is exactly the pixels of its colour ...
            assert len(np.unique(key[mask])) == 1 and (key == key[mask][0]).sum() == segment["area"]  # ... one
            category = by_id[segment["category_id"]]  # ... of the class that info names
            assert semantic[mask][0] == CATEGORIES.index(category) + 1
            assert (segment["category"], segment["isthing"]) == (category["name"], category["isthing"])
            classes_seen.add(segment["category_id"])
        assert ((colours == 0).all(-1) == (semantic == 0)).all()  # void: black, and no segment is black
        assert sorted(s["id"] for s in segments) == list(range(1, len(segments) + 1))
        assert len({tuple(s["color"]) for s in segments}) == len(segments)
        names = [s["category"] for s in segments]
        assert prediction.summary.startswith(f"{len(segments)} segments: ")
        for name in set(names):
            count = names.count(name)
            assert (f"{count} {name}" if count > 1 else name) in prediction.summary.split(": ")[1].split(", ")
        assert prediction.legend is not None and prediction.legend.height >= 18 * len(set(names))
    assert len(classes_seen) >= 2


def test_segment_colours_are_the_class_colour_then_its_shades_and_never_repeat():
    base = [(200, 40, 40), (200, 40, 40), (0, 0, 0)]  # two classes of one colour, one of the void colour
    colours = segment_colours([1, 1, 1, 2, 3], base)
    assert colours[0] == (0, 0, 0) and colours[1] == (200, 40, 40)
    assert colours[2] == (208, 72, 72) and colours[3] == (170, 34, 34)  # 15 % lighter, then darker
    assert len(set(colours)) == 6  # class 2 and class 3 (black) were moved to free colours


def test_both_stages_rebuild_from_their_checkpoint_alone_bit_for_bit(uvim):
    model, config, checkpoint, oracle, oracle_ckpt = uvim
    images = torch.rand(3, 3, 48, 48)
    run = tasks.load_run(checkpoint)  # the config from the checkpoint itself
    assert run.task is stage2.TASK and run.info == INFO and run.config.data.value_range == [0.0, 1.0]
    for patch in (16, 8):
        want, got = model.predict(images, patch), run.model.predict(images, patch)
        assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
    logits = model(images, torch.zeros(3, 4, dtype=torch.long), patch_size=12)
    assert torch.equal(run.model(images, torch.zeros(3, 4, dtype=torch.long), patch_size=12), logits)
    pil = [Image.fromarray((images[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8))]
    a = stage2.predict(model, config, INFO, pil, 8, {})
    b = run.task.predict(run.model, run.config, run.info, pil, 8, {})
    assert a[0].record == b[0].record and np.array_equal(np.asarray(a[0].image), np.asarray(b[0].image))
    rebuilt = tasks.load_run(oracle_ckpt)
    assert rebuilt.task is stage1.TASK and rebuilt.info == INFO
    for x, y in zip(stage1.image_forward(oracle)(images), stage1.image_forward(rebuilt.model)(images), strict=True):
        assert torch.equal(x, y)

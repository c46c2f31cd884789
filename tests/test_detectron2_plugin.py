"""The detectron2 plug-in: FlexiViT + ViTDet's simple feature pyramid as a detectron2 Backbone.

Most tests need detectron2 (not on PyPI) and skip without it; the import-guard test and the resampling test run in
both settings.
"""

import argparse
import importlib
import math
import sys
from pathlib import Path

import pytest
import torch
from markers import needs_fashion_mnist

import flexivit
import tasks
import tasks.detectron2_backbone as plugin
from tasks.common.dense import dense_backbone

try:
    import detectron2
except ModuleNotFoundError as error:  # only a missing detectron2 skips; a broken install (a missing fvcore, say) fails
    if error.name != "detectron2":
        raise
    detectron2 = None
needs_detectron2 = pytest.mark.skipif(detectron2 is None, reason=f"detectron2 is not installed. {plugin.INSTALL_HINT}")

if detectron2 is not None:
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import LazyConfig, get_cfg, instantiate
    from detectron2.engine import SimpleTrainer, default_setup, hooks
    from detectron2.modeling import build_backbone
    from detectron2.structures import ImageList
    from detectron2.utils.events import EventStorage

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/detectron2/faster_rcnn_flexivit_scenes.py"
TINY = dict(depth=1, width=32, num_heads=2)


def tiny_backbone(**kwargs):
    args = dict(name="flexivit_mu", overrides=TINY, train_patch_sizes=[16, 12, 8], test_patch_size=16, out_channels=16)
    return plugin.FlexiViTBackbone(**{**args, **kwargs})


def test_module_imports_without_detectron2_and_says_how_to_install(monkeypatch):
    # Simulate a machine without detectron2: every detectron2 module unimportable, the plug-in imported afresh.
    for name in [m for m in sys.modules if m.startswith("detectron2.")] + ["detectron2"]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "tasks.detectron2_backbone")
    monkeypatch.setattr(tasks, "detectron2_backbone", plugin)  # the fresh import rebinds it; restored afterwards
    fresh = importlib.import_module("tasks.detectron2_backbone")
    assert fresh is not plugin
    for use in (lambda: fresh.FlexiViTBackbone(name="flexivit_mu"), lambda: fresh.register_scenes("x", "train")):
        with pytest.raises(ImportError, match="not on PyPI") as info:
            use()
        assert "github.com/facebookresearch/detectron2" in str(info.value)


@pytest.mark.parametrize("patch", [48, 40, 30, 24, 20, 16, 15, 12, 10, 8, 4])
def test_resampled_token_map_is_aligned_in_pixels(patch):
    # A map whose value is each token's own pixel centre (x in one channel, y in the other), on a 64x96 input padded
    # to a multiple of the patch: resampled to stride 16, every cell must read its own centre 16 * j + 8. Away from
    # the border cells (where bilinear clamps and the antialiasing filter is cut off) a linear ramp is reproduced
    # exactly; interpolating to the output size, or over the padded extent, would be off by pixels at 12, 10, 40, ...
    height, width = 64, 96
    gh, gw = -(-height // patch), -(-width // patch)
    ys, xs = torch.meshgrid((torch.arange(gh) + 0.5) * patch, (torch.arange(gw) + 0.5) * patch, indexing="ij")
    out = plugin.resample_to_stride(torch.stack([xs, ys])[None], (patch, patch), 16, (height // 16, width // 16))
    assert out.shape == (1, 2, 4, 6)
    centres_x, centres_y = torch.arange(6) * 16.0 + 8, torch.arange(4) * 16.0 + 8
    inner = (slice(1, -1), slice(1, -1))
    torch.testing.assert_close(out[0, 0][inner], centres_x[1:-1].expand(2, -1), rtol=0, atol=1e-4)
    torch.testing.assert_close(out[0, 1][inner], centres_y[1:-1, None].expand(-1, 4), rtol=0, atol=1e-4)
    # A constant map stays constant everywhere, the border included.
    const = plugin.resample_to_stride(torch.full((1, 1, gh, gw), 3.0), (patch, patch), 16, (4, 6))
    torch.testing.assert_close(const, torch.full((1, 1, 4, 6), 3.0))


def test_missing_pretrained_says_what_to_run_first(tmp_path, monkeypatch):
    # A fresh clone has no runs/fashion_mnist: the configs' default backbone must say how to make it, or how to skip it.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"bash tools/main\.sh.*model\.backbone\.pretrained=null"):
        dense_backbone("flexivit_mu", "runs/fashion_mnist")
    with pytest.raises(FileNotFoundError, match="neither a file, a workdir nor a release") as info:
        dense_backbone("flexivit_mu", "runs/typo")
    assert "main.sh" not in str(info.value)
    vit = dense_backbone("flexivit_mu", None, dict(TINY))
    assert vit.num_classes == 0 and vit.depth == 1


@needs_detectron2
def test_scenes_config_builds_without_the_main_job_when_told(tmp_path, monkeypatch):
    # What lazyconfig_train_net.py does first, in a fresh clone: instantiate(cfg.model). The default needs the main
    # job and says so; --eval-only's model.backbone.pretrained=null (train.init_checkpoint has every weight) does not.
    monkeypatch.chdir(tmp_path)
    cfg = LazyConfig.apply_overrides(LazyConfig.load(str(CONFIG)), ["model.backbone.overrides.depth=1"])
    with pytest.raises(FileNotFoundError, match=r"bash tools/main\.sh"):
        instantiate(cfg.model)
    cfg = LazyConfig.apply_overrides(cfg, ["model.backbone.pretrained=null"])
    assert isinstance(instantiate(cfg.model).backbone, plugin.FlexiViTBackbone)


@needs_detectron2
@pytest.mark.parametrize("patch", [16, 12, 8])
def test_output_shape_matches_the_forward_at_every_patch_size(patch):
    backbone = tiny_backbone(test_patch_size=patch).eval()
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        features = backbone(images)
    shapes = backbone.output_shape()
    assert list(features) == list(shapes) == ["p2", "p3", "p4", "p5", "p6"]
    for name, spec in shapes.items():
        expected = (2, spec.channels, -(-64 // spec.stride), -(-96 // spec.stride))
        assert tuple(features[name].shape) == expected, name
    assert [s.stride for s in shapes.values()] == [4, 8, 16, 32, 64]
    assert all(torch.isfinite(f).all() for f in features.values())


@needs_detectron2
def test_padding_constraints_pad_batches_as_declared():
    backbone = tiny_backbone(square_pad=128)
    assert backbone.size_divisibility == 32
    assert backbone.padding_constraints == {"size_divisibility": 32, "square_size": 128}
    batch = ImageList.from_tensors([torch.zeros(3, 50, 70), torch.zeros(3, 40, 90)], 32, padding_constraints=None)
    assert batch.tensor.shape[-2:] == (64, 96)
    square = ImageList.from_tensors([torch.zeros(3, 50, 70)], 32, padding_constraints=backbone.padding_constraints)
    assert square.tensor.shape[-2:] == (128, 128)
    with pytest.raises(ValueError, match="size_divisibility"):
        backbone.eval()(torch.zeros(1, 3, 48, 64))


@needs_detectron2
def test_training_patch_size_is_the_sampler_s_value_at_the_storage_iteration():
    backbone = tiny_backbone(seed=3).train()
    sampler = flexivit.UniformSampler([16, 12, 8], seed=3)
    with pytest.raises(RuntimeError, match="EventStorage"):
        backbone.current_patch_size()
    drawn = []
    with EventStorage(0) as storage:
        for iteration in range(12):
            storage.iter = iteration
            drawn.append(backbone.current_patch_size())
    assert drawn == [(sampler(i),) * 2 for i in range(12)]
    assert len(set(drawn)) > 1  # the draw really changes with the iteration
    assert backbone.eval().current_patch_size() == (16, 16)


@needs_detectron2
def test_weights_load_from_a_flexivit_file_and_a_workdir(tmp_path):
    source = flexivit.create_model("flexivit_mu", **TINY, base_patch_size=16, posemb_grid=7, num_classes=5)
    flexivit.save_model(source, tmp_path / "source.safetensors")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    flexivit.save_model(source, tmp_path / "run" / "checkpoints" / "ckpt_00000010.pt")
    expected = {k: v for k, v in source.state_dict().items() if not k.startswith("head.")}
    for pretrained in (tmp_path / "source.safetensors", tmp_path / "run"):
        with pytest.warns(UserWarning, match="head"):  # the classifier head is dropped, and says so
            backbone = tiny_backbone(pretrained=str(pretrained))
        loaded = backbone.vit.state_dict()
        assert loaded.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=key)


@needs_detectron2
def test_yacs_config_builds_the_registered_backbone():
    cfg = get_cfg()
    plugin.add_flexivit_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_flexivit_backbone"
    cfg.MODEL.FLEXIVIT.NAME = "flexivit_mu"
    cfg.MODEL.FLEXIVIT.OVERRIDES.update(TINY)
    cfg.MODEL.FLEXIVIT.TEST_PATCH_SIZE = 8
    cfg.MODEL.FPN.OUT_CHANNELS = 24
    backbone = build_backbone(cfg)
    assert isinstance(backbone, plugin.FlexiViTBackbone)
    assert backbone.vit.depth == 1 and backbone.test_patch_size == (8, 8)
    assert {k: (s.channels, s.stride) for k, s in backbone.output_shape().items()} == {
        "p2": (24, 4), "p3": (24, 8), "p4": (24, 16), "p5": (24, 32), "p6": (24, 64)
    }  # fmt: skip


def build_trainer(cfg):
    """What detectron2's tools/lazyconfig_train_net.py does: model, optimizer, loader, SimpleTrainer, hooks."""
    model = instantiate(cfg.model)
    cfg.optimizer.params.model = model
    trainer = SimpleTrainer(model, instantiate(cfg.dataloader.train), instantiate(cfg.optimizer))
    checkpointer = DetectionCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer),
        ]
    )
    return trainer, checkpointer


def tiny_scenes_config(tmp_path, work="work"):
    """configs/detectron2's scenes config with a tiny random backbone on 8 + 4 generated 64 px scenes."""
    from tasks.common import scenes

    root = tmp_path / "scenes"
    if not root.is_dir():
        scenes.write_scenes(root, num_train=8, num_val=4, seed=0, spec=scenes.SceneSpec(size=64))
    cfg = LazyConfig.load(str(CONFIG))
    cfg.model.backbone.update(pretrained=None, overrides=dict(**TINY, base_patch_size=16, posemb_grid=7))
    cfg.model.backbone.train_patch_sizes = [16, 12, 8]
    cfg.model.roi_heads.box_predictor.test_score_thresh = 0.0  # an untrained model still gives detections
    for split in ("train", "test"):
        cfg.dataloader[split].dataset.names.root = str(root)
        cfg.dataloader[split].num_workers = 0
    cfg.dataloader.train.total_batch_size = 2
    cfg.dataloader.evaluator.output_dir = str(tmp_path / "eval")
    cfg.train.update(output_dir=str(tmp_path / work), max_iter=4)
    (tmp_path / work).mkdir()  # detectron2's default_setup makes it in lazyconfig_train_net.py
    cfg.train.checkpointer.period = 2  # saves after iterations 1 and 3 (model_0000001.pth, model_final.pth)
    return cfg


@needs_detectron2
@needs_fashion_mnist
def test_config_seed_makes_two_runs_identical(tmp_path):
    """train.seed, applied by default_setup as lazyconfig_train_net.py does, fixes the init and the data order."""
    cfg = LazyConfig.load(str(CONFIG))
    assert isinstance(cfg.train.seed, int) and cfg.train.seed >= 0  # < 0 would mean a fresh random seed per run

    def losses(work, seed):
        run = tiny_scenes_config(tmp_path, work)
        run.train.seed = seed
        default_setup(run, argparse.Namespace())
        trainer, _ = build_trainer(run)
        trainer.train(0, 3)
        return [value for value, _ in trainer.storage.history("total_loss").values()]

    first = losses("a", cfg.train.seed)
    assert len(first) == 3 and all(map(math.isfinite, first))
    assert losses("b", cfg.train.seed) == first  # bit for bit
    assert losses("c", cfg.train.seed + 1) != first  # the seed really is what fixes them


@needs_detectron2
@needs_fashion_mnist
def test_scenes_config_trains_resumes_and_evaluates_with_detectron2(tmp_path, monkeypatch):
    """configs/detectron2 (a tiny backbone) through detectron2's SimpleTrainer, checkpointer and COCOEvaluator."""
    from detectron2.evaluation import inference_on_dataset

    cfg = tiny_scenes_config(tmp_path)

    seen = []  # (storage iteration or "eval", patch size) of every backbone forward
    current = plugin.FlexiViTBackbone.current_patch_size

    def recording(self):
        size = current(self)
        seen.append((plugin.get_event_storage().iter if self.training else "eval", size[0]))
        return size

    monkeypatch.setattr(plugin.FlexiViTBackbone, "current_patch_size", recording)
    sampler = flexivit.UniformSampler([16, 12, 8], seed=0)
    trainer, _ = build_trainer(cfg)
    trainer.train(0, 4)
    assert trainer.iter == 4
    assert seen == [(i, sampler(i)) for i in range(4)]
    # The sampled size reaches detectron2's metrics (metrics.json, TensorBoard) at its own iteration.
    assert trainer.storage.history("patch_size").values() == [(float(sampler(i)), i) for i in range(4)]
    work = tmp_path / "work"
    assert (work / "model_0000001.pth").is_file() and (work / "model_final.pth").is_file()

    # Resume as lazyconfig_train_net.py --resume does, from the run as it was after iteration 1 (detectron2 resumes
    # from the file named in last_checkpoint): the weights are the checkpoint's and the iteration (and so the
    # patch-size sequence) continues at 2.
    (work / "last_checkpoint").write_text("model_0000001.pth")
    seen.clear()
    resumed, checkpointer = build_trainer(cfg)
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=True)
    assert resumed.iter == 1
    saved = torch.load(work / "model_0000001.pth", map_location="cpu", weights_only=True)["model"]
    for key, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0, msg=key)
    resumed.train(resumed.iter + 1, 4)
    assert seen == [(2, sampler(2)), (3, sampler(3))]
    assert resumed.storage.history("patch_size").values() == [(float(sampler(i)), i) for i in (2, 3)]

    # COCOEvaluator on the validation scenes, at two patch sizes through the sweep helper.
    seen.clear()
    model = resumed.model.eval()
    loader, evaluator = instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
    results = plugin.evaluate_patch_sizes(model, loader, evaluator, [16, 8])
    assert seen == [("eval", 16)] * 4 + [("eval", 8)] * 4  # one forward per image (batch 1), at each size
    assert model.backbone.test_patch_size == (8, 8)  # the config's, restored after the sweep
    for patch in (16, 8):
        ap = results[patch]["bbox"]["AP"]
        assert isinstance(ap, float) and 0 <= ap <= 100, (patch, ap)
    direct = inference_on_dataset(model, loader, evaluator)
    assert seen[-4:] == [("eval", 8)] * 4
    assert direct["bbox"]["AP"] == results[8]["bbox"]["AP"]

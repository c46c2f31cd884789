"""The mmsegmentation plug-in: FlexiViT as an mmseg backbone in an EncoderDecoder (runs when mmseg is installed)."""

from pathlib import Path

import pytest
import torch
from markers import needs_fashion_mnist

mmseg = pytest.importorskip("mmseg", reason="mmsegmentation not installed (bash tools/install_mmseg.sh)")
pytest.importorskip("mmcv.ops", reason="mmcv built without ops (bash tools/install_mmseg.sh)")

from mmengine.config import Config, DictAction  # noqa: E402
from mmengine.logging import MessageHub  # noqa: E402
from mmengine.optim import OptimWrapper  # noqa: E402
from mmengine.structures import PixelData  # noqa: E402
from mmseg.registry import MODELS  # noqa: E402
from mmseg.structures import SegDataSample  # noqa: E402
from mmseg.utils import register_all_modules  # noqa: E402

import flexivit  # noqa: E402
import tasks.mmseg_backbone  # noqa: E402, F401  (registers FlexiViTBackbone)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/mmseg/segmenter_linear_flexivit-s_8xb1-160k_ade20k-512x512.py"
SCENES_CONFIG = ROOT / "configs/mmseg/segmenter_linear_flexivit-mu_1xb16-1k_scenes-96x96.py"
register_all_modules()


def tiny_segmentor(test_cfg):
    config = Config.fromfile(str(CONFIG))
    model_cfg = config.model
    model_cfg.backbone.update(name="flexivit_mu", pretrained=None, train_patch_sizes=[16, 12, 8], test_patch_size=8,
                              overrides=dict(depth=1, width=32, num_heads=2))  # fmt: skip
    model_cfg.decode_head.update(in_channels=32, channels=32, num_classes=5)
    model_cfg.data_preprocessor.size = (48, 48)
    model_cfg.test_cfg = test_cfg
    return MODELS.build(model_cfg)


def batch(n=2, size=48):
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randint(0, 255, (3, size, size), generator=g).float() for _ in range(n)]
    samples = []
    for _ in range(n):
        sample = SegDataSample()
        sample.gt_sem_seg = PixelData(data=torch.randint(0, 5, (1, size, size), generator=g))
        sample.set_metainfo(dict(img_shape=(size, size), ori_shape=(size, size), pad_shape=(size, size)))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def test_config_builds_the_paper_recipe():
    config = Config.fromfile(str(CONFIG))
    assert config.model.backbone.type == "FlexiViTBackbone"
    assert config.model.decode_head.type == "FCNHead" and config.model.decode_head.num_convs == 0
    assert list(config.model.backbone.train_patch_sizes) == list(flexivit.PAPER_PATCH_SIZES)


def test_training_step_uses_the_iteration_s_patch_size():
    model = tiny_segmentor(dict(mode="whole"))
    optim = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
    hub = MessageHub.get_current_instance()
    sampler = flexivit.UniformSampler([16, 12, 8], seed=0)
    model.train()
    kernel_before = model.backbone.vit.patch_embed.proj.weight.detach().clone()
    for iteration in (0, 1, 2):
        hub.update_info("iter", iteration)
        assert model.backbone.current_patch_size() == (sampler(iteration),) * 2
        losses = model.train_step(batch(), optim)
        assert torch.isfinite(losses["loss"])
    assert not torch.equal(model.backbone.vit.patch_embed.proj.weight, kernel_before)


def test_slide_inference_matches_whole_when_the_window_covers_the_image():
    whole = tiny_segmentor(dict(mode="whole")).eval()
    slide = tiny_segmentor(dict(mode="slide", crop_size=(48, 48), stride=(32, 32)))
    slide.load_state_dict(whole.state_dict())
    slide.eval()
    data = batch(n=1)
    with torch.no_grad():
        a = whole.test_step(data)[0].seg_logits.data
        b = slide.test_step(data)[0].seg_logits.data
    assert a.shape == (5, 48, 48)
    torch.testing.assert_close(a, b)


def test_patch_size_that_does_not_divide_the_input_is_padded():
    model = tiny_segmentor(dict(mode="slide", crop_size=(32, 32), stride=(24, 24))).eval()
    model.backbone.test_patch_size = (12, 12)  # 48 px crops -> padded to 48, 32 px windows -> padded to 36
    with torch.no_grad():
        (features,) = model.backbone(torch.randn(1, 3, 32, 32))
        out = model.test_step(batch(n=1))[0].seg_logits.data
    assert features.shape[-2:] == (8, 8)  # a quarter of the 32 px window
    assert out.shape == (5, 48, 48) and torch.isfinite(out).all()


@needs_fashion_mnist
def test_scenes_config_trains_resumes_and_evaluates_with_the_runner(tmp_path, monkeypatch):
    """configs/mmseg's scenes config (a tiny backbone) through mmengine's Runner on generated ADE20k-layout scenes."""
    from mmengine.runner import Runner

    from tasks.common import scenes

    # mmengine 0.10.7 resumes with a plain torch.load, which torch >= 2.6 refuses without this (docs/segmentation.md).
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    root = tmp_path / "scenes"
    scenes.write_scenes(root, num_train=6, num_val=3, seed=0, spec=scenes.SceneSpec(size=96))
    config = Config.fromfile(str(SCENES_CONFIG))
    assert len(config.metainfo.classes) == config.model.decode_head.num_classes == 12
    config.work_dir = str(tmp_path / "work")
    tiny = dict(depth=1, width=32, num_heads=2, base_patch_size=16, posemb_grid=7)
    config.model.backbone.update(pretrained=None, train_patch_sizes=[16, 12, 8], overrides=tiny)
    config.model.decode_head.update(in_channels=32, channels=32)
    config.train_dataloader.update(batch_size=2)
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        config[loader].dataset.data_root = str(root)
    config.train_cfg = dict(type="IterBasedTrainLoop", max_iters=4, val_interval=4)
    config.default_hooks.checkpoint.update(interval=2)
    config.default_hooks.logger.update(interval=1)
    config.param_scheduler = [dict(type="PolyLR", eta_min=1e-4, power=0.9, begin=0, end=4, by_epoch=False)]

    seen = []  # (iteration, patch size) of every training forward
    current = tasks.mmseg_backbone.FlexiViTBackbone.current_patch_size

    def recording(self):
        size = current(self)
        if self.training:
            seen.append((MessageHub.get_current_instance().get_info("iter"), size[0]))
        return size

    monkeypatch.setattr(tasks.mmseg_backbone.FlexiViTBackbone, "current_patch_size", recording)
    sampler = flexivit.UniformSampler([16, 12, 8], seed=0)
    runner = Runner.from_cfg(config.copy())
    runner.train()
    assert runner.iter == 4
    assert seen == [(i, sampler(i)) for i in range(4)]
    metrics = runner.val_loop.run()
    assert {"mIoU", "aAcc", "mAcc"} <= set(metrics) and 0 <= metrics["mIoU"] <= 100

    # Resume from the iteration-2 checkpoint and train on to 4: the Runner restores iter, so the patch-size sequence
    # (a function of the iteration) continues where it was.
    config.resume, config.load_from = True, str(tmp_path / "work" / "iter_2.pth")
    seen.clear()
    resumed = Runner.from_cfg(config.copy())
    resumed.train()
    assert resumed.iter == 4
    assert seen == [(i, sampler(i)) for i in (2, 3)]


def test_scenes_config_names_what_to_run_first_and_tests_without_it(tmp_path, monkeypatch):
    # mmseg's tools/train.py in a fresh clone: the config's backbone is the main job's workdir, so building the model
    # says how to make it; tools/test.py with --cfg-options model.backbone.pretrained=None needs only the checkpoint.
    monkeypatch.chdir(tmp_path)
    config = Config.fromfile(str(SCENES_CONFIG))
    config.model.backbone.overrides.depth = 1
    with pytest.raises(FileNotFoundError, match=r"bash tools/main\.sh"):
        MODELS.build(config.model)
    config.merge_from_dict({"model.backbone.pretrained": DictAction._parse_iterable("None")})
    assert MODELS.build(config.model).backbone.vit.num_classes == 0


def test_backbone_loads_a_training_workdir_flexified(tmp_path):
    # A tools.train workdir with a FlexiViT of another kernel size: loaded from its last checkpoint, kernel PI-resized.
    source = flexivit.create_model("flexivit_mu", depth=1, width=32, num_heads=2, base_patch_size=8, posemb_grid=6)
    (tmp_path / "checkpoints").mkdir()
    flexivit.save_model(source, tmp_path / "checkpoints" / "ckpt_00000010.pt")
    backbone = tasks.mmseg_backbone.FlexiViTBackbone(
        name="flexivit_mu",
        pretrained=str(tmp_path),
        overrides=dict(depth=1, width=32, num_heads=2, base_patch_size=16, posemb_grid=7),
    )
    expected = flexivit.pi_resize_patch_embed(source.patch_embed.proj.weight.detach(), (16, 16))
    torch.testing.assert_close(backbone.vit.patch_embed.proj.weight, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(backbone.vit.blocks[0].mlp.fc1.weight, source.blocks[0].mlp.fc1.weight)

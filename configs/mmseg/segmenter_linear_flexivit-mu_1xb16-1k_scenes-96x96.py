# Segmenter-Linear with FlexiViT-mu on the generated scenes (ADE20k layout, 12 classes), in mmsegmentation 1.x: the
# embedded default of docs/segmentation.md run through mmseg's own Runner, so that the plug-in can be tried on a CPU.
# `bash tools/mmseg_demo.sh` runs all of it; by hand, from the repository root, first write what it reads (once):
#
#   bash tools/install_mmseg.sh       # mmengine, mmcv, mmseg into .venv
#   bash tools/main.sh                # the classification main job: the backbone, runs/fashion_mnist
#   .venv/bin/python -m tools.make_scenes --out data/scenes --num-train 2000 --num-val 200
#
# then train and test with mmseg's tools (the test takes every weight from the checkpoint, hence pretrained=None;
# TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 because mmengine 0.10.7 reads its own checkpoints with a plain torch.load):
#
#   MIM=$(.venv/bin/python -c "import mmseg, os; print(os.path.dirname(mmseg.__file__))")/.mim/tools
#   CONFIG=configs/mmseg/segmenter_linear_flexivit-mu_1xb16-1k_scenes-96x96.py
#   export PYTHONPATH=. TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1
#   .venv/bin/python $MIM/train.py $CONFIG --work-dir runs/mmseg_scenes
#   .venv/bin/python $MIM/test.py $CONFIG runs/mmseg_scenes/iter_1000.pth \
#       --cfg-options model.backbone.pretrained=None model.backbone.test_patch_size=4
_base_ = ["./segmenter_linear_flexivit-s_8xb1-160k_ade20k-512x512.py"]

crop_size = (96, 96)
classes = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
           "wall", "floor")  # fmt: skip
metainfo = dict(classes=classes, palette=[[(37 * i) % 256, (91 * i) % 256, (151 * i) % 256] for i in range(12)])
data_root = "data/scenes"

model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(
        name="flexivit_mu",
        pretrained="runs/fashion_mnist",  # a tools.train workdir: its last checkpoint, flexified on load
        overrides=dict(depth=4, base_patch_size=16, posemb_grid=7, patch_size=16, drop_path_rate=0.0),
        train_patch_sizes=[16, 12, 8, 6, 4],
        test_patch_size=8,
    ),
    decode_head=dict(in_channels=128, channels=128, num_classes=12),
    test_cfg=dict(mode="slide", crop_size=crop_size, stride=crop_size),
)

train_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations", reduce_zero_label=True),  # category ids 1..12 -> 0..11, unlabelled 0 -> 255
    dict(type="RandomResize", scale=crop_size, ratio_range=(0.75, 1.5), keep_ratio=True),
    dict(type="RandomCrop", crop_size=crop_size, cat_max_ratio=0.75),
    dict(type="RandomFlip", prob=0.5),
    dict(type="PhotoMetricDistortion"),
    dict(type="PackSegInputs"),
]
test_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations", reduce_zero_label=True),
    dict(type="PackSegInputs"),
]
# BaseSegDataset: ADE20KDataset only accepts subsets of its own 150 class names.
dataset = dict(
    type="BaseSegDataset",
    data_root=data_root,
    metainfo=metainfo,
    img_suffix=".jpg",
    seg_map_suffix=".png",
    reduce_zero_label=True,
)
train_dataloader = dict(
    batch_size=16,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(**dataset, data_prefix=dict(img_path="images/training", seg_map_path="annotations/training"),
                 pipeline=train_pipeline),
)  # fmt: skip
val_dataloader = dict(
    batch_size=1,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(**dataset, data_prefix=dict(img_path="images/validation", seg_map_path="annotations/validation"),
                 pipeline=test_pipeline),
)  # fmt: skip
test_dataloader = val_dataloader

# AdamW 1e-3 with poly decay, as configs/segmentation/scenes.py (faster than the recipe's SGD on this tiny model).
optimizer = dict(_delete_=True, type="AdamW", lr=1e-3, weight_decay=0.0)
optim_wrapper = dict(type="OptimWrapper", optimizer=optimizer, clip_grad=None)
param_scheduler = [
    dict(type="LinearLR", start_factor=0.02, begin=0, end=50, by_epoch=False),
    dict(type="PolyLR", eta_min=0.0, power=0.9, begin=50, end=1000, by_epoch=False),
]
train_cfg = dict(type="IterBasedTrainLoop", max_iters=1000, val_interval=1000)
default_hooks = dict(
    logger=dict(interval=25),
    checkpoint=dict(by_epoch=False, interval=500, max_keep_ckpts=2),
)

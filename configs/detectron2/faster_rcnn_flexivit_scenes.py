# Faster R-CNN with a FlexiViT-mu + simple feature pyramid backbone on the generated scenes (COCO instances, ten
# Fashion-MNIST thing classes, 96 px), a detectron2 LazyConfig sized for a CPU. From the repository root, with
# detectron2's source checkout in $D2 (docs/detectron2.md: outside this repository), first write what it reads (once):
#
#   bash tools/main.sh                # the classification main job: the backbone, runs/fashion_mnist
#   .venv/bin/python -m tools.make_scenes --out data/scenes --num-train 2000 --num-val 200
#
# then train (--resume continues from the last checkpoint, at the same patch-size sequence) and evaluate:
#
#   CONFIG=configs/detectron2/faster_rcnn_flexivit_scenes.py
#   PYTHONPATH=. .venv/bin/python $D2/tools/lazyconfig_train_net.py --config-file $CONFIG
#   PYTHONPATH=. .venv/bin/python $D2/tools/lazyconfig_train_net.py --config-file $CONFIG --eval-only \
#       train.init_checkpoint=runs/detectron2_scenes/model_final.pth model.backbone.pretrained=null \
#       model.backbone.test_patch_size=8
#
# (--eval-only takes every weight from train.init_checkpoint, so model.backbone.pretrained=null skips the main job.)
# Training draws one patch size per iteration from (model.backbone.seed, iteration), logged as "patch_size" in
# metrics.json; train.seed makes two runs identical. Evaluation uses model.backbone.test_patch_size
# (tasks.detectron2_backbone.evaluate_patch_sizes sweeps several).
# Mask R-CNN: keep the model zoo's mask head (drop the three "mask_*" lines below) and set
# dataloader.train.mapper.use_instance_mask=True; the scenes' JSON carries RLE masks.
import detectron2.data.transforms as T
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.data import (
    DatasetMapper,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.evaluation import COCOEvaluator
from detectron2.layers import ShapeSpec
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler
from omegaconf import OmegaConf

from tasks.detectron2_backbone import FlexiViTBackbone, register_scenes

SCENES = "data/scenes"
CHANNELS = 64  # pyramid width (ViTDet: 256), smaller for a CPU

# ------------------------------------------------------------------------------------------------ model
model = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
model.backbone = L(FlexiViTBackbone)(
    name="flexivit_mu",
    pretrained="runs/fashion_mnist",  # a tools.train workdir: its last checkpoint, flexified on load
    overrides=dict(depth=4, base_patch_size=16, posemb_grid=7, patch_size=16, drop_path_rate=0.0),
    train_patch_sizes=[16, 12, 8, 6, 4],
    test_patch_size=8,
    seed=0,
    out_channels=CHANNELS,
    scale_factors=(4.0, 2.0, 1.0, 0.5),
    norm="LN",
)
# The project's models take pixels in [-1, 1] (tasks.common.transforms): (x - 127.5) / 127.5 of RGB 0-255.
model.pixel_mean = [127.5, 127.5, 127.5]
model.pixel_std = [127.5, 127.5, 127.5]
model.input_format = "RGB"
# Items are 29-58 px on a 96 px canvas: anchors a quarter of COCO's, one size per level p2-p6.
model.proposal_generator.head.in_channels = CHANNELS
model.proposal_generator.anchor_generator.sizes = [[8], [16], [32], [64], [128]]
model.proposal_generator.batch_size_per_image = 64
model.proposal_generator.pre_nms_topk = (600, 300)
model.proposal_generator.post_nms_topk = (200, 100)
model.roi_heads.num_classes = 10
model.roi_heads.batch_size_per_image = 128
# ROIPooler's level = 4 + log2(sqrt(area) / canonical size): 56 (COCO's 224 / 4) spreads these boxes over p3-p4
# instead of sending all of them to p2.
model.roi_heads.box_pooler.canonical_box_size = 56
model.roi_heads.box_head.input_shape = ShapeSpec(channels=CHANNELS, height=7, width=7)
model.roi_heads.box_head.fc_dims = [256, 256]
model.roi_heads.box_predictor.input_shape = ShapeSpec(channels=256)
model.roi_heads.mask_in_features = None  # Faster R-CNN: no mask branch
model.roi_heads.mask_pooler = None
model.roi_heads.mask_head = None

# ------------------------------------------------------------------------------------------------ data
dataloader = OmegaConf.create()
dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names=L(register_scenes)(root=SCENES, split="train")),
    mapper=L(DatasetMapper)(
        is_train=True,
        augmentations=[
            L(T.ResizeShortestEdge)(short_edge_length=(80, 96, 112, 128), sample_style="choice", max_size=192),
            L(T.RandomFlip)(horizontal=True),
        ],
        image_format="RGB",
        use_instance_mask=False,
    ),
    total_batch_size=4,
    num_workers=1,
)
dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names=L(register_scenes)(root=SCENES, split="val"), filter_empty=False),
    mapper=L(DatasetMapper)(is_train=False, augmentations=[], image_format="RGB"),
    num_workers=1,
)
dataloader.evaluator = L(COCOEvaluator)(dataset_name="${..test.dataset.names}", tasks=("bbox",))

# ------------------------------------------------------------------------------------------------ optimisation
optimizer = model_zoo.get_config("common/optim.py").AdamW
optimizer.lr = 2e-4
optimizer.weight_decay = 0.05
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1], milestones=[400], num_updates=500),
    warmup_length=25 / 500,
    warmup_factor=0.001,
)
train = model_zoo.get_config("common/train.py").train
train.update(output_dir="runs/detectron2_scenes", max_iter=500, eval_period=500, log_period=20, device="cpu")
train.seed = 0  # detectron2's default_setup seeds torch, numpy and random (+ rank): the init and data order repeat
train.checkpointer.update(period=250, max_to_keep=2)

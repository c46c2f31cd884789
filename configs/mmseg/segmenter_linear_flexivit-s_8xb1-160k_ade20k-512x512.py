# Segmenter-Linear with a FlexiViT-S backbone on ADE20k, in mmsegmentation 1.x (paper Sec. 4; docs/reference.md §9).
# Same recipe as mmseg's segmenter_vit-s_fcn_8xb1-160k_ade20k-512x512 (45.75 mIoU with ViT-S/16), the ViT replaced by
# a FlexiViT trained with a random patch size per iteration and tested at `test_patch_size`. It needs
# data/ade/ADEChallengeData2016 (mmseg's layout; not shipped) and downloads the flexivit_s_i1k release on first use.
# From the repository root:
#
#   bash tools/install_mmseg.sh
#   MIM=$(.venv/bin/python -c "import mmseg, os; print(os.path.dirname(mmseg.__file__))")/.mim/tools
#   PYTHONPATH=. .venv/bin/python $MIM/train.py configs/mmseg/segmenter_linear_flexivit-s_8xb1-160k_ade20k-512x512.py
#   (or with mmseg's tools/dist_train.sh from a source checkout, PYTHONPATH=. set the same way)
#
# Evaluate at another patch size: --cfg-options model.backbone.test_patch_size=8 (and model.backbone.pretrained=None
# with test.py, which loads every weight from the checkpoint).
_base_ = [
    "mmseg::_base_/datasets/ade20k.py",
    "mmseg::_base_/default_runtime.py",
    "mmseg::_base_/schedules/schedule_160k.py",
]
custom_imports = dict(imports=["tasks.mmseg_backbone"], allow_failed_imports=False)

crop_size = (512, 512)
data_preprocessor = dict(
    type="SegDataPreProcessor",
    mean=[127.5, 127.5, 127.5],  # the [-1, 1] value range of the big_vision FlexiViT weights
    std=[127.5, 127.5, 127.5],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255,
    size=crop_size,
)
model = dict(
    type="EncoderDecoder",
    data_preprocessor=data_preprocessor,
    backbone=dict(
        type="FlexiViTBackbone",
        name="flexivit_small",
        pretrained="flexivit_s_i1k",  # an official release (cache) or a path; flexified on load
        overrides=dict(drop_path_rate=0.1),
        train_patch_sizes=[48, 40, 30, 24, 20, 16, 15, 12, 10, 8],
        test_patch_size=16,
    ),
    decode_head=dict(
        type="FCNHead",  # num_convs=0: a linear layer per token, Segmenter-Linear
        in_channels=384,
        channels=384,
        num_convs=0,
        dropout_ratio=0.0,
        concat_input=False,
        num_classes=150,
        loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
    ),
    train_cfg=dict(),
    test_cfg=dict(mode="slide", crop_size=(512, 512), stride=(480, 480)),
)
optimizer = dict(type="SGD", lr=0.001, momentum=0.9, weight_decay=0.0)
optim_wrapper = dict(type="OptimWrapper", optimizer=optimizer)
train_dataloader = dict(batch_size=1)  # 8 GPUs x 1
val_dataloader = dict(batch_size=1)

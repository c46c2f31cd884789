"""The full set of UViM panoptic config keys with their defaults (both stages); dataset configs change the rest.

Every key a config may set exists here, so ``--set`` can reject typos (tasks/common/config.py). Recipe facts:
docs/reference.md §10 (COCO panoptic at 512 px, stage I patch 16 with a 256-code, 4096-word dictionary).
"""

from configs.common import engine_config, parse_arg  # noqa: F401  (parse_arg re-exported for the dataset configs)
from tasks.common.config import Config
from tasks.common.optim import big_vision_weight_decay

# The weight decay of big_vision's UViM panoptic recipes (configs/proj/uvim/): stage I vqvae_coco_panoptic.py
# (lr 4e-4, wd 4e-5), stage II train_coco_panoptic_pretrained.py (lr 1e-3, wd 1e-6). It is decoupled from the
# learning rate there (a kernel loses wd * sched(t) of itself per step), so it is converted at this config's own lr.
UVIM_WEIGHT_DECAY = {1: 4e-5, 2: 1e-6}


def base_config(stage: int) -> Config:
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 (the oracle) or 2 (the image-to-codes model), got {stage!r}")
    config = Config(
        task=f"panoptic.stage{stage}",
        model=dict(
            # Stage I (the oracle): one fixed patch size.
            patch_size=16,
            code_len=256,
            dict_size=4096,
            width=768,
            enc_depth=6,
            dec_depth=12,
            num_heads=12,
            mlp_ratio=4.0,
            code_dropout="random",  # none | prefix | random
            seed=0,  # the dictionary's initialisation and split perturbations
            # Stage II: the FlexiViT encoder and the code decoder, on the oracle of `oracle`.
            oracle=None,  # a stage I workdir or checkpoint
            name="flexivit_large",
            init=None,  # FlexiViT weights (.npz / timm / our checkpoint / workdir / release name)
            overrides={},
            decoder_width=1024,
            decoder_depth=24,
            decoder_heads=16,
        ),
        data=dict(
            root=None,  # COCO panoptic layout: panoptic/panoptic_{train,val}.json + PNG folders, images/<split>
            train_split="train2017",
            val_split="val2017",
            image_size=512,
            crop_area=[0.05, 1.0],  # UViM's inception crop
            hflip=True,
            max_instances=100,  # instance channels, id 0 = in no segment
            value_range=[-1.0, 1.0],
            train_examples=None,
            val_examples=None,
            num_workers=4,
            generate=None,  # scene settings (tasks.common.scenes) to write generated scenes at root when missing
        ),
        **engine_config(),
    )
    lr = 1e-3
    decay = big_vision_weight_decay(UVIM_WEIGHT_DECAY[stage], lr)  # torch's AdamW multiplies it by lr: 0.04 / 0.001
    config.optim.update(name="adamw", lr=lr, weight_decay=decay, warmup_steps=1000, clip_norm=1.0)
    config.train.update(steps=100_000, batch_size=512, ckpt_every=5000)
    config.eval.update(batch_size=8)
    if stage == 1:
        config.patch_sizes = dict(kind="fixed", sizes=[16])  # only stage II is flexible
        config.eval.patch_sizes = [16]
    else:
        config.model.update(code_len=None, dict_size=None)  # checks against the oracle; None: its own
        config.optim.lr_mults = {r"^stage2\.encoder\.": 0.1}  # UViM: the pretrained encoder at a tenth of the lr
    return config

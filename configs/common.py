"""The engine's config blocks, shared by every task: seed, patch-size sampler, optimiser, training loop, evaluation
and distillation. A task's ``base_config`` adds its ``model`` and ``data`` blocks and changes the defaults it needs.

Every key a config may set exists here or in the task's base config, so ``--set`` can reject typos
(tasks/common/config.py).
"""

from flexivit import PAPER_PATCH_SIZES
from tasks.common.config import Config


def engine_config() -> Config:
    return Config(
        seed=0,
        # The patch size of each training step: flexivit.build_sampler(kind, sizes, weights, stages).
        patch_sizes=dict(kind="uniform", sizes=list(PAPER_PATCH_SIZES)),
        optim=dict(
            name="sgd",  # sgd | adamw
            lr=0.01,
            weight_decay=0.0,
            momentum=0.9,
            betas=[0.9, 0.999],
            clip_norm=1.0,  # None: no clipping
            accum_steps=1,
            warmup_steps=0,
            schedule="cosine",  # cosine | linear | poly | constant
            end_factor=0.0,  # the learning rate at the end, as a fraction of lr
            lr_mults={},  # {regex on parameter names: learning-rate multiplier}
            frozen=[],  # regexes of parameters that get no gradient, e.g. ["^(?!head)"] trains the head only
        ),
        train=dict(
            steps=1000,
            batch_size=512,
            precision="fp32",  # fp32 | bf16 | fp16 (GPU only)
            # Consistency across patch sizes while training at one (docs/reference.md §12): weight * CE(prediction at a
            # size drawn from `sizes`, detached prediction at the training size). 0 = off. A second forward and
            # backward per step. Classification and segmentation read it.
            consistency=dict(weight=0.0, sizes=[]),
            grad_checkpointing=False,
            compile=False,
            # One forward and backward at the sampler's most expensive patch size before the first step, so that
            # running out of memory there fails at start-up. None: on a GPU only; True / False: always / never.
            memory_check=None,
            tf32=True,  # fp32 on a GPU: matmuls and convolutions in TF32 (tasks/common/precision.py)
            log_every=50,
            ckpt_every=500,
            keep_ckpts=2,
        ),
        # final: evaluate once training ends (off where tools.eval follows with its own sweep, as in tools/main.sh).
        eval=dict(every=0, final=True, patch_sizes=list(PAPER_PATCH_SIZES), batch_size=256),
        # Knowledge distillation (Sec. 3.5): a frozen teacher; see configs.classification.common.distill_config.
        distill=None,
    )


def parse_arg(arg: str | None, allowed=None) -> dict:
    """``"runlocal,fixed=16"`` -> ``{"runlocal": True, "fixed": "16"}`` (big_vision's config-arg style); with
    ``allowed`` (names), an argument outside it is an error instead of being ignored."""
    out = {}
    for token in filter(None, (arg or "").split(",")):
        key, sep, value = token.partition("=")
        out[key] = value if sep else True
    unknown = sorted(set(out) - set(allowed)) if allowed is not None else []
    if unknown:
        raise ValueError(f"unknown config argument(s) {unknown}; this config takes {sorted(allowed)}")
    return out

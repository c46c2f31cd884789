"""Task heads on the FlexiViT backbone, one module (or package) per task, each with the same face for the engine.

``tools/train.py`` imports ``tasks.<config.task>`` and calls these functions; ``tools/eval.py`` the evaluation part.
They take config blocks and plain arguments and return plain values (no base classes):

Required

- ``build_datasets(data, distill=None) -> (train_set, train_transform, val_set, info)``: ``train_transform`` runs
  per item under a seed from ``(seed, epoch, index)`` (tasks/common/loader.py); a task without distillation raises
  when given a ``distill`` block. ``info`` is what ``build_model`` needs (class names, ...).
- ``build_model(model_cfg, info) -> nn.Module``: the backbone (``flexivit.create_model``, weights from
  ``model_cfg.init``) plus the task's head; called as ``model(images, patch_size=p)`` or through the task's loss.
- ``train_loss(net, batch, patch_size, *, step, config, teacher=None) -> (loss, terms)``: the scalar loss of one
  (micro-)batch at the step's patch size, and a dict of named scalar terms (``{"ce": ..., "consistency": ...}``)
  that the engine averages over micro-batches and ranks and logs as ``train/<name>``. ``net`` may be wrapped in
  DDP / torch.compile: call it, do not reach inside. Random draws use the global RNG, which the engine seeds from
  ``(seed, step, rank)`` before every step.
- ``evaluate(model, val_set, patch_sizes, device, autocast_dtype=None, batch_size=...) -> {patch: {metric: value}}``:
  every metric at every patch size, summed over ranks through ``tasks.common.distributed`` (which puts collective
  tensors on the backend's device).

Optional

- ``collate(items) -> batch``: the training batch from a list of items, for variable-length targets (boxes);
  default: torch's ``default_collate``.
- ``image_forward(model) -> fn(images, patch_size=p)``: what ``tools.eval`` and ``tools.deploy`` count (GFLOPs) and
  time; default the model itself.
- ``token_grid(image_hw, patch) -> (gh, gw)``: the token grid at a patch size when the task pads instead of
  dropping the border; default ``image // patch``.
- ``load_model(path_or_workdir) -> nn.Module``: rebuild the task model from one of its checkpoints alone.

Shared pieces live in ``tasks/common``: data loading (``loader``, ``datasets``, ``transforms``), losses that several
tasks use (``losses``: mixup, distillation, the consistency term), optimisers, checkpoints, metrics plumbing.
"""

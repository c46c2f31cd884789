"""Benchmarks: each module is a command, ``python -m tools.benchmarks.<name>`` (``--help``, ``--quick``).

- ``python -m tools.benchmarks`` (``__main__``): docs/benchmarks.md, FlexiViT against timm per patch size, from
  ``speed`` (inference and training step), ``compiled`` (torch.compile, with ``--compile``) and ``input_pipeline``
  (the loader beside the training step), checked against the targets in ``report``.
- ``precision``: bf16 against fp32 and ONNX Runtime against eager PyTorch (docs/benchmarks_deployment.md).
- ``sampler``: the training sampler's index cost at 13M items (docs/benchmarks_index.md).
- ``detection_eval``: time and memory of the detection evaluation at LVIS v1 val's size.
- ``common``: the shared options, alternating timings, peak memory and the two models (ours, timm's).
"""

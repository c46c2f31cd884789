"""Leaving PyTorch at one patch size: a task model with its backbone fixed, exported to ONNX or ``torch.export``.

:class:`FixedSizeModel` copies a task model, replaces every FlexiViT inside it by
:func:`flexivit.fix_patch_size`'s copy (kernel and position embedding resized once and stored) and wraps the task's
image forward at that patch size as a plain ``forward(images)``. The exported graph therefore holds no resize at all:
it is a plain ViT of that patch size plus the task's head (Segmenter's padding, decoder and upsampling; the
contrastive image tower's projection and L2 normalisation; OWL-ViT's box and class heads against its class-name
queries, embedded once at export). A task that cannot be exported this way says why in its
``export_refusal`` (tasks/__init__.py).
"""

from __future__ import annotations

import base64
import copy
import io
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

import flexivit
from flexivit.files import atomic_write
from flexivit.pi_resize import to_2tuple

from .deployment import backbone_of

EXAMPLE_FILE = "example_input.safetensors"  # inside a torch.export archive


class FixedSizeModel(nn.Module):
    """``forward(images)``: the task's image forward (``task.image_forward``) at ``patch_size`` on ``image_size``
    images, every FlexiViT inside replaced by its fixed copy; a task whose ``export_refusal`` is set is refused."""

    def __init__(self, task, model: nn.Module, patch_size, image_size):
        super().__init__()
        if task.export_refusal:
            raise ValueError(f"task {task.name} cannot be exported at one patch size: {task.export_refusal}")
        self.task = task
        self.patch_size = to_2tuple(patch_size, "patch_size")
        self.image_size = to_2tuple(image_size, "image_size")
        grid = task.token_grid(self.image_size, self.patch_size)  # padded (Segmenter) or cropped (the backbone)
        if 0 in grid:  # not one whole patch: the fixed backbone would see an empty image
            raise ValueError(f"patch size {self.patch_size} is larger than the image size {self.image_size}")
        backbone_size = (grid[0] * self.patch_size[0], grid[1] * self.patch_size[1])
        self.model = _fix_backbones(copy.deepcopy(model), self.patch_size, backbone_size)
        self.eval()  # an inference graph: no dropout, no stochastic depth
        # Made once: a task's image forward may precompute (detection embeds its class-name queries here), and that
        # work must neither repeat per call nor be traced into the exported graph.
        forward = task.image_forward(self.model)
        self._forward = lambda images: forward(images, patch_size=self.patch_size)  # a function, not a submodule

    def forward(self, images: torch.Tensor):
        return self._forward(images)


def _fix_backbones(model: nn.Module, patch, image_size) -> nn.Module:
    if isinstance(model, flexivit.FlexiViT):
        return flexivit.fix_patch_size(model, patch, image_size)
    for name, child in list(model.named_children()):
        setattr(model, name, _fix_backbones(child, patch, image_size))
    return model


def example_input(model: FixedSizeModel, batch: int = 2) -> torch.Tensor:
    channels = backbone_of(model).kwargs["in_chans"]
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, channels, *model.image_size, generator=generator)


def _batch_dim():
    return {"images": {0: torch.export.Dim("batch", min=1, max=4096)}}


def export_program(model: FixedSizeModel, path: str | Path, example: torch.Tensor) -> torch.export.ExportedProgram:
    """A ``torch.export`` program with a dynamic batch, saved at ``path`` with ``example`` stored inside the archive.

    Traced with autograd on: the model's no-grad fast paths (in-place GELU, batch groups on CPU) depend on the batch
    size, the plain path does not.
    """
    with torch.enable_grad():
        program = torch.export.export(model, (example,), dynamic_shapes=_batch_dim())
    # torch.export stores extra files as text: the safetensors bytes go in base64.
    extra = {EXAMPLE_FILE: base64.b64encode(save_safetensors_bytes({"images": example.contiguous()})).decode()}
    buffer = io.BytesIO()  # torch.export wants a name ending in .pt2 or a buffer: the temporary file has neither
    torch.export.save(program, buffer, extra_files=extra)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(buffer.getvalue()))
    return program


def load_program(path: str | Path) -> tuple[torch.export.ExportedProgram, torch.Tensor]:
    """``(program, example input)`` of a file :func:`export_program` wrote."""
    extra = {EXAMPLE_FILE: ""}
    program = torch.export.load(str(path), extra_files=extra)
    if not extra[EXAMPLE_FILE]:
        raise ValueError(f"{path} holds no {EXAMPLE_FILE}: was it written by tools.export?")
    return program, load_safetensors_bytes(base64.b64decode(extra[EXAMPLE_FILE]))["images"]


def export_onnx(model: FixedSizeModel, path: str | Path, example: torch.Tensor, opset: int = 18) -> None:
    """An ONNX file with a dynamic batch dimension, written atomically: input ``images``, output ``output`` (or, for
    a task whose forward returns a dict, one output per key, e.g. detection's ``logits`` and ``boxes``)."""
    with torch.no_grad():
        output = model(example)
    output_names = list(output) if isinstance(output, dict) else ["output"]
    with torch.enable_grad():
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            dynamic_shapes=_batch_dim(),
            input_names=["images"],
            output_names=output_names,
            opset_version=opset,
        )
    atomic_write(path, lambda tmp: program.save(tmp))


__all__ = ["FixedSizeModel", "example_input", "export_onnx", "export_program", "load_program"]

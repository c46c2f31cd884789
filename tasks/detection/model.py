"""OWL-ViT (Minderer et al. 2022) on a FlexiViT image tower: box, class and objectness heads on every image token,
queries from a text tower (docs/reference.md §8; scenic ``projects/owl_vit``, HF ``OwlViTForObjectDetection``).

The image tower runs at the patch size of the call, so everything that depends on the token grid (the box prior)
is recomputed from the grid that the backbone returns in every forward; nothing is stored for one size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_iou, generalized_box_iou

from flexivit.model import FlexiViT, PatchSize
from tasks.contrastive.model import ImageTextModel, build_text_tower, text_tokens

from .losses import cxcywh_to_xyxy

# Training prompts: '{}' (the bare class name) plus CLIP's 80 ImageNet templates (Radford et al. 2021; the list of
# open_clip's ``OPENAI_IMAGENET_TEMPLATES``); one is drawn per class per step (docs/reference.md §8).
PROMPT_TEMPLATES_TRAIN: list[str] = [
    "{}",
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
]

# LVIS evaluation averages the logits over these 7 templates (docs/reference.md §8).
PROMPT_TEMPLATES_LVIS_EVAL: list[str] = [
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
]


TEMPLATES = {"clip": PROMPT_TEMPLATES_TRAIN, "lvis": PROMPT_TEMPLATES_LVIS_EVAL}  # the config's names for them


def prompt_templates(value: str | Sequence[str]) -> list[str]:
    """The templates a config names (``data.train_templates`` / ``eval_templates``): a key of TEMPLATES or a list."""
    return list(TEMPLATES[value]) if isinstance(value, str) else list(value)


def _logit(x: torch.Tensor) -> torch.Tensor:
    """scenic's box-bias logit, with its 1e-4 guards so that 0 and 1 stay finite."""
    return torch.log(x + 1e-4) - torch.log1p(-x + 1e-4)


def box_bias(
    grid: Sequence[int],
    patch_size: PatchSize,
    image_hw: Sequence[int],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """OWL-ViT's box prior in logit space for the current token grid: (gh*gw, 4) (cx, cy, w, h), row-major.

    The centre prior of token (r, c) is the patch's **bottom-right corner**, ``((c+1) pw / W, (r+1) ph / H)``
    clipped to [0, 1], not its centre: scenic's comment says so and HF follows it (docs/reference.md §8). The size
    prior is one patch, ``(pw / W, ph / H)``, per axis as HF does (scenic's ``1 / W`` for both is only right on
    square grids). When the patches tile the image this is exactly the reference's ``(c+1) / gw`` and ``1 / gw``;
    when they do not (FlexiViT drops the untiled bottom / right border, paper footnote 3) the priors still sit on
    the patches, in coordinates of the whole (padded) input that the boxes are normalised to.
    """
    gh, gw = grid
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
    H, W = image_hw
    if gh * ph > H or gw * pw > W:
        raise ValueError(f"a {gh}x{gw} grid of {ph}x{pw} patches does not fit an image of size {H}x{W}")
    f64 = dict(dtype=torch.float64, device=device)
    cx = ((torch.arange(gw, **f64) + 1) * pw / W).clamp(0, 1).expand(gh, gw)
    cy = ((torch.arange(gh, **f64) + 1) * ph / H).clamp(0, 1)[:, None].expand(gh, gw)
    w = torch.full((gh, gw), pw / W, **f64)
    h = torch.full((gh, gw), ph / H, **f64)
    return _logit(torch.stack([cx, cy, w, h], dim=-1).reshape(gh * gw, 4)).to(dtype)


def _dense(d_in: int, d_out: int) -> nn.Linear:
    """A linear layer with flax's default init (lecun-normal kernel, variance 1 / fan_in; zero bias), as scenic's."""
    layer = nn.Linear(d_in, d_out)
    std = 1.0 / math.sqrt(d_in) / 0.87962566103423978  # the truncation at 2 sigma shrinks the std by this factor
    nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
    nn.init.zeros_(layer.bias)
    return layer


def _mlp(width: int, out: int, gelu_approximate: str) -> nn.Sequential:
    return nn.Sequential(
        _dense(width, width),
        nn.GELU(approximate=gelu_approximate),
        _dense(width, width),
        nn.GELU(approximate=gelu_approximate),
        _dense(width, out),
    )


class BoxHead(nn.Module):
    """MLP (width -> width -> width -> 4, GELU) + box bias, sigmoid: boxes (B, N, 4) cxcywh in [0, 1].

    The last layer is zero-initialised (weight and bias), so at init every token predicts its prior box.
    """

    def __init__(self, width: int, *, gelu_approximate: str = "tanh"):
        super().__init__()
        self.mlp = _mlp(width, 4, gelu_approximate)
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, tokens: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """tokens (B, N, D), bias (N, 4) from :func:`box_bias` -> (B, N, 4); the sum and sigmoid in float32."""
        return torch.sigmoid(self.mlp(tokens).float() + bias.float())


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """OWL-ViT's L2 normalisation of class embeddings: ``x / (|x| + 1e-6)`` over the last axis."""
    return x / (x.norm(dim=-1, keepdim=True) + 1e-6)


class ClassHead(nn.Module):
    """OWL-ViT's class head: cosine similarity of each token's embedding with each query, shifted and scaled per token.

    ``logits = (<e_i, q_k> + shift_i) * scale_i`` with ``e_i = proj(x_i) / (|proj(x_i)| + 1e-6)``,
    ``shift_i = Dense(1)(x_i)`` (bias init logit(0.01), so every score starts near 0.01) and
    ``scale_i = elu(Dense(1)(x_i)) + 1`` (docs/reference.md §8).

    Query embeddings are used as given, not re-normalised here (scenic and HF normalise them inside the head): the
    caller passes L2-normalised ones, or the mean of L2-normalised template embeddings of a class. Since the logit is
    affine in the query, the mean query gives exactly the mean of the per-template logits, which is what LVIS
    evaluation averages (docs/reference.md §8).
    """

    def __init__(self, width: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Linear(width, embed_dim)
        nn.init.normal_(self.proj.weight, std=1e-6)
        nn.init.zeros_(self.proj.bias)
        self.shift = _dense(width, 1)
        nn.init.constant_(self.shift.bias, math.log(0.01 / 0.99))  # logit(0.01) = -4.595
        self.scale = _dense(width, 1)

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> the raw (unnormalised) class embeddings (B, N, E), in float32."""
        with torch.autocast(tokens.device.type, enabled=False):
            return F.linear(tokens.float(), self.proj.weight.float(), self.proj.bias.float())

    def embed_image(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> the normalised class embeddings (B, N, E), in float32."""
        with torch.autocast(tokens.device.type, enabled=False):
            return _normalise(self.project(tokens))

    def shift_and_scale(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-token logit shift and scale, each (B, N, 1), in float32."""
        with torch.autocast(tokens.device.type, enabled=False):
            x = tokens.float()
            shift = F.linear(x, self.shift.weight.float(), self.shift.bias.float())
            scale = F.elu(F.linear(x, self.scale.weight.float(), self.scale.bias.float())) + 1
            return shift, scale

    def forward(
        self, tokens: torch.Tensor, query_embeds: torch.Tensor, query_valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, N, D), query_embeds (B, Q, E) or (Q, E), query_valid (B, Q) / (Q,) bool or None (all valid)
        -> ``(logits (B, N, Q), class_embeds (B, N, E))``, float32 even under autocast, so that the -1e6 of an
        invalid query and the focal loss stay exact in bf16 training."""
        B, N, _ = tokens.shape
        E = self.proj.out_features
        if query_embeds.ndim == 2:
            query_embeds = query_embeds.expand(B, -1, -1)
        if query_embeds.ndim != 3 or query_embeds.shape[0] != B or query_embeds.shape[-1] != E:
            raise ValueError(f"query_embeds must be (B={B}, Q, E={E}) or (Q, E), got {tuple(query_embeds.shape)}")
        class_embeds = self.embed_image(tokens)
        shift, scale = self.shift_and_scale(tokens)
        with torch.autocast(tokens.device.type, enabled=False):
            logits = torch.einsum("bne,bqe->bnq", class_embeds, query_embeds.float())
            logits = (logits + shift) * scale
        if query_valid is not None:
            valid = query_valid.bool().expand(B, -1) if query_valid.ndim == 1 else query_valid.bool()
            if valid.shape != (B, query_embeds.shape[1]):
                raise ValueError(f"query_valid must be (B, Q) = {(B, query_embeds.shape[1])}, got {tuple(valid.shape)}")
            # torch.where: an invalid slot is exactly -1e6 and passes no gradient to its query embedding.
            logits = torch.where(valid[:, None, :], logits, -1e6)
        return logits, class_embeds


class ObjectnessHead(nn.Module):
    """OWLv2's objectness: a 3-layer MLP -> one logit per token (B, N), on stop-gradient features (Minderer et al.
    2023), so that it does not shape the features of the detection heads."""

    def __init__(self, width: int, *, gelu_approximate: str = "tanh"):
        super().__init__()
        self.mlp = _mlp(width, 1, gelu_approximate)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.mlp(tokens.detach()).float().squeeze(-1)


def one_shot_query_index(pred_boxes: torch.Tensor, class_embeds: torch.Tensor, box: torch.Tensor) -> int:
    """The token whose class embedding is an image-conditioned query for ``box`` (docs/reference.md §8).

    Among the predicted boxes (N, 4) cxcywh with IoU >= 0.8 * (the largest IoU with ``box`` (4,) cxcywh), the one
    whose embedding (N, E) is least similar (dot product) to the image's mean embedding: the most distinctive object
    there. Pass the raw class projections, as scenic's inference code and HF's ``embed_image_query`` do (their class
    head returns the unnormalised ones when called without queries), not the normalised ones.
    If no prediction overlaps the box, GIoU replaces IoU (as HF does); the threshold ``max - 0.2 |max|`` is
    ``0.8 max`` for the non-negative IoU and still keeps the best box when the GIoU maximum is negative.
    """
    pred = cxcywh_to_xyxy(pred_boxes.float())
    query = cxcywh_to_xyxy(box.float().to(pred.device)).reshape(1, 4)
    ious = box_iou(query, pred)[0]  # (N,)
    if ious.max() <= 0:
        ious = generalized_box_iou(query, pred)[0]
    best = ious.max()
    candidates = (ious >= best - 0.2 * best.abs()).nonzero().squeeze(1)
    similarity = class_embeds[candidates].float() @ class_embeds.float().mean(0)
    return int(candidates[similarity.argmin()])


class OwlViT(nn.Module):
    """OWL-ViT: a FlexiViT image tower with detection heads, and a text tower (+ projection) that embeds the queries.

    Args:
        image: a FlexiViT without a classification head (``num_classes=0``).
        text: a text tower of tasks/contrastive/model.py (``tokenize``, ``forward(tokens) -> (K, width)``, ``width``).
        text_proj: text width -> ``embed_dim`` (``nn.Linear`` without bias, or ``nn.Identity``).
        embed_dim: the query / class embedding size.
        objectness: add OWLv2's objectness head.
        query_names: the class names that the prompts name (index = class index of the data), and
        train_templates: the prompt templates that training draws from (default ``PROMPT_TEMPLATES_TRAIN``). Both are
            kept in ``kwargs``, hence in every checkpoint: the model needs them to train and to run inference
            (``make_loss``, ``predict``, ``image_forward``), and a checkpoint alone must rebuild it.

    ``forward(images, query_embeds, query_valid, patch_size=p)`` -> dict ``logits`` (B, N, Q) float32, ``boxes``
    (B, N, 4) cxcywh in [0, 1], ``class_embeds`` (B, N, E), ``objectness`` (B, N) when enabled, ``grid`` (gh, gw).
    """

    def __init__(
        self,
        image: FlexiViT,
        text: nn.Module,
        text_proj: nn.Module,
        embed_dim: int,
        *,
        objectness: bool = False,
        query_names: Sequence[str] = (),
        train_templates: Sequence[str] | None = None,
    ):
        super().__init__()
        if image.head is not None:
            raise ValueError(
                f"the image tower has a classification head ({image.num_classes} classes) that detection never uses "
                "(and unused parameters break DDP): build it with num_classes=0 or call reset_classifier(0)"
            )
        out = text_proj.out_features if isinstance(text_proj, nn.Linear) else text.width
        if out != embed_dim:
            raise ValueError(f"the text projection gives {out} features, expected embed_dim {embed_dim}")
        # Saved with every checkpoint (plain values only); :meth:`from_kwargs` rebuilds the model from them.
        self.kwargs = dict(
            image=dict(image.kwargs),
            text=dict(text.kwargs),
            embed_dim=embed_dim,
            text_proj=isinstance(text_proj, nn.Linear),
            objectness=objectness,
            query_names=list(query_names),
            train_templates=list(PROMPT_TEMPLATES_TRAIN if train_templates is None else train_templates),
        )
        self.image, self.text, self.text_proj = image, text, text_proj
        self.embed_dim, self.objectness_enabled = embed_dim, objectness
        width, gelu = image.width, image.kwargs.get("gelu_approximate", "tanh")
        self.merged_norm = nn.LayerNorm(width, eps=1e-6)  # after the class-token merge (mul-ln)
        self.box_head = BoxHead(width, gelu_approximate=gelu)
        self.class_head = ClassHead(width, embed_dim)
        self.objectness_head = ObjectnessHead(width, gelu_approximate=gelu) if objectness else None

    @property
    def query_names(self) -> list[str]:
        """The class names of the prompts (read-only: a checkpoint stores them through ``kwargs``)."""
        return self.kwargs["query_names"]

    @property
    def train_templates(self) -> list[str]:
        """The templates training prompts are drawn from (read-only, stored like ``query_names``)."""
        return self.kwargs["train_templates"]

    @classmethod
    def from_image_text(cls, model: ImageTextModel, objectness: bool = False, **prompts) -> OwlViT:
        """OWL-ViT initialised from a trained two-tower model (its image tower, text tower and text projection;
        the image projection and the temperature are not used, docs/reference.md §8); ``prompts``:
        ``query_names`` / ``train_templates``."""
        embed_dim = model.kwargs["embed_dim"]
        return cls(model.image, model.text, model.text_proj, embed_dim, objectness=objectness, **prompts)

    @classmethod
    def from_kwargs(cls, kwargs: dict) -> OwlViT:
        """A freshly initialised model of the shape recorded in ``model.kwargs`` (load the checkpoint's state after)."""
        text = build_text_tower(**kwargs["text"])
        embed_dim = kwargs["embed_dim"]
        text_proj = nn.Linear(text.width, embed_dim, bias=False) if kwargs["text_proj"] else nn.Identity()
        return cls(
            FlexiViT(**kwargs["image"]),
            text,
            text_proj,
            embed_dim,
            objectness=kwargs["objectness"],
            # Checkpoints written before the prompts travelled with the model have neither: no names, default templates.
            query_names=kwargs.get("query_names", ()),
            train_templates=kwargs.get("train_templates"),
        )

    # ------------------------------------------------------------------ image side

    def image_features(self, images: torch.Tensor, patch_size: PatchSize | None = None) -> dict:
        """(B, 3, S, S) -> dict ``tokens`` (B, N, D) merged with the class token (``mul-ln``), ``grid``, ``patch_size``.

        mul-ln: every patch token times the class token, then a new LayerNorm (scenic's ``merge_class_token``);
        a backbone without a class token skips the product.
        """
        features = self.image.forward_features(images, patch_size)
        tokens = features["tokens"]
        if "cls" in features:
            tokens = tokens * features["cls"][:, None, :]
        return {"tokens": self.merged_norm(tokens), "grid": features["grid"], "patch_size": features["patch_size"]}

    def _boxes(self, images: torch.Tensor, features: dict) -> torch.Tensor:
        # Recomputed from this call's grid every time (HF caches it for one size: docs/reference.md §8).
        bias = box_bias(features["grid"], features["patch_size"], images.shape[-2:], device=images.device)
        return self.box_head(features["tokens"], bias)

    def forward(
        self,
        images: torch.Tensor,
        query_embeds: torch.Tensor | None = None,
        query_valid: torch.Tensor | None = None,
        patch_size: PatchSize | None = None,
        *,
        query_tokens: torch.Tensor | None = None,
        query_index: torch.Tensor | None = None,
    ) -> dict:
        """Queries as embeddings, or as text: ``query_tokens`` (K, L) of K prompts and ``query_index`` (B, Q) into
        them. Training passes text so that the text tower runs inside this call: under DDP its gradients are then
        synchronised with the rest (a tower run outside the wrapped forward would not be)."""
        if query_tokens is not None:
            if query_index is None:
                raise ValueError("query_tokens needs query_index (B, Q): which prompt fills each query slot")
            query_embeds = self.embed_text(query_tokens)[query_index.clamp(min=0)]  # (B, Q, E)
        if query_embeds is None:
            raise ValueError("give query_embeds, or query_tokens and query_index")
        features = self.image_features(images, patch_size)
        logits, class_embeds = self.class_head(features["tokens"], query_embeds, query_valid)
        out = {
            "logits": logits,
            "boxes": self._boxes(images, features),
            "class_embeds": class_embeds,
            "grid": features["grid"],
        }
        if self.objectness_head is not None:
            out["objectness"] = self.objectness_head(features["tokens"])
        return out

    @torch.no_grad()
    def image_query_embedding(
        self, images: torch.Tensor, box: torch.Tensor, patch_size: PatchSize | None = None
    ) -> torch.Tensor:
        """A one-shot query (E,) from an example image (1, 3, S, S) and a box (4,) cxcywh normalised in it
        (:func:`one_shot_query_index`); use it as a row of ``query_embeds``."""
        if images.ndim != 4 or images.shape[0] != 1:
            raise ValueError(f"image_query_embedding takes one image (1, 3, S, S), got {tuple(images.shape)}")
        if box.shape != (4,):
            raise ValueError(f"box must be (4,) normalised cxcywh, got shape {tuple(box.shape)}")
        features = self.image_features(images, patch_size)
        boxes = self._boxes(images, features)[0]  # (N, 4)
        raw = self.class_head.project(features["tokens"])[0]  # (N, E): the reference selects on these
        # Returned normalised, like every image class embedding (``class_embeds``) and every query this head takes.
        with torch.autocast(raw.device.type, enabled=False):
            return _normalise(raw)[one_shot_query_index(boxes, raw, box)]

    # ------------------------------------------------------------------ text side

    def tokenize(self, texts: list[str], device: torch.device | str | None = None) -> torch.Tensor:
        """The text tower's token ids (K, L), on ``device`` (default: the CPU). The number of prompts K (one per
        class of a training batch) and a padded length L that varies (HF towers) are marked dynamic for
        torch.compile (:func:`~tasks.contrastive.model.text_tokens`): one graph per patch size, not one per (K, L)."""
        return text_tokens(self.text, texts, device, varying_count=True)

    def embed_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(K, L) token ids -> L2-normalised query embeddings (K, E) (text tower, then its projection)."""
        tokens = tokens.to(self.merged_norm.weight.device)
        return F.normalize(self.text_proj(self.text(tokens)).float(), dim=-1)

    def embed_prompts(
        self,
        classnames: Sequence[str],
        templates: Sequence[str],
        device: torch.device | str | None = None,
        *,
        batch_size: int = 256,
    ) -> torch.Tensor:
        """(C, E): for each class the mean over ``templates`` of the normalised embeddings of its prompts.

        Not re-normalised (unlike CLIP zero-shot, docs/reference.md §7): the class head is affine in the query, so
        this mean gives exactly the mean of the per-template logits, which is OWL-ViT's template ensemble (§8).
        Runs with gradients if they are enabled; wrap it in ``torch.no_grad()`` for evaluation.
        """
        for template in templates:
            if "{}" not in template:
                raise ValueError(f"prompt template {template!r} has no '{{}}' for the class name")
        if not classnames or not templates:
            raise ValueError(f"need class names and templates, got {len(classnames)} and {len(templates)}")
        texts = [template.format(name) for name in classnames for template in templates]  # class-major
        parts = [self.embed_text(self.tokenize(texts[i : i + batch_size])) for i in range(0, len(texts), batch_size)]
        embeds = torch.cat(parts).view(len(classnames), len(templates), -1).mean(1)
        return embeds if device is None else embeds.to(device)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for tower in (self.image, self.text):
            if hasattr(tower, "set_grad_checkpointing"):
                tower.set_grad_checkpointing(enable)

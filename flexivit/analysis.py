"""Looking inside a FlexiViT across patch sizes: CKA (paper Sec. 3.6), attention relevance and token similarity
(Sec. 6, Fig. 13), and multi-size ensembles (Appendix J).

- :func:`linear_cka` is linear CKA on one batch; :class:`MinibatchCKA` accumulates the unbiased HSIC estimator over
  minibatches (Nguyen et al. 2021, the "minibatch CKA" the paper applies), so that large evaluation sets fit.
- :func:`layer_features` gives, per block, the class token and the patch-token map brought to a common grid by area
  averaging (the grids of two patch sizes differ; the paper compares "feature map representations across grid
  sizes"), flattened per image.
- :func:`attention_relevance` is Chefer et al.'s relevance for the class token (the method the paper cites as [9]):
  ``R <- R + mean_heads(relu(dA/dy * A)) R`` over the blocks, starting from the identity, for the predicted (or a
  given) class; the patch row of the class token is the map, normalised to sum to 1. :func:`attention_rollout`
  (Abnar & Zuidema 2020) serves backbones without a head.
- :func:`token_similarity` is the cosine similarity of the seed token at the centre of one patch size's map to every
  token of another patch size's map (Fig. 13 bottom), averaged over images.
- :func:`ensemble_logits` averages the softmax of the same weights at several patch sizes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .model import Attention, FlexiViT, PatchSize, in_eval_mode
from .pi_resize import to_2tuple

# ---------------------------------------------------------------------------------------------------- CKA


def _centred_gram(x: torch.Tensor) -> torch.Tensor:
    x = x.flatten(1).double()
    gram = x @ x.T
    n = gram.shape[0]
    h = torch.eye(n, dtype=gram.dtype, device=gram.device) - 1.0 / n
    return h @ gram @ h


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two representations of the same n examples, (n, ...) each (flattened per example):
    ``HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))`` with centred linear Gram matrices (Kornblith et al. 2019)."""
    k, l_ = _centred_gram(x), _centred_gram(y)
    return float((k * l_).sum() / (k.norm() * l_.norm()))


def _unbiased_hsic(k: torch.Tensor, l_: torch.Tensor) -> torch.Tensor:
    """The unbiased HSIC estimator of Song et al. (2012), used per minibatch by minibatch CKA."""
    n = k.shape[0]
    k, l_ = k.clone(), l_.clone()
    k.fill_diagonal_(0)
    l_.fill_diagonal_(0)
    ones = torch.ones(n, 1, dtype=k.dtype, device=k.device)
    trace = (k * l_.T).sum()
    middle = (ones.T @ k @ ones) * (ones.T @ l_ @ ones) / ((n - 1) * (n - 2))
    last = 2.0 / (n - 2) * (ones.T @ k @ l_ @ ones)
    return ((trace + middle - last) / (n * (n - 3))).squeeze()


class MinibatchCKA:
    """Linear CKA accumulated over minibatches b:
    ``sum_b HSIC_1(K_b, L_b) / sqrt(sum_b HSIC_1(K_b, K_b) * sum_b HSIC_1(L_b, L_b))``, with the unbiased estimator
    HSIC_1 on batches of at least 4 examples. Over many batches it converges to full-batch CKA."""

    def __init__(self):
        self.xy = self.xx = self.yy = 0.0

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if x.shape[0] < 4:
            raise ValueError(f"minibatch CKA needs at least 4 examples per batch, got {x.shape[0]}")
        xf, yf = x.flatten(1).double(), y.flatten(1).double()
        k, l_ = xf @ xf.T, yf @ yf.T
        self.xy += float(_unbiased_hsic(k, l_))
        self.xx += float(_unbiased_hsic(k, k))
        self.yy += float(_unbiased_hsic(l_, l_))

    def value(self) -> float:
        return self.xy / (self.xx * self.yy) ** 0.5


# ---------------------------------------------------------------------------------------------- features


@torch.no_grad()
def layer_features(model: FlexiViT, images: torch.Tensor, patch_size: PatchSize, common_grid: PatchSize) -> dict:
    """``{"cls": [per block (B, D)], "map": [per block (B, gh*gw*D)]}`` at ``patch_size``: every block's class token
    and its patch-token map area-averaged to ``common_grid`` (which must not exceed this patch size's grid)."""
    grid = to_2tuple(common_grid, "common_grid")
    features = model.forward_features(images, patch_size, return_blocks=True)
    gh, gw = features["grid"]
    if grid[0] > gh or grid[1] > gw:
        raise ValueError(f"common grid {grid} is finer than the grid {(gh, gw)} of patch size {patch_size}")
    prefix = model.num_prefix_tokens
    out = {"cls": [], "map": []}
    for block in features["blocks"]:
        if prefix:
            out["cls"].append(block[:, 0])
        tokens = block[:, prefix:].transpose(1, 2).reshape(block.shape[0], -1, gh, gw)
        out["map"].append(F.adaptive_avg_pool2d(tokens, grid).flatten(1))
    return out


@torch.no_grad()
def token_map(model: FlexiViT, images: torch.Tensor, patch_size: PatchSize, block: int = -1) -> torch.Tensor:
    """The patch tokens of ``block`` (default: after the final norm) as a map (B, D, gh, gw)."""
    if block == -1:
        features = model.forward_features(images, patch_size)
        tokens = features["tokens"]
    else:
        features = model.forward_features(images, patch_size, return_blocks=[block])
        tokens = features["blocks"][0][:, model.num_prefix_tokens :]
    gh, gw = features["grid"]
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, gh, gw)


@torch.no_grad()
def token_similarity(
    model: FlexiViT, images: torch.Tensor, seed_patch: PatchSize, other_patch: PatchSize, block: int = -1
) -> torch.Tensor:
    """(gh, gw) map at ``other_patch``: cosine similarity of each token to the centre token at ``seed_patch``
    (row gh // 2, column gw // 2 of that grid), averaged over the images."""
    seed_map = token_map(model, images, seed_patch, block)
    other = token_map(model, images, other_patch, block)
    seed = seed_map[:, :, seed_map.shape[2] // 2, seed_map.shape[3] // 2]  # (B, D)
    cosine = F.cosine_similarity(other, seed[:, :, None, None], dim=1)  # (B, gh, gw)
    return cosine.mean(0)


# ---------------------------------------------------------------------------------------------- relevance


@contextlib.contextmanager
def _recorded_attention(model: FlexiViT):
    """Every block's attention written out (softmax(q k^T / sqrt(d)) v) with its probabilities kept for autograd;
    the fused kernel does not expose them. Restores the modules on exit."""
    records = []

    def explicit(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(-1)  # (B, heads, T, T)
        if attn.requires_grad:
            attn.retain_grad()
        records.append(attn)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, t, d))

    modules = [m for m in model.modules() if isinstance(m, Attention)]
    for module in modules:
        module.forward = explicit.__get__(module)
    try:
        yield records
    finally:
        for module in modules:
            del module.forward  # back to the class's method


@in_eval_mode
def attention_relevance(
    model: FlexiViT, images: torch.Tensor, patch_size: PatchSize, target: Sequence[int] | None = None
) -> torch.Tensor:
    """(B, gh, gw) relevance of each patch for the class token's prediction (Chefer et al. 2021), each map summing
    to 1. ``target``: the class per image (default: the predicted one). Needs a class token and a head."""
    if model.cls_token is None or model.head is None:
        raise ValueError("attention relevance needs a class token and a classification head")
    with torch.enable_grad(), _recorded_attention(model) as records:
        x = images.detach().requires_grad_(False)
        logits = model(x, patch_size=patch_size)
        classes = logits.argmax(-1) if target is None else torch.as_tensor(target, device=logits.device)
        logits.gather(1, classes[:, None]).sum().backward()
        b, t = logits.shape[0], records[0].shape[-1]
        relevance = torch.eye(t, device=logits.device).expand(b, t, t).clone()
        for attn in records:
            cam = (attn.grad * attn).clamp(min=0).mean(1)  # (B, T, T)
            relevance = relevance + cam @ relevance
    model.zero_grad(set_to_none=True)
    ph, pw = model.resolve_patch_size(images.shape[-2:], patch_size)
    gh, gw = images.shape[-2] // ph, images.shape[-1] // pw
    row = relevance[:, 0, model.num_prefix_tokens :].detach()
    row = row / row.sum(-1, keepdim=True).clamp(min=1e-12)
    return row.reshape(b, gh, gw)


@torch.no_grad()
def attention_rollout(model: FlexiViT, images: torch.Tensor, patch_size: PatchSize) -> torch.Tensor:
    """(B, gh, gw) attention rollout of the class token (Abnar & Zuidema 2020) for a backbone without a head:
    ``R <- (A_mean + I) / 2 normalised per row, times R`` over the blocks; each map sums to 1."""
    if model.cls_token is None:
        raise ValueError("attention rollout follows the class token; this model has none")
    with _recorded_attention(model) as records:
        model.forward_features(images, patch_size)
    b, t = images.shape[0], records[0].shape[-1]
    relevance = torch.eye(t, device=images.device).expand(b, t, t)
    for attn in records:
        mixed = 0.5 * attn.mean(1) + 0.5 * torch.eye(t, device=images.device)
        relevance = (mixed / mixed.sum(-1, keepdim=True)) @ relevance
    ph, pw = model.resolve_patch_size(images.shape[-2:], patch_size)
    row = relevance[:, 0, model.num_prefix_tokens :]
    return (row / row.sum(-1, keepdim=True)).reshape(b, images.shape[-2] // ph, images.shape[-1] // pw)


# ---------------------------------------------------------------------------------------------- ensembles


@torch.no_grad()
def ensemble_logits(model: FlexiViT, images: torch.Tensor, patch_sizes: Sequence[PatchSize]) -> torch.Tensor:
    """Log of the mean softmax over ``patch_sizes`` (Appendix J): the same weights run at each size. At one size
    it is that size's log-softmax, so its argmax is the single model's prediction."""
    probs = torch.stack([model(images, patch_size=p).float().softmax(-1) for p in patch_sizes]).mean(0)
    return probs.log()


__all__ = [
    "MinibatchCKA",
    "attention_relevance",
    "attention_rollout",
    "ensemble_logits",
    "layer_features",
    "linear_cka",
    "token_map",
    "token_similarity",
]

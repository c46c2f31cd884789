"""Evaluating an image-text model at a list of patch sizes: zero-shot classification and image-text retrieval.

The text side does not depend on the patch size: class prompts and captions are embedded once, the images once per
patch size (paper Fig. 10 is retrieval of one model evaluated at many sequence lengths). Images are split across
data-parallel ranks and their embeddings gathered, so every rank computes the same metrics.

Ties count against the query: a relevant item ranked level with a non-relevant one is not ahead of it. So a
constant model scores 0, not 100 %, and the result never depends on the order of the candidates.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from torch.utils.data import Dataset

from tasks.common import distributed
from tasks.common.loader import eval_loader
from tasks.common.precision import autocast

from .data import ImageTextSet

RECALL_KS = (1, 5, 10)


class EvalData(Dataset):
    """The evaluation data of the contrastive task: a zero-shot classification set, a retrieval set, or both.

    Args:
        zeroshot: a classification dataset, items ``(image tensor, label)``, with the evaluation transform applied.
        classnames: its class names, put into ``templates`` (format strings such as "a photo of a {}.").
        retrieval: an :class:`ImageTextSet` with the evaluation transform.

    Indexing gives the (retrieval, else zero-shot) images, which ``tools.eval`` uses to time the image tower.
    """

    def __init__(
        self,
        *,
        zeroshot: Dataset | None = None,
        classnames: Sequence[str] = (),
        templates: Sequence[str] = (),
        retrieval: ImageTextSet | None = None,
    ):
        if zeroshot is None and retrieval is None:
            raise ValueError("nothing to evaluate: give a zero-shot set, a retrieval set or both")
        if zeroshot is not None and not (classnames and templates):
            raise ValueError("zero-shot classification needs class names and prompt templates")
        self.zeroshot, self.classnames, self.templates = zeroshot, list(classnames), list(templates)
        self.retrieval = retrieval

    def __len__(self) -> int:
        return len(self.retrieval if self.retrieval is not None else self.zeroshot)

    def __getitem__(self, index: int):
        return (self.retrieval if self.retrieval is not None else self.zeroshot)[index]


# ------------------------------------------------------------------------------------------------ metrics


def hits_at_k(scores: torch.Tensor, relevant: torch.Tensor, ks: Sequence[int]) -> dict[int, torch.Tensor]:
    """Per query (row), whether a relevant candidate (column) is in the top k: ``{k: (Q,) bool}``.

    A query's rank is 1 + the number of non-relevant candidates scoring at least as high as its best relevant one
    (ties against the query). Every query needs at least one relevant candidate.
    """
    if not relevant.any(1).all():
        raise ValueError(f"{int((~relevant.any(1)).sum())} queries have no relevant candidate")
    best = scores.masked_fill(~relevant, float("-inf")).amax(1, keepdim=True)  # (Q, 1)
    ahead = ((scores >= best) & ~relevant).sum(1)  # (Q,) non-relevant candidates not behind the best relevant one
    return {k: ahead < k for k in ks}


def recall_at_k(
    queries: torch.Tensor, candidates: torch.Tensor, relevant: torch.Tensor, ks: Sequence[int], chunk: int = 1024
) -> dict[int, float]:
    """Fraction of queries (Q, D) with a relevant candidate (C, D) in the top k by dot product; ``relevant`` (Q, C)."""
    hits = {k: 0 for k in ks}
    for start in range(0, len(queries), chunk):  # bounded memory for COCO-sized galleries
        scores = queries[start : start + chunk] @ candidates.T
        for k, hit in hits_at_k(scores, relevant[start : start + chunk], ks).items():
            hits[k] += int(hit.sum())
    return {k: hits[k] / len(queries) for k in ks}


def caption_relevance(captions: Sequence[Sequence[str]]) -> tuple[list[str], torch.Tensor]:
    """The distinct caption texts and the (images, texts) relevance: text t is relevant to image i when it is one of
    image i's captions.

    Identical captions are one candidate, relevant to every image that has it: with templated captions shared by
    many images, duplicates would otherwise fill the top k with copies of one text. On Flickr30k / COCO, where
    captions are almost all distinct, this is the usual setup (every caption a query, its image the positive).
    """
    ids = {text: k for k, text in enumerate(dict.fromkeys(text for group in captions for text in group))}
    relevant = torch.zeros(len(captions), len(ids), dtype=torch.bool)  # (images, distinct texts)
    for i, group in enumerate(captions):
        relevant[i, [ids[text] for text in group]] = True
    return list(ids), relevant


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor, relevant: torch.Tensor) -> dict:
    """R@1/5/10 image->text (``i2t_r{k}``) and text->image (``t2i_r{k}``) of L2-normalised features."""
    i2t = recall_at_k(image_features, text_features, relevant, RECALL_KS)
    t2i = recall_at_k(text_features, image_features, relevant.T, RECALL_KS)
    return {**{f"i2t_r{k}": v for k, v in i2t.items()}, **{f"t2i_r{k}": v for k, v in t2i.items()}}


def zeroshot_classifier(model, classnames: Sequence[str], templates: Sequence[str], device) -> torch.Tensor:
    """(D, C) class embeddings: every prompt embedded and L2-normalised, averaged per class, re-normalised (CLIP)."""
    return build_zero_shot_classifier(model, model.tokenize, classnames, templates, device=device).float()


def zeroshot_metrics(image_features: torch.Tensor, classifier: torch.Tensor, labels: torch.Tensor) -> dict:
    """Top-1 / top-5 accuracy of logits = 100 * cos(image, class embedding)."""
    logits = 100.0 * image_features @ classifier  # (N, C)
    relevant = F.one_hot(labels, classifier.shape[1]).bool()
    hits = hits_at_k(logits, relevant, (1, 5))
    return {"top1": hits[1].float().mean().item(), "top5": hits[5].float().mean().item()}


# ------------------------------------------------------------------------------------------------ embedding


@torch.no_grad()
def encode_images(
    model, dataset: Dataset, patch_sizes: Sequence, device, autocast_dtype=None, batch_size: int = 256
) -> tuple[dict, torch.Tensor]:
    """L2-normalised image embeddings of all of ``dataset`` at each patch size (``{patch: (N, D)}``, float32, on the
    CPU) and the items' second entries (labels or indices) (N,). Each rank embeds its share; all ranks get all rows."""
    rank, world = distributed.rank(), distributed.world_size()
    features: dict = {patch: [] for patch in patch_sizes}
    extras = []
    for images, extra in eval_loader(dataset, batch_size=batch_size, rank=rank, world=world):
        images = images.to(device)
        for patch in patch_sizes:
            with autocast(device, autocast_dtype):
                features[patch].append(model.encode_image(images, patch_size=patch, normalize=True).float().cpu())
        extras.append(torch.as_tensor(extra))
    n = len(dataset)
    gathered = {p: _gather_interleaved(f, n) for p, f in features.items()}
    return gathered, _gather_interleaved(extras, n)


@torch.no_grad()
def encode_texts(model, texts: Sequence[str], device, autocast_dtype=None, batch_size: int = 256) -> torch.Tensor:
    """L2-normalised text embeddings (T, D), float32 on the CPU (every rank embeds all texts: they are cheap)."""
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = model.tokenize(list(texts[start : start + batch_size])).to(device)
        with autocast(device, autocast_dtype):
            out.append(model.encode_text(tokens, normalize=True).float().cpu())
    return torch.cat(out)


def _gather_interleaved(chunks: list[torch.Tensor], total: int) -> torch.Tensor:
    """This rank's rows (``chunks``, concatenated: rows ``rank, rank + world, ...``, eval_loader's split) and every
    other rank's -> all ``total`` rows in order, on the CPU.

    A rank may have no rows (fewer items than ranks: 3 images over 4 ranks); it then learns the rows' shape and
    dtype from a rank that has some, and still takes part in the gather the others wait in.
    """
    world = distributed.world_size()
    if world == 1:
        return torch.cat(chunks)
    local = torch.cat(chunks) if chunks else None
    if total < world:  # some rank (rank >= total) has no rows; every rank knows, from total and world alone
        shapes = distributed.all_gather_object(None if local is None else (local.shape[1:], local.dtype))
        row_shape, dtype = next(shape for shape in shapes if shape is not None)
        if local is None:
            local = torch.empty(0, *row_shape, dtype=dtype)
    per_rank = -(-total // world)
    padded = local.new_zeros(per_rank, *local.shape[1:])
    padded[: len(local)] = local
    parts = distributed.all_gather(padded)
    # Row k of rank r is item k * world + r; the padding lands at items >= total.
    return torch.stack(parts, 1).flatten(0, 1)[:total].cpu()

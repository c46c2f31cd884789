"""UViM stage II: a FlexiViT image encoder and an autoregressive decoder of stage I's codes (docs/reference.md §10).

The encoder is the part the paper makes flexible (Sec. 4): its tokens, at whatever grid this call's patch size
gives, are the memory the decoder cross-attends to, so one decoder serves every patch size. The decoder predicts
the oracle's code sequence left to right: vocabulary = dictionary + 1 (targets are ``code + 1``, 0 is the
beginning-of-sequence token and the inputs are the targets shifted right), learned position embedding, pre-norm
layers of causal self-attention -> cross-attention -> MLP, trained with teacher forcing. :meth:`CodeDecoder.generate`
decodes greedily (or with a temperature) with a key / value cache; the frozen stage I decoder turns the codes into a
panoptic map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import flexivit
from flexivit.model import FlexiViT, Mlp
from tasks import Task
from tasks.common.distributed import unwrap
from tasks.common.precision import autocast
from tasks.common.train_state import load_weights, resolve_checkpoint

from . import stage1
from .data import build_datasets, evaluate_pq
from .inference import predict
from .stage1 import Oracle, to_panoptic

__all__ = [
    "TASK",
    "CodeDecoder",
    "Stage2",
    "UViM",
    "build_datasets",
    "build_model",
    "evaluate",
    "image_forward",
    "load_model",
    "make_loss",
    "predict",
]

BOS = 0  # the beginning-of-sequence token; code k is token k + 1


class _Attention(nn.Module):
    """Multi-head attention with separate query and key / value inputs (self- or cross-attention)."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q, self.kv, self.out = nn.Linear(width, width), nn.Linear(width, 2 * width), nn.Linear(width, width)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv(x).chunk(2, dim=-1)
        return self._heads(k), self._heads(v)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
        out = F.scaled_dot_product_attention(self._heads(self.q(x)), k, v, is_causal=causal)
        return self.out(out.transpose(1, 2).flatten(2))


class DecoderLayer(nn.Module):
    """Pre-norm: causal self-attention, cross-attention to the image tokens, MLP; each with a residual."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1, self.self_attn = nn.LayerNorm(width, eps=1e-6), _Attention(width, num_heads)
        self.norm2, self.cross_attn = nn.LayerNorm(width, eps=1e-6), _Attention(width, num_heads)
        self.norm3, self.mlp = (
            nn.LayerNorm(width, eps=1e-6),
            Mlp(width, hidden=int(width * mlp_ratio), gelu_approximate="tanh"),
        )

    def forward(self, x: torch.Tensor, memory: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        """``x`` (B, T, D) and ``memory`` (B, N, D). With ``cache`` (a dict kept by the caller), ``x`` holds only the
        new positions: their keys / values are appended to the cached ones, and memory's are computed once."""
        h = self.norm1(x)
        k, v = self.self_attn.keys_values(h)
        if cache is not None:
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        # Causal over the whole sequence; with a cache the new position sees every cached one, which is causal too.
        x = x + self.self_attn(h, k, v, causal=cache is None)
        if cache is not None and "memory_kv" in cache:
            mk, mv = cache["memory_kv"]
        else:
            mk, mv = self.cross_attn.keys_values(memory)
            if cache is not None:
                cache["memory_kv"] = (mk, mv)
        x = x + self.cross_attn(self.norm2(x), mk, mv)
        return x + self.mlp(self.norm3(x))


class CodeDecoder(nn.Module):
    """Autoregressive decoder of ``code_len`` codes from a ``dict_size`` dictionary, conditioned on image tokens."""

    def __init__(self, dict_size: int, code_len: int, width: int, depth: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.dict_size, self.code_len = dict_size, code_len
        # Saved with every checkpoint (plain values only): the decoder is rebuilt from them.
        self.kwargs = dict(
            dict_size=dict_size, code_len=code_len, width=width, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio
        )
        self.embed = nn.Embedding(dict_size + 1, width)
        self.posemb = nn.Parameter(torch.randn(1, code_len, width) * 0.02)
        self.layers = nn.ModuleList([DecoderLayer(width, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width, dict_size + 1)

    def forward(self, codes: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: codes (B, L) of the oracle -> logits (B, L, dict_size + 1) for the targets ``codes + 1``."""
        tokens = torch.cat([torch.full_like(codes[:, :1], BOS), codes[:, :-1] + 1], dim=1)  # shifted right
        x = self.embed(tokens) + self.posemb[:, : tokens.shape[1]]
        for layer in self.layers:
            x = layer(x, memory)
        return self.head(self.norm(x))

    @torch.no_grad()
    def generate(
        self,
        memory: torch.Tensor,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Codes (B, code_len) decoded left to right: greedy at ``temperature`` 0 (UViM: 1e-7, the same thing),
        else sampled from softmax(logits / temperature). BOS is never emitted."""
        b = memory.shape[0]
        tokens = torch.full((b, 1), BOS, dtype=torch.long, device=memory.device)
        caches = [{} for _ in self.layers] if use_cache else None
        for t in range(self.code_len):
            if use_cache:
                x = self.embed(tokens[:, -1:]) + self.posemb[:, t : t + 1]
                for layer, cache in zip(self.layers, caches, strict=True):
                    x = layer(x, memory, cache)
            else:
                x = self.embed(tokens) + self.posemb[:, : t + 1]
                for layer in self.layers:
                    x = layer(x, memory)
            logits = self.head(self.norm(x[:, -1])).float()
            logits[:, BOS] = float("-inf")
            if temperature > 0:
                probs = torch.softmax(logits / temperature, dim=-1)
                token = torch.multinomial(probs.cpu(), 1, generator=generator).to(memory.device)
            else:
                token = logits.argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, token], dim=1)
        return tokens[:, 1:] - 1


class Stage2(nn.Module):
    """A FlexiViT (no head) whose tokens, projected to the decoder's width, condition a :class:`CodeDecoder`."""

    def __init__(self, encoder: FlexiViT, decoder: CodeDecoder):
        super().__init__()
        if encoder.head is not None:
            raise ValueError("the stage II encoder must have no classification head (build it with num_classes=0)")
        width = decoder.embed.embedding_dim
        self.encoder, self.decoder = encoder, decoder
        self.project = nn.Identity() if encoder.width == width else nn.Linear(encoder.width, width)

    def memory(self, images: torch.Tensor, patch_size=None) -> torch.Tensor:
        """The image tokens at this call's patch size, (B, N, width); N follows the grid."""
        features = self.encoder.forward_features(images, patch_size)
        tokens = features["tokens"]
        if "cls" in features:
            tokens = torch.cat([features["cls"][:, None], tokens], dim=1)
        return self.project(tokens)

    def forward(self, images: torch.Tensor, codes: torch.Tensor, patch_size=None) -> torch.Tensor:
        return self.decoder(codes, self.memory(images, patch_size))

    def generate(self, images: torch.Tensor, patch_size=None, **kwargs) -> torch.Tensor:
        return self.decoder.generate(self.memory(images, patch_size), **kwargs)


def code_loss(logits: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy against the targets ``codes + 1``."""
    return F.cross_entropy(logits.float().flatten(0, 1), (codes + 1).flatten())


class UViM(nn.Module):
    """Stage II together with the frozen stage I oracle whose codes it learns to predict (and whose decoder turns
    predicted codes into maps). The oracle stays in eval mode: its dictionary never changes in stage II."""

    def __init__(self, stage2: Stage2, oracle: Oracle):
        super().__init__()
        self.stage2, self.oracle = stage2, oracle
        oracle.requires_grad_(False)
        self.kwargs = dict(
            encoder=dict(stage2.encoder.kwargs), decoder=dict(stage2.decoder.kwargs), oracle=dict(oracle.kwargs)
        )

    def train(self, mode: bool = True) -> UViM:
        super().train(mode)
        self.oracle.eval()
        return self

    def forward(self, images: torch.Tensor, codes: torch.Tensor, patch_size=None) -> torch.Tensor:
        return self.stage2(images, codes, patch_size)

    @torch.no_grad()
    def target_codes(self, images, semantic, instance) -> torch.Tensor:
        return self.oracle.encode(images, semantic, instance, update_dict=False)["codes"]

    @torch.no_grad()
    def predict(self, images: torch.Tensor, patch_size=None, **generate_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Images -> ``(semantic, instance)`` maps at the model size: codes decoded by stage II at ``patch_size``,
        then the oracle's decoder (with the image as its context)."""
        codes = self.stage2.generate(images, patch_size, **generate_kwargs)
        return to_panoptic(self.oracle.decode(codes, images))


# ---------------------------------------------------------------------------------------------- the task face
# ``task="panoptic.stage2"``: tools/train.py trains stage II with these; tools.eval sweeps its patch sizes.


def build_model(model_cfg, info) -> UViM:
    """Stage II on the oracle of ``model_cfg.oracle`` (a stage I workdir or checkpoint), its encoder a FlexiViT
    (``model_cfg.name`` / ``overrides``, weights from ``model_cfg.init`` by flexivit.create_model's rules)."""
    if not model_cfg.oracle:
        raise ValueError("model.oracle must name the stage I workdir or checkpoint whose codes stage II predicts")
    oracle = stage1.load_model(model_cfg.oracle)
    source = resolve_checkpoint(model_cfg.oracle)
    for key, want in (("code_len", model_cfg.code_len), ("dict_size", model_cfg.dict_size)):
        if want is not None and oracle.kwargs[key] != want:
            raise ValueError(f"{source}: the oracle has {key} {oracle.kwargs[key]}, but model.{key} is {want}")
    for key in ("num_classes", "image_size", "max_instances"):
        if oracle.kwargs[key] != info[key]:
            raise ValueError(
                f"{source}: the oracle was trained with {key} {oracle.kwargs[key]}, the data has {info[key]}"
            )
    init = resolve_checkpoint(model_cfg.init) if model_cfg.init else None  # a workdir: its last checkpoint
    encoder = flexivit.create_model(
        model_cfg.name, pretrained=init, **{**(model_cfg.overrides or {}), "num_classes": 0}
    )
    decoder = CodeDecoder(
        oracle.kwargs["dict_size"],
        oracle.kwargs["code_len"],
        model_cfg.decoder_width,
        model_cfg.decoder_depth,
        model_cfg.decoder_heads,
    )
    return UViM(Stage2(encoder, decoder), oracle)


def load_model(path) -> UViM:
    """Rebuild a stage II model (with its oracle) from a checkpoint the engine wrote, from the file alone."""
    path = resolve_checkpoint(path)
    state, meta = flexivit.read_checkpoint(path)
    kwargs = meta.get("model_kwargs") or {}
    if not {"encoder", "decoder", "oracle"} <= set(kwargs):
        raise flexivit.CheckpointError(f"{path} is not a UViM stage II checkpoint (no encoder / decoder / oracle)")
    stage2 = Stage2(FlexiViT(**kwargs["encoder"]), CodeDecoder(**kwargs["decoder"]))
    model = UViM(stage2, Oracle.from_kwargs(kwargs["oracle"]))
    return load_weights(model, state, path)


def make_loss(config, info, teacher=None):
    """Token cross-entropy of the oracle's codes of the ground truth, teacher-forced, at the step's patch size; no
    config key changes it (and the contract refuses a teacher: ``engine_features`` is empty)."""

    def loss(net, batch, patch_size, step: int) -> tuple[torch.Tensor, dict]:
        images, semantic, instance = batch
        # The frozen oracle runs outside the wrapper's forward: it has no gradient for DDP to synchronise.
        codes = unwrap(net).target_codes(images, semantic, instance)
        logits = net(images, codes, patch_size=patch_size)
        ce = code_loss(logits, codes)
        accuracy = (logits.detach()[..., 1:].argmax(-1) == codes).float().mean()
        return ce, {"code_ce": ce.detach(), "code_accuracy": accuracy}

    return loss


@torch.no_grad()
@flexivit.in_eval_mode
def evaluate(model: UViM, val_set, patch_sizes, device, autocast_dtype=None, batch_size: int = 8) -> dict:
    """PQ at every patch size: codes decoded greedily by stage II, maps by the oracle's decoder, under the training
    precision's autocast (``autocast_dtype``; None: float32) like every task's evaluation."""

    def predict(images, semantic, instance, patch):
        with autocast(torch.device(device), autocast_dtype):
            return model.predict(images, patch)

    return evaluate_pq(predict, val_set, patch_sizes, device, batch_size)


def image_forward(model: UViM):
    """What tools.eval counts and times: the whole inference — encoder, greedy code decoding, the oracle's decoder."""

    def forward(images, patch_size=None):
        return model.predict(images, patch_size)

    return forward


TASK = Task(
    name="panoptic.stage2",
    build_datasets=build_datasets,
    build_model=build_model,
    make_loss=make_loss,
    evaluate=evaluate,
    load_model=load_model,
    predict=predict,
    image_forward=image_forward,
    export_refusal=(
        "stage II's forward is an autoregressive decoding loop (one decoder step per code, each fed the previous "
        "step's argmax through a growing key / value cache) that returns two maps, not the one-tensor, "
        "dynamic-batch image forward that tools.export writes"
    ),
    runlocal="configs/panoptic/scenes.py:stage=2,runlocal",
    runlocal_needs={"model.oracle": "panoptic.stage1"},
)

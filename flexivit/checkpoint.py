"""Loading and saving weights: big_vision ``.npz``, timm state dicts, and this project's own checkpoints.

Every reader is safe: ``np.load(allow_pickle=False)``, safetensors, ``torch.load(weights_only=True)``; a file
that needs pickled code to load is refused, and a damaged or foreign file is an error naming it.

Loading is lossless by default: :func:`flexivit.create_model` takes the checkpoint's own kernel size and position
grid (:func:`stored_sizes`) as the model's underlying sizes, so at the checkpoint's patch size the model computes what
the checkpoint's model computed, and it still runs at every other patch size (resizing on the fly, Sec. 3.4). Fitting
the weights onto other underlying sizes (the 32x32 / 7x7 of the distillation init, Sec. 3.5) is explicit and warns:
:func:`flexify_state_dict`. Keys that are missing, unexpected or wrongly shaped raise an error that lists them.
"""

from __future__ import annotations

import errno
import json
import math
import os
import pickle
import shutil
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from .model import FlexiViT
from .pi_resize import pi_resize_patch_embed, resize_posemb, to_2tuple

# Official big_vision releases (paper Sec. 3, Table 1; docs/reference.md §4). Underlying sizes: 32x32 kernel, 7x7
# posemb; inputs are 240 px in [-1, 1].
_BUCKET = "https://storage.googleapis.com/big_vision/flexivit/"
RELEASES: dict[str, dict] = {
    **{
        f"flexivit_{v}_i1k{ep}": dict(file=f"flexivit_{v}_i1k{ep}.npz", model=f"flexivit_{name}", num_classes=1000)
        for v, name in [("s", "small"), ("b", "base"), ("l", "large")]
        for ep in ["", "_600ep", "_300ep", "_90ep"]
    },
    **{
        f"flexivit_b_i21k_{ep}": dict(file=f"flexivit_b_i21k_{ep}.npz", model="flexivit_base", num_classes=21843)
        for ep in ["1000ep", "300ep", "90ep"]
    },
    "vit_b16_i21k_300ep": dict(file="vit_b16_i21k_300ep.npz", model="vit_base_patch16", num_classes=21843),
    "vit_b30_i21k_300ep": dict(file="vit_b30_i21k_300ep.npz", model="vit_base_patch30", num_classes=21843),
}
for _release in RELEASES.values():
    _release["url"] = _BUCKET + _release["file"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


# ---------------------------------------------------------------------------------------------- files and cache


def cache_dir() -> Path:
    """Where downloaded releases live: ``$FLEXIVIT_CACHE`` or ``~/.cache/flexivit``."""
    return Path(os.environ.get("FLEXIVIT_CACHE", Path.home() / ".cache" / "flexivit"))


def release_path(name: str, download: bool = True) -> Path:
    """Local path of an official release, downloading it into :func:`cache_dir` when missing and online."""
    if name not in RELEASES:
        raise KeyError(f"unknown release {name!r}; known releases: {', '.join(sorted(RELEASES))}")
    release = RELEASES[name]
    path = cache_dir() / release["file"]
    if path.exists():
        return path
    if download:
        try:
            _download(release["url"], path)
            return path
        except (urllib.error.URLError, OSError) as e:
            reason = f"the download failed ({e})"
    else:
        reason = "downloading is off"
    raise FileNotFoundError(
        f"release {name!r} is not in the cache and {reason}. Download {release['url']} on a machine that is "
        f"online and put it at {path} (or set FLEXIVIT_CACHE to the folder that holds it)."
    )


def _download(url: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".part", delete=False) as tmp:
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                while chunk := response.read(1 << 20):
                    tmp.write(chunk)
        except BaseException:
            os.unlink(tmp.name)
            raise
    os.replace(tmp.name, path)  # atomic: a broken download never leaves a truncated file under the real name


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: str | Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write) -> None:
    """Call ``write(tmp_path)``, then make it durable and rename it onto ``path``.

    A crash (or a power cut) at any moment leaves either the old file or the complete new one at ``path``, never a
    truncated one: the temporary file is fsynced before the rename and the folder after it, so once this returns
    the new file survives a crash and older files may be deleted. The file gets ordinary permissions (0666 minus
    the umask, like ``open``), not mkstemp's private 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException as error:
        out_of_space = _out_of_space(error)
        if os.path.exists(tmp):
            os.unlink(tmp)
        if out_of_space:
            free = shutil.disk_usage(path.parent).free / 2**20
            kept = "the previous file there is unchanged" if path.exists() else "nothing was written"
            raise OSError(
                errno.ENOSPC,
                f"no space left on the device while writing {path} ({free:.0f} MiB free in {path.parent} after "
                f"removing the partial file); {kept}",
            ) from error
        raise
    _fsync(path.parent, directory=True)


def _out_of_space(error: BaseException) -> bool:
    """A full disk, as Python reports it (ENOSPC / EDQUOT) or as torch.save does (a RuntimeError from its writer)."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    message = str(error) if isinstance(error, RuntimeError) else ""
    return "unexpected pos" in message or "file write failed" in message


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file (a config, a results file) with :func:`atomic_write`."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


# ---------------------------------------------------------------------------------------------- big_vision .npz


def _bf16_to_float32(raw: np.ndarray) -> np.ndarray:
    # numpy has no bfloat16: big_vision's files store it as 2-byte "void"; its bits are the top half of a float32.
    return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def read_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Flat ``{name: float32 array}`` of a big_vision checkpoint, without its ``params/`` / ``opt/target/`` prefix."""
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a big_vision checkpoint: expected an .npz (zip) archive of arrays")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except ValueError as e:  # numpy raises ValueError for object arrays when pickles are not allowed
        raise CheckpointError(f"{path}: refusing to load pickled objects ({e})") from e
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: the .npz archive is damaged or truncated ({e})") from e
    for prefix in ("opt/target/", "params/"):
        if any(k.startswith(prefix) for k in arrays):
            arrays = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
            break
    out = {}
    for key, value in arrays.items():
        if value.dtype.kind == "V":
            if value.dtype.itemsize != 2:
                raise CheckpointError(f"{path}: array {key!r} has raw dtype {value.dtype}; only bfloat16 is known")
            value = _bf16_to_float32(value)
        out[key] = value.astype(np.float32)
    return out


def _block_names(params: dict[str, np.ndarray]) -> tuple[str, str, str]:
    """(attention, second norm, mlp) module names: big_vision numbers them 0/1/0, the original ViT code 1/2/3."""
    if any("MultiHeadDotProductAttention_0" in k for k in params):
        return "MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0"
    return "MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3"


def convert_big_vision(params: dict[str, np.ndarray], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Map big_vision parameter names and layouts (flax: HWIO kernels, (in, out) dense) to this model's state dict."""
    params = dict(params)
    # pool_type="map" (big_vision's attention-pooling head, MAPHead_0/...; "probe" at the top in older files) is not
    # a pooling this model implements: name it, rather than list its parameters as having no place.
    map_head = sorted(k for k in params if k.startswith("MAPHead_0/") or k == "probe")
    if map_head:
        raise CheckpointError(
            f"{source}: a big_vision checkpoint with pool_type='map' (a multihead attention pooling head: "
            f"{', '.join(map_head[:3])}, ...), which this model does not implement; it loads checkpoints with "
            "pool_type 'tok' (class token) or 'gap' (mean of the tokens)"
        )
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    used: set[str] = set()

    def take(key: str) -> np.ndarray:
        if key not in params:
            raise CheckpointError(f"{source}: missing key {key!r}; it has {sorted(params)[:12]}...")
        used.add(key)
        return params[key]

    # Scanned checkpoints hold each block parameter once with a leading depth axis: unstack them.
    scanned = [k for k in params if k.startswith("Transformer/encoderblock/")]
    for key in scanned:
        stacked = params.pop(key)
        for i, value in enumerate(stacked):
            params[key.replace("encoderblock/", f"encoderblock_{i}/")] = value

    sd = {
        "patch_embed.proj.weight": t(take("embedding/kernel").transpose(3, 2, 0, 1)),  # HWIO -> OIHW
        "patch_embed.proj.bias": t(take("embedding/bias")),
        "norm.weight": t(take("Transformer/encoder_norm/scale")),
        "norm.bias": t(take("Transformer/encoder_norm/bias")),
    }
    posemb_key = "pos_embedding" if "pos_embedding" in params else "Transformer/posembed_input/pos_embedding"
    sd["pos_embed"] = t(take(posemb_key))
    if "cls" in params:
        sd["cls_token"] = t(take("cls"))
    if "head/kernel" in params:
        sd["head.weight"], sd["head.bias"] = t(take("head/kernel").T), t(take("head/bias"))

    attn, norm2, mlp = _block_names(params)
    depth = len({k.split("/")[1] for k in params if k.startswith("Transformer/encoderblock_")})
    for i in range(depth):
        p, b = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        sd[b + "norm1.weight"], sd[b + "norm1.bias"] = (
            t(take(p + "LayerNorm_0/scale")),
            t(take(p + "LayerNorm_0/bias")),
        )
        sd[b + "norm2.weight"], sd[b + "norm2.bias"] = (
            t(take(p + f"{norm2}/scale")),
            t(take(p + f"{norm2}/bias")),
        )
        # q/k/v kernels are (D, heads, head_dim): flatten the heads and stack q, k, v as timm's fused qkv does.
        qkv = [take(p + f"{attn}/{n}/kernel") for n in ("query", "key", "value")]
        sd[b + "attn.qkv.weight"] = t(np.concatenate([k.reshape(k.shape[0], -1).T for k in qkv]))
        sd[b + "attn.qkv.bias"] = t(
            np.concatenate([take(p + f"{attn}/{n}/bias").reshape(-1) for n in ("query", "key", "value")])
        )
        out = take(p + f"{attn}/out/kernel")  # (heads, head_dim, D)
        sd[b + "attn.proj.weight"] = t(out.reshape(-1, out.shape[-1]).T)
        sd[b + "attn.proj.bias"] = t(take(p + f"{attn}/out/bias"))
        for j in (0, 1):
            sd[b + f"mlp.fc{j + 1}.weight"] = t(take(p + f"{mlp}/Dense_{j}/kernel").T)
            sd[b + f"mlp.fc{j + 1}.bias"] = t(take(p + f"{mlp}/Dense_{j}/bias"))

    unused = sorted(set(params) - used)
    if unused:
        raise CheckpointError(f"{source}: parameters this model has no place for: {unused}")
    return sd


# ---------------------------------------------------------------------------------------------- torch files


def torch_load(path: str | Path) -> dict:
    """``torch.load(path, weights_only=True)`` on the CPU; every failure is a :class:`CheckpointError` naming the file.

    A file that needs a full unpickler is refused (it could run arbitrary code); a truncated, damaged or foreign file
    (a text file, half a download) says so instead of surfacing the unpickler's ``IndexError`` / zip error.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as e:
        first = next((line for line in str(e).splitlines() if "Unsupported" in line), type(e).__name__)
        raise CheckpointError(
            f"{path}: refusing to unpickle it: the weights-only unpickler rejected it ({first}). Either it holds "
            "objects that only a full unpickler would build, which can run arbitrary code (re-save it as a plain "
            f"state dict or as .safetensors), or it is not a checkpoint at all; {_EXPECTED}"
        ) from e
    except (RuntimeError, EOFError, IndexError, ValueError, KeyError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"{path}: not a readable torch checkpoint, or truncated ({type(e).__name__}: {first}); {_EXPECTED}"
        ) from e


_EXPECTED = "expected a torch.save() file (.pt / .pth), a .safetensors file or a big_vision .npz"


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read weights from any supported file: ``(state_dict in this model's names, metadata)``.

    ``metadata`` holds ``model_kwargs`` when the file is one of this project's checkpoints.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    meta: dict = {}
    if path.suffix == ".npz":
        return convert_big_vision(read_npz(path), source=str(path)), meta
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(path, framework="pt") as f:
                sd = {k: f.get_tensor(k) for k in f.keys()}
                raw = (f.metadata() or {}).get("flexivit")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: not a readable .safetensors file, or truncated ({e}); {_EXPECTED}") from e
        meta = json.loads(raw) if raw else {}
    else:
        obj = torch_load(path)
        if not isinstance(obj, dict):
            raise CheckpointError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                meta = {k: v for k, v in obj.items() if k == "model_kwargs"}
                obj = obj[key]
                break
        sd = obj
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {bad[:10]}")
    sd = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in sd.items()}
    return sd, meta


def _square_side(n: int) -> int | None:
    side = math.isqrt(n)
    return side if side * side == n else None


def _has_class_posemb(n: int, has_class_token: bool) -> bool:
    """Whether a position embedding of ``n`` entries holds one for the class token (timm / original ViT layout)."""
    return has_class_token and _square_side(n) is None and _square_side(n - 1) is not None


def stored_sizes(sd: dict[str, torch.Tensor], meta: dict | None = None) -> dict[str, tuple[int, int]]:
    """The underlying sizes a checkpoint stores: ``{"base_patch_size": (h, w), "posemb_grid": (gh, gw)}``.

    Read from the file itself (docs/reference.md §4: never trust a config name): the kernel's shape, and the position
    embedding's length without a class-token entry, which must be a square unless the file is one of ours (its
    ``model_kwargs`` then name the grid, which may be non-square). A size that cannot be read is left out.
    """
    kwargs = (meta or {}).get("model_kwargs") or {}
    if "posemb_grid" in kwargs and "base_patch_size" in kwargs:
        return {key: to_2tuple(kwargs[key], key) for key in ("base_patch_size", "posemb_grid")}
    sizes = {}
    kernel = sd.get("patch_embed.proj.weight")
    if kernel is not None and kernel.ndim == 4:
        sizes["base_patch_size"] = tuple(kernel.shape[-2:])
    posemb = sd.get("pos_embed")
    if posemb is not None and posemb.ndim == 3:
        n = posemb.shape[1] - int(_has_class_posemb(posemb.shape[1], "cls_token" in sd))
        if (side := _square_side(n)) is not None:
            sizes["posemb_grid"] = (side, side)
    return sizes


def stored_pooling(sd: dict[str, torch.Tensor], meta: dict | None = None) -> dict:
    """How a checkpoint's model pools, read from the file like :func:`stored_sizes`: ``{"pool", "class_token"}``.

    One of our files names both in its ``model_kwargs``. Any other file without a class token was trained without
    one, which in big_vision is ``pool_type="gap"`` (the default of its FlexiViT: the mean of the tokens after the
    final norm, as ``pool="gap"`` here). A file with a class token says nothing more: ``{}``, the model's own
    ``pool`` applies ("tok" for the registered models).
    """
    kwargs = (meta or {}).get("model_kwargs") or {}
    if "pool" in kwargs and "class_token" in kwargs:
        return {"pool": kwargs["pool"], "class_token": kwargs["class_token"]}
    return {} if "cls_token" in sd else {"pool": "gap", "class_token": False}


def _warn_resize(source: str, what: str, old, new) -> None:
    warnings.warn(
        f"{source}: {what} resized {'x'.join(map(str, old))} -> {'x'.join(map(str, new))} to fit the model's "
        "underlying sizes. This is lossy: at the checkpoint's own patch size the model no longer computes exactly what "
        "the checkpoint did (create_model keeps the checkpoint's sizes unless resize_to_model=True or base_patch_size "
        "/ posemb_grid are given).",
        stacklevel=3,
    )


def flexify_state_dict(
    sd: dict[str, torch.Tensor], model: FlexiViT, source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Fit a state dict onto ``model``'s underlying sizes (paper Sec. 3.5), exactly wherever that is possible.

    - LayerScale (DeiT-III) is folded into the layer it scales, and a class-token position (timm / original ViT
      layout) into the class token: both exact, because each is only ever used together with what it is folded into.
    - kernel (D, C, h, w): PI-resized to the model's underlying kernel size when the two differ;
    - position grid: resized bilinearly (antialiased where it shrinks) to the model's underlying grid when they
      differ. Either resize is lossy and warns, naming ``source`` and the sizes from -> to.
    """
    sd = dict(sd)
    # LayerScale (DeiT-III, some timm ViTs) multiplies the output of attn.proj / mlp.fc2 by a vector: folding it
    # into that layer's weight and bias is exact, so such checkpoints load into the plain block.
    for key in [k for k in sd if k.endswith((".ls1.gamma", ".ls2.gamma"))]:
        gamma, layer = sd.pop(key), key[: -len("ls1.gamma")] + ("attn.proj" if ".ls1." in key else "mlp.fc2")
        sd[layer + ".weight"] = sd[layer + ".weight"] * gamma[:, None]
        sd[layer + ".bias"] = sd[layer + ".bias"] * gamma
    kernel = sd.get("patch_embed.proj.weight")
    base = model.patch_embed.base_patch_size
    if kernel is not None and kernel.ndim == 4 and tuple(kernel.shape[-2:]) != tuple(base):
        _warn_resize(source, "patch-embedding kernel (PI-resize)", kernel.shape[-2:], base)
        sd["patch_embed.proj.weight"] = pi_resize_patch_embed(kernel.float(), base).to(kernel.dtype)

    posemb = sd.get("pos_embed")
    if posemb is not None and posemb.ndim == 3:
        n = posemb.shape[1]
        if model.cls_token is not None and "cls_token" in sd and _has_class_posemb(n, True):
            sd["cls_token"] = sd["cls_token"] + posemb[:, :1]
            posemb, n = posemb[:, 1:], n - 1
        if n == math.prod(model.posemb_grid):
            grid = model.posemb_grid  # already the model's grid (also covers non-square grids)
        elif (side := _square_side(n)) is not None:
            grid = (side, side)
        else:
            raise CheckpointError(f"{source}: cannot infer the position embedding grid from {n} positions")
        if tuple(grid) != tuple(model.posemb_grid):
            _warn_resize(source, "position embedding grid", grid, model.posemb_grid)
            posemb = resize_posemb(posemb.float().reshape(1, *grid, -1), model.posemb_grid).to(posemb.dtype)
        sd["pos_embed"] = posemb.reshape(1, -1, posemb.shape[-1])
    return sd


def load_state_dict(model: FlexiViT, sd: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load a (flexified) state dict strictly, except for the classification head, which may differ (with a warning).

    The head is the transfer case (ImageNet-21k weights, 10 new classes): a head of another size, or a head that the
    model does not have, is not loaded; a model head that the file lacks keeps its fresh initialisation (zeros: it
    predicts class 0 until trained). Each of these warns. Any other missing, unexpected or wrongly shaped key is an
    error that lists them all.
    """
    own = model.state_dict()
    sd = dict(sd)

    def head(state):  # "10-class head (10, 384)", or None
        return (
            f"{state['head.bias'].shape[0]}-class head {tuple(state['head.weight'].shape)}"
            if "head.bias" in state
            else None
        )

    if any(k.startswith("head.") and (k not in own or own[k].shape != v.shape) for k, v in sd.items()):
        kept = f"the model's {head(own)} is freshly initialised" if head(own) else "the model has no head"
        warnings.warn(f"{source}: its {head(sd)} is not loaded ({kept})", stacklevel=3)
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    elif head(own) and not head(sd):
        warnings.warn(
            f"{source} has no classification head: the model's {head(own)} keeps its fresh initialisation "
            "(zero-initialised, it predicts class 0 until it is trained)",
            stacklevel=3,
        )
    # A head the checkpoint lacks is not missing: the model keeps its freshly initialised one.
    missing = [k for k in own if k not in sd and not k.startswith("head.")]
    unexpected = [k for k in sd if k not in own]
    wrong = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in sd.items()
        if k in own and v.shape != own[k].shape
    ]
    if missing or unexpected or wrong:
        hint = (
            "\n  the file has no class token (big_vision pool_type='gap'): build the model with pool='gap', "
            "class_token=False (create_model reads this from the file unless overridden)"
            if "cls_token" in missing
            else ""
        )
        raise CheckpointError(
            f"{source} does not fit the model:\n  missing: {missing}\n  unexpected: {unexpected}\n"
            f"  wrong shape: {wrong}{hint}"
        )
    with torch.no_grad():
        for k, v in sd.items():
            own[k].copy_(v)


def default_release(model_name: str) -> str:
    """The release that ``create_model(model_name, pretrained=True)`` loads: the first in :data:`RELEASES` for it."""
    for release, entry in RELEASES.items():
        if entry["model"] == model_name:
            return release
    names = ", ".join(f"{r} ({e['model']})" for r, e in RELEASES.items())
    raise CheckpointError(
        f"pretrained=True: no official release for {model_name!r}. Pass a file path or one of the releases: {names}"
    )


def read_pretrained(pretrained: str | Path) -> tuple[dict[str, torch.Tensor], dict, Path]:
    """Read a file or an official release name: ``(state_dict, metadata, path)``."""
    source = str(pretrained)
    path = release_path(source) if source in RELEASES else Path(source)
    sd, meta = read_checkpoint(path)
    return sd, meta, path


def load_pretrained(model: FlexiViT, pretrained: str | Path) -> FlexiViT:
    """Load a file or an official release name into ``model``, resized to its underlying sizes where they differ."""
    sd, _, path = read_pretrained(pretrained)
    load_state_dict(model, flexify_state_dict(sd, model, source=str(path)), source=str(path))
    return model


# ---------------------------------------------------------------------------------------------- own checkpoints


def save_model(model: FlexiViT, path: str | Path) -> None:
    """Save weights and constructor arguments, atomically: ``.safetensors`` or a weights-only ``.pt``."""
    path = Path(path)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    kwargs = dict(model.kwargs)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        meta = {"flexivit": json.dumps({"model_kwargs": kwargs})}
        atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=meta))
    else:
        atomic_write(path, lambda tmp: torch.save({"model": sd, "model_kwargs": kwargs}, tmp))


def load_model(path: str | Path, **overrides) -> FlexiViT:
    """Rebuild a model saved by :func:`save_model` (or the training engine) from the file alone."""
    sd, meta = read_checkpoint(path)
    if "model_kwargs" not in meta:
        raise CheckpointError(f"{path} has no model_kwargs: load it with create_model(name, pretrained=path)")
    if "backbone" in meta["model_kwargs"]:  # a task model (backbone + head) saved by the training engine
        raise CheckpointError(
            f"{path} holds a task model (a backbone inside, model_kwargs {sorted(meta['model_kwargs'])}): rebuild it "
            "with its task's loader, e.g. tasks.segmentation.load_model(path)"
        )
    model = FlexiViT(**{**meta["model_kwargs"], **overrides})
    load_state_dict(model, flexify_state_dict(sd, model, source=str(path)), source=str(path))
    return model


__all__ = [
    "RELEASES",
    "CheckpointError",
    "atomic_write",
    "atomic_write_text",
    "cache_dir",
    "convert_big_vision",
    "default_release",
    "flexify_state_dict",
    "load_model",
    "load_pretrained",
    "load_state_dict",
    "read_checkpoint",
    "read_npz",
    "read_pretrained",
    "release_path",
    "save_model",
    "stored_pooling",
    "stored_sizes",
    "torch_load",
]

"""Weight files read safely and written atomically: the file layer under :mod:`flexivit.checkpoint`.

Every reader is safe: ``torch.load(weights_only=True)``, safetensors, ``np.load(allow_pickle=False)``; a file that
needs pickled code to load is refused, and a damaged or foreign file is a :class:`CheckpointError` naming it. Every
writer is atomic (:func:`atomic_write`): a crash leaves the old file or the complete new one, never half of one. The
whole repository writes its checkpoints, configs and reports through it.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


EXPECTED = "expected a torch.save() file (.pt / .pth), a .safetensors file or a big_vision .npz"

# ---------------------------------------------------------------------------------------------- atomic writes


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


def atomic_write(path: str | Path, write: Callable[[str], object]) -> None:
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


# ---------------------------------------------------------------------------------------------- safe readers


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
            f"state dict or as .safetensors), or it is not a checkpoint at all; {EXPECTED}"
        ) from e
    except (RuntimeError, EOFError, IndexError, ValueError, KeyError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"{path}: not a readable torch checkpoint, or truncated ({type(e).__name__}: {first}); {EXPECTED}"
        ) from e


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, metadata)`` of a ``.safetensors`` file; the metadata ``save_model`` stored, or ``{}``."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            raw = (f.metadata() or {}).get("flexivit")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable .safetensors file, or truncated ({e}); {EXPECTED}") from e
    return tensors, json.loads(raw) if raw else {}


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


__all__ = [
    "CheckpointError",
    "atomic_write",
    "atomic_write_text",
    "read_npz",
    "read_safetensors",
    "torch_load",
]

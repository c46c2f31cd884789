"""The official big_vision releases: their table, the local cache, and the download into it.

``create_model(name, pretrained="flexivit_s_i1k")`` (or ``pretrained=True``) finds the file in :func:`cache_dir`,
downloads it there when missing and online, and otherwise says where to put it (an offline machine).
"""

from __future__ import annotations

import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

from .files import CheckpointError, atomic_write

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
            # Atomic: a broken download never leaves a truncated file under the real name.
            atomic_write(path, lambda tmp: _download(release["url"], tmp))
            return path
        except (urllib.error.URLError, OSError) as e:
            reason = f"the download failed ({e})"
    else:
        reason = "downloading is off"
    raise FileNotFoundError(
        f"release {name!r} is not in the cache and {reason}. Download {release['url']} on a machine that is "
        f"online and put it at {path} (or set FLEXIVIT_CACHE to the folder that holds it)."
    )


def _download(url: str, path: str) -> None:
    with urllib.request.urlopen(url, timeout=60) as response, open(path, "wb") as f:
        shutil.copyfileobj(response, f, length=1 << 20)


def default_release(model_name: str) -> str:
    """The release that ``create_model(model_name, pretrained=True)`` loads: the first in :data:`RELEASES` for it."""
    for release, entry in RELEASES.items():
        if entry["model"] == model_name:
            return release
    names = ", ".join(f"{r} ({e['model']})" for r, e in RELEASES.items())
    raise CheckpointError(
        f"pretrained=True: no official release for {model_name!r}. Pass a file path or one of the releases: {names}"
    )


__all__ = ["RELEASES", "cache_dir", "default_release", "release_path"]

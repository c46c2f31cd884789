"""The one place that opens image files and uploads: every way an image can be bad ends as one :class:`ImageError`.

Datasets, ``tools.predict``, ``tools.analyze`` and the demo open images through :func:`open_image`, so that a
decompression bomb, a file that is no image, or a truncated one is refused the same way everywhere, with a message
that names the file and what is wrong.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError


class ImageError(ValueError):
    """An image that cannot be opened; the message names it and says what is wrong."""


def open_image(source: str | Path | bytes, name: str | None = None, mode: str | None = "RGB") -> Image.Image:
    """The decoded image of a file (a path) or of raw bytes, converted to ``mode`` (None: as stored).

    ``name`` is what the error calls the image (default: the path, or "(bytes)"). Raises
    :class:`ImageError` for an image of more pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` (PIL itself only warns
    between one and two times the limit; here both are refused), a file that is not an image, and a truncated or
    corrupt one.
    """
    if isinstance(source, bytes | bytearray):
        name, stream = name or "(bytes)", io.BytesIO(source)
    else:
        name, stream = name or str(source), source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(stream) as image:
                image.load()  # decode now: a truncated file fails here, not later in a transform
                return image.convert(mode) if mode else image.copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"cannot read image {name}: refused as a possible decompression bomb ({e})") from e
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        raise ImageError(f"cannot read image {name}: {e.strerror}") from e
    except UnidentifiedImageError as e:
        raise ImageError(f"cannot read image {name}: not an image (or in a format PIL cannot read)") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # PIL's errors for cut-off and damaged data
        raise ImageError(f"cannot read image {name}: truncated or corrupt ({e})") from e


__all__ = ["ImageError", "open_image"]

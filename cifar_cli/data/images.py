"""Opening images people give us (predict, image folders): one place that refuses what it cannot read.

Every image becomes RGB at the model's square input size the same way for training (`cifar prepare --from-folder`)
and for prediction, so a model sees at prediction what it saw in training.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cifar_cli.errors import UsageError

# Pillow's own warning threshold (about 89 megapixels, a 0.27 GB RGB buffer): a larger image is refused from its
# header, before any pixel is decoded, so a small file that claims 20,000 x 20,000 pixels costs nothing.
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


class ImageError(UsageError):
    """An image that cannot be read (damaged, truncated, not an image, too large)."""


def decode_image(source: Path | bytes, size: int = 32, name: str | None = None) -> np.ndarray:
    """A file (or its bytes) as uint8 size x size x 3 RGB: converted, then resized with Lanczos to a square.

    JPEG files much larger than `size` are decoded at a reduced scale first (the decoder's own 1/2, 1/4 or 1/8 DCT
    scaling, never below `size`), which makes large photographs several times faster to read."""
    label = name or str(source if isinstance(source, Path) else "image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
                _refuse_huge(label, image.size)
                image.draft("RGB", (size, size))  # JPEG only; other formats ignore it
                rgb = image.convert("RGB")
                if rgb.size != (size, size):
                    rgb = rgb.resize((size, size), Image.Resampling.LANCZOS)
                return np.asarray(rgb)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError(f"Refused image {label}: {error}") from None
    except (OSError, ValueError, SyntaxError) as error:  # SyntaxError: some of Pillow's parsers on bad headers
        raise ImageError(f"Cannot read image {label}: {error or type(error).__name__}") from None


def load_image(path: Path, size: int = 32) -> torch.Tensor:
    """Any image file as uint8 3 x size x size (RGB, resized with antialiasing)."""
    return torch.from_numpy(decode_image(path, size).copy()).permute(2, 0, 1)


def _refuse_huge(label: str, dimensions: tuple[int, int]) -> None:
    width, height = dimensions
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageError(
            f"Refused image {label}: {width:,} x {height:,} pixels ({width * height / 1e6:,.0f} megapixels) is over "
            f"the {MAX_IMAGE_PIXELS / 1e6:.0f}-megapixel limit (a possible decompression bomb).",
            hint="Resize it first; the model sees 32 x 32 pixels anyway.",
        )

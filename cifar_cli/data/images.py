"""Opening images people give us (predict today, image folders next): one place that refuses what it cannot read."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cifar_cli.errors import UsageError

# Pillow's own warning threshold (about 89 megapixels, a 0.27 GB RGB buffer): a larger image is refused from its
# header, before any pixel is decoded, so a small file that claims 20,000 x 20,000 pixels costs nothing.
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


def load_image(path: Path, size: int = 32) -> torch.Tensor:
    """Any image file as uint8 3 x size x size (RGB, resized with antialiasing)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                _refuse_huge(path, image.size)
                rgb = image.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise UsageError(f"Refused image {path}: {error}") from None
    except (
        OSError,
        ValueError,
        SyntaxError,
    ) as error:  # SyntaxError: some of Pillow's parsers on bad headers
        raise UsageError(f"Cannot read image {path}: {error}") from None
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)


def _refuse_huge(path: Path, dimensions: tuple[int, int]) -> None:
    width, height = dimensions
    if width * height > MAX_IMAGE_PIXELS:
        raise UsageError(
            f"Refused image {path}: {width:,} x {height:,} pixels ({width * height / 1e6:,.0f} megapixels) is over "
            f"the {MAX_IMAGE_PIXELS / 1e6:.0f}-megapixel limit (a possible decompression bomb).",
            hint="Resize it first; the model sees 32 x 32 pixels anyway.",
        )

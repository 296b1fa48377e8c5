"""Image bytes or files -> 8-bit RGB PIL images: the one decoder the datasets, shard tools, server and apps share.

Two things PIL's ``Image.open(...).convert("RGB")`` gets wrong for us, each silently:

- **Truncated files are decoded.** ``import lavis`` sets ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES = True`` for the
  whole process (lavis/datasets/datasets/coco_caption_datasets.py), so half a JPEG decodes with grey pixels and
  no error, and would be trained on. :func:`strict_decoding` restores PIL's default (truncation raises) for
  the duration of one decode, under a lock because the flag is a module global, and puts LAVIS's value back.
- **16-bit images are clipped.** PIL converts ``I;16`` / ``I`` pixels to 8 bits by clipping at 255, so a 16-bit
  PNG or TIFF (medical scans, scanned documents) comes out nearly white. :func:`to_rgb8` scales them by the
  type's range instead (``v / 257``: 65535 -> 255), which is what an image viewer shows.

Other modes (``L``, ``P``, ``RGBA``, ``CMYK``, ...) convert as PIL converts them, so 8-bit data gives exactly
the pixels it gave before this module existed.

An image that PIL decodes straight to RGB (a colour JPEG, most training data) is returned as decoded, without
``convert("RGB")``'s copy of every pixel (that copy is a no-op on the pixels). Measured per image, 1 thread, on
the synthetic JPEGs: 72 µs at 64 px and 336 µs at 384 px against 76 / 358 µs for PIL's ``open`` + ``convert`` (the
raw loop of bench/data_pipeline.py). torchvision's ``decode_jpeg`` (the same libjpeg-turbo) was tried as a fast
path and dropped: its tensor must be copied into a PIL image for the processors, which made it 86 / 466 µs.
"""
from __future__ import annotations

import io
import os
import threading
from contextlib import contextmanager
from typing import Iterator

import numpy as np
from PIL import Image, ImageFile

__all__ = ["SIXTEEN_BIT_MODES", "decode_image", "strict_decoding", "to_rgb8"]

#: PIL modes holding more than 8 bits per pixel, converted by :func:`to_rgb8` (``I`` is 32-bit signed, what
#: some TIFF writers and older Pillow versions give for 16-bit grey; ``F`` is 32-bit float).
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I;16S", "I", "F")

_TRUNCATION_FLAG_LOCK = threading.Lock()


@contextmanager
def strict_decoding() -> Iterator[None]:
    """PIL's default for truncated files (they raise ``OSError``) inside the block; see the module docstring."""
    with _TRUNCATION_FLAG_LOCK:
        previous = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous


def to_rgb8(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB, scaling high-bit-depth grey (``I;16*``, ``I``, ``F``) instead of clipping it.

    ``I;16*`` and non-negative ``I`` data up to 65535 are read as 16-bit (``v / 257``, rounded). ``F`` data in
    [0, 1] is read as a fraction of white. Anything else in those modes (negative or larger values, e.g. signed
    CT numbers) has no fixed range, so its own minimum and maximum become black and white.
    """
    if image.mode not in SIXTEEN_BIT_MODES:
        return image.convert("RGB")
    values = np.asarray(image, dtype=np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if image.mode == "F" and low >= 0.0 and high <= 1.0:
        scaled = values * 255.0
    elif image.mode != "F" and low >= 0.0 and high <= 65535.0:
        scaled = values / 257.0
    else:
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    grey = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")
    return grey.convert("RGB")


def decode_image(source: bytes | str | os.PathLike) -> Image.Image:
    """Fully decode an image (bytes or a file path) into an 8-bit RGB ``PIL.Image``.

    Args:
        source: the encoded bytes, or a path to an image file.
    Returns:
        A loaded RGB image (first frame of animated formats), 16-bit data scaled as :func:`to_rgb8` says.
    Raises:
        FileNotFoundError: ``source`` is a path that does not exist.
        PIL.UnidentifiedImageError: the data is not an image PIL knows.
        OSError: the image is truncated or its data is corrupt (``"image file is truncated"``, ...).
        Other PIL errors (``SyntaxError``, ``ValueError``, ``EOFError``) for malformed headers.
    """
    stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    with strict_decoding(), Image.open(stream) as raw:  # leaving the block closes the file, not the pixels
        raw.load()
        if raw.mode == "RGB" and raw.format == "JPEG":  # one frame, already RGB: no copy
            return raw
        return to_rgb8(raw)

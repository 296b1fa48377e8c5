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

JPEGs in YCbCr or grey (nearly all training data) are decoded by ``simplejpeg`` (libjpeg-turbo's TurboJPEG API,
the same library and the same default DCT and fancy upsampling as PIL's decoder), which gives PIL's exact pixels
with less work per image: measured on one thread, 40 against 57 µs at 64 px and 672 against 855 µs at 384 px,
and 10-55% less on the real photos the tests decode (gradio's and matplotlib's sample JPEGs, 256-2241 px,
progressive, 4:2:0 / 4:2:2 / 4:4:4). Tests check every such flavour pixel for pixel against PIL. Anything
simplejpeg declines or finds wrong (CMYK / YCCK / Adobe RGB JPEGs, truncated or corrupt data: its ``strict``
mode raises) goes through PIL, so the errors below stay PIL's, and so does an image over PIL's
``Image.MAX_IMAGE_PIXELS`` (PIL's decompression-bomb warning and error stay in force for uploads). Without simplejpeg installed, PIL decodes
everything. An image that PIL decodes straight to RGB is returned as decoded, without ``convert("RGB")``'s copy
(72 against 76 µs at 64 px). torchvision's ``decode_jpeg`` (the same libjpeg-turbo) was tried and dropped: its
tensor must be copied into a PIL image for the processors, which made it 86 / 466 µs.
"""
from __future__ import annotations

import io
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageFile

try:
    import simplejpeg
except ImportError:  # optional: PIL decodes everything without it
    simplejpeg = None

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
    data = source if isinstance(source, (bytes, bytearray, memoryview)) else Path(source).read_bytes()
    fast = _decode_jpeg(data)
    if fast is not None:
        return fast
    with strict_decoding(), Image.open(io.BytesIO(data)) as raw:
        raw.load()
        if raw.mode == "RGB" and raw.format == "JPEG":  # one frame, already RGB: no copy
            return raw
        return to_rgb8(raw)


# JPEG colour spaces whose RGB pixels simplejpeg gives exactly as PIL does (the others are PIL's to convert)
_FAST_JPEG_SPACES = ("YCbCr", "Gray")


def _decode_jpeg(data) -> Image.Image | None:
    """``data`` as an RGB image through simplejpeg when it is a JPEG simplejpeg decodes exactly as PIL (see the
    module docstring); None to leave it to PIL (not a JPEG, another colour space, any error, no simplejpeg)."""
    if simplejpeg is None or bytes(data[:3]) != b"\xff\xd8\xff":
        return None
    try:
        height, width, space, _ = simplejpeg.decode_jpeg_header(data)
        if space not in _FAST_JPEG_SPACES or (Image.MAX_IMAGE_PIXELS and height * width > Image.MAX_IMAGE_PIXELS):
            return None  # PIL converts other spaces, and warns about or refuses decompression bombs
        return Image.fromarray(simplejpeg.decode_jpeg(data, colorspace="RGB"))
    except ValueError:  # truncated or corrupt (strict mode): PIL raises its own error for it
        return None

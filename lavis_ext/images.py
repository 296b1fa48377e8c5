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

JPEGs (most training data) are decoded by torchvision's ``decode_jpeg`` where it can: the same libjpeg-turbo
decode as PIL's, bitwise the same RGB pixels (tests/unit/test_images.py: baseline, progressive, 4:4:4 / 4:2:2 /
4:2:0, grey, 64 and 384 px), with less Python around it and no strict-decoding lock. Measured per image with the
BLIP-2 processor after it (1 thread): at 64 px it costs what PIL's ``open`` + ``convert`` does (~85 µs; wrapping
its tensor as a PIL image for the processor eats the decoder's gain) and ~6% less than the strict PIL path; at
384 px the data pipeline runs ~7% faster with it (bench/data_pipeline.py, the raw-loop rows). Anything it does
not decode to 3 or 1 channels (CMYK / YCCK) or rejects (truncated or corrupt data, 12-bit) goes to PIL, which
decodes or raises exactly as before. ``LAVIS_EXT_JPEG_DECODER=pil`` turns the fast path off.
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
    data = source if isinstance(source, (bytes, bytearray, memoryview)) else _read_jpeg_file(source)
    if data is not None:
        fast = _decode_jpeg(data)
        if fast is not None:
            return fast
    stream = io.BytesIO(data) if data is not None else source  # a JPEG file read for the fast path is not read again
    with strict_decoding(), Image.open(stream) as raw:
        raw.load()
        return to_rgb8(raw)


JPEG_DECODER_ENV = "LAVIS_EXT_JPEG_DECODER"
_JPEG_MAGIC = b"\xff\xd8\xff"
_JPEG_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif")


def _read_jpeg_file(path) -> bytes | None:
    """A JPEG file's bytes for the fast path (other files are left to PIL, which reads only what it needs)."""
    return Path(path).read_bytes() if str(path).lower().endswith(_JPEG_SUFFIXES) else None


def _decode_jpeg(data) -> Image.Image | None:
    """JPEG bytes -> RGB image through torchvision's libjpeg-turbo decoder, or None to let PIL decode (not a JPEG,
    CMYK / YCCK, data torchvision rejects, torchvision missing, or ``LAVIS_EXT_JPEG_DECODER=pil``)."""
    if bytes(data[:3]) != _JPEG_MAGIC or os.environ.get(JPEG_DECODER_ENV, "torchvision").lower() == "pil":
        return None
    try:
        import torch
        from torchvision.io import decode_jpeg
    except ImportError:
        return None
    try:
        pixels = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))  # (channels, height, width)
    except RuntimeError:  # truncated, corrupt or unsupported: PIL decodes it or raises its own error
        return None
    if pixels.shape[0] == 1:  # grey: PIL's L -> RGB copies the channel
        pixels = pixels.expand(3, -1, -1)
    elif pixels.shape[0] != 3:
        return None
    return Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy())

"""Upload validation: untrusted bytes -> a decoded RGB PIL image, or a typed error with its HTTP status.

Shared by the HTTP server and the Gradio app, so every front end rejects the same things the same way:
empty bodies, non-images, formats we do not decode (PIL would happily open EPS through Ghostscript),
truncated files, too many bytes, too many pixels (the decompression-bomb case: a few kB of PNG that
decodes to gigapixels), too many files per request and pixel modes the model cannot use.

The pixel check runs on the header, before any pixel is decoded; ``load()`` then decodes fully, so a
truncated file fails here rather than half-way through a batch. ``import lavis`` sets PIL's process-wide
``ImageFile.LOAD_TRUNCATED_IMAGES = True``, which makes PIL pad truncated files with grey instead of failing,
so the decode runs under :func:`lavis_ext.images.strict_decoding` (PIL's default, under a lock).
``MAX_IMAGE_PIXELS`` is left alone: our own pixel limit applies first.

16-bit images (PNG ``I;16``, TIFF ``I;16``/``I``/``F``: scans, medical and scientific images) are accepted and
scaled to 8 bits by :func:`lavis_ext.images.to_rgb8`; PIL's own ``convert("RGB")`` clips them to near white.
"""
from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from lavis_ext.images import SIXTEEN_BIT_MODES, strict_decoding, to_rgb8

logger = logging.getLogger(__name__)

# Formats with a pure-Python/libimaging decoder that real clients send. EPS/PS (Ghostscript), PDF-like and
# exotic formats are left out on purpose: each decoder is attack surface and none is a photo format.
DEFAULT_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# Modes that become the RGB image a viewer shows: the 8-bit ones through convert("RGB"), the 16-bit / 32-bit
# integer and float ones through to_rgb8, which scales them (convert("RGB") would clip them to near white).
# Anything else (a LAB TIFF, say) is refused with 415 unsupported_mode rather than converted unchecked.
DEFAULT_MODES = (
    "1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", *SIXTEEN_BIT_MODES,
)


@dataclass(frozen=True)
class UploadLimits:
    """Per-request limits on uploads (bytes per file, pixels per image, files per request, formats, modes)."""

    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 36_000_000  # 6000 x 6000; PIL's own bomb guard would warn at 89 M and fail at 179 M
    max_files: int = 16
    allowed_formats: tuple[str, ...] = DEFAULT_FORMATS
    allowed_modes: tuple[str, ...] = DEFAULT_MODES

    def __post_init__(self):
        for name in ("max_bytes", "max_pixels", "max_files"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"upload limit {name}={value!r} must be a positive integer")


class UploadError(Exception):
    """A rejected upload: ``status`` (HTTP), ``code`` (stable, machine-readable) and ``message`` (for people)."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = int(status)
        self.code = code
        self.message = message

    def to_dict(self) -> dict:
        """The JSON error body every front end returns: ``{"error": {"code": ..., "message": ...}}``."""
        return {"error": {"code": self.code, "message": self.message}}

    def __repr__(self) -> str:
        return f"UploadError({self.status}, {self.code!r}, {self.message!r})"


def _name(filename: str | None) -> str:
    return f"upload {filename!r}" if filename else "upload"


def check_file_count(count: int, limits: UploadLimits = UploadLimits()) -> None:
    """Raise ``UploadError`` (400 ``no_files`` / 413 ``too_many_files``) unless 1 <= count <= max_files."""
    if count < 1:
        raise UploadError(400, "no_files", "no image file in the request; send one as multipart field 'image'/'images'")
    if count > limits.max_files:
        raise UploadError(
            413, "too_many_files",
            f"{count} files in one request; at most {limits.max_files} are accepted, split the request",
        )


def check_size(size: int, limits: UploadLimits = UploadLimits(), filename: str | None = None) -> None:
    """Raise ``UploadError`` for an empty (400) or oversized (413) upload, from its byte count alone."""
    if size == 0:
        raise UploadError(400, "empty_file", f"{_name(filename)} is empty (0 bytes); send the image file's contents")
    if size > limits.max_bytes:
        raise UploadError(
            413, "file_too_large",
            f"{_name(filename)} is larger than the limit of {limits.max_bytes} bytes; downscale or recompress it",
        )


def validate_image_bytes(data: bytes, limits: UploadLimits = UploadLimits(), filename: str | None = None) -> Image.Image:
    """Decode ``data`` into an RGB image the model can use, or raise ``UploadError``.

    Args:
        data: the raw uploaded file.
        limits: byte, pixel, format and mode limits.
        filename: only used to name the file in error messages.
    Returns:
        A fully decoded ``PIL.Image.Image`` in mode ``RGB``, EXIF orientation applied (first frame of
        animated formats; 16-bit data scaled to 8 bits).
    Raises:
        UploadError: 400 ``empty_file`` / ``corrupt_image`` (truncated or undecodable), 413 ``file_too_large``
        / ``too_many_pixels``, 415 ``not_an_image`` / ``unsupported_format`` / ``unsupported_mode``.
    """
    check_size(len(data), limits, filename)
    with strict_decoding():
        image = _decode(data, limits, filename)
    try:
        image = ImageOps.exif_transpose(image)
    except Exception as exc:  # noqa: BLE001  (broken EXIF must not reject an otherwise good photo)
        logger.debug("ignoring unreadable EXIF orientation in %s: %s", _name(filename), exc)
    return to_rgb8(image)


def _decode(data: bytes, limits: UploadLimits, filename: str | None) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # our own pixel limit below is the one that applies; PIL's warning would only be noise
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as exc:
        raise UploadError(413, "too_many_pixels", f"{_name(filename)}: {exc}; downscale the image") from None
    except UnidentifiedImageError:
        raise UploadError(
            415, "not_an_image",
            f"{_name(filename)} is not a recognised image; send one of {', '.join(limits.allowed_formats)}",
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:  # header present but broken
        raise UploadError(400, "corrupt_image", f"{_name(filename)} could not be read as an image ({exc})") from None
    if image.format not in limits.allowed_formats:
        raise UploadError(
            415, "unsupported_format",
            f"{_name(filename)} is {image.format}; accepted formats: {', '.join(limits.allowed_formats)}",
        )
    width, height = image.size
    if width < 1 or height < 1:
        raise UploadError(400, "corrupt_image", f"{_name(filename)} has size {width}x{height}")
    if width * height > limits.max_pixels:
        raise UploadError(
            413, "too_many_pixels",
            f"{_name(filename)} is {width}x{height} = {width * height} pixels, above the limit of "
            f"{limits.max_pixels}; downscale it",
        )
    if image.mode not in limits.allowed_modes:
        raise UploadError(
            415, "unsupported_mode",
            f"{_name(filename)} has pixel mode {image.mode!r}; accepted modes: {', '.join(limits.allowed_modes)} "
            "(convert it to RGB)",
        )
    try:
        image.load()  # full decode: truncation and corrupt data surface here, not inside a batch
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise UploadError(
            400, "corrupt_image", f"{_name(filename)} is truncated or corrupt ({exc}); re-export the image",
        ) from None
    return image

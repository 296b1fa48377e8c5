"""The shared decoder: truncated files raise despite LAVIS's global flag, 16-bit data is scaled, 8-bit is unchanged."""
from __future__ import annotations

import io
import threading

import numpy as np
import pytest
from PIL import Image, ImageFile

import lavis_ext

lavis_ext.register()  # imports LAVIS, which sets ImageFile.LOAD_TRUNCATED_IMAGES = True
from lavis_ext.images import decode_image, strict_decoding, to_rgb8


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_files_raise_and_the_global_flag_is_restored(fmt, tmp_path):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # LAVIS's process-wide setting
    data = _encoded(Image.effect_noise((80, 80), 60).convert("RGB"), fmt)
    half = data[: len(data) // 2]
    with Image.open(io.BytesIO(half)) as lenient:  # what every plain PIL decode in this process does
        lenient.load()
    with pytest.raises(OSError):
        decode_image(half)
    (tmp_path / "half").write_bytes(half)
    with pytest.raises(OSError):
        decode_image(tmp_path / "half")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


def test_strict_decoding_is_exclusive_and_restores_the_flag_on_error():
    entered = threading.Event()
    release = threading.Event()
    seen = []

    def hold():
        with strict_decoding():
            entered.set()
            release.wait(5)

    thread = threading.Thread(target=hold)
    thread.start()
    entered.wait(5)
    other = threading.Thread(target=lambda: seen.append(decode_image(_encoded(Image.new("L", (3, 3)), "PNG")).mode))
    other.start()
    other.join(0.2)
    assert seen == []  # the second decode waits for the lock: the flag is a module global
    release.set()
    thread.join(5)
    other.join(5)
    assert seen == ["RGB"]
    with pytest.raises(RuntimeError), strict_decoding():
        assert ImageFile.LOAD_TRUNCATED_IMAGES is False
        raise RuntimeError("boom")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_sixteen_bit_grey_is_scaled_by_its_range(fmt):
    values = np.array([[0, 257, 32896, 65535], [1000, 20000, 40000, 60000]], dtype=np.uint16)
    source = Image.fromarray(values)
    image = decode_image(_encoded(source, fmt))
    assert image.mode == "RGB"
    expected = np.rint(values / 257).astype(np.uint8)
    assert (np.asarray(image) == expected[..., None]).all()
    assert (np.asarray(source.convert("RGB"))[..., 0] == np.minimum(values, 255)).all()  # what PIL alone gives


def test_wide_and_float_modes():
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert np.asarray(to_rgb8(unit))[0, :, 0].tolist() == [0, 128, 255]
    signed = Image.fromarray(np.array([[-1000, 0, 1000]], dtype=np.int32))  # e.g. CT numbers: own min..max
    assert np.asarray(to_rgb8(signed))[0, :, 0].tolist() == [0, 128, 255]
    flat = Image.fromarray(np.full((2, 2), 70000, dtype=np.int32))
    assert np.asarray(to_rgb8(flat)).max() == 0  # no range: black, not a division by zero


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "RGBA", "CMYK"])
def test_eight_bit_modes_convert_exactly_as_pil_does(mode):
    source = Image.effect_noise((9, 7), 80).convert(mode)
    assert np.array_equal(np.asarray(to_rgb8(source)), np.asarray(source.convert("RGB")))
    decoded = decode_image(_encoded(source, "TIFF" if mode == "CMYK" else "PNG"))
    assert np.array_equal(np.asarray(decoded), np.asarray(source.convert("RGB")))


def test_errors_for_missing_files_and_non_images(tmp_path):
    with pytest.raises(FileNotFoundError):
        decode_image(tmp_path / "nope.png")
    with pytest.raises(Image.UnidentifiedImageError):
        decode_image(b"%PDF-1.4 not pixels")


def test_the_apps_and_the_predictor_decode_through_it(tmp_path):
    """``lavis-ext ask`` (question packs) and every predictor call scale 16-bit images and refuse truncated ones."""
    from types import SimpleNamespace

    from lavis_ext.apps.question_packs import open_image
    from lavis_ext.inference import Blip2Predictor

    values = np.full((6, 5), 40000, dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "scan.png")
    assert (np.asarray(open_image(tmp_path / "scan.png")) == round(40000 / 257)).all()
    data = _encoded(Image.effect_noise((80, 80), 60).convert("RGB"), "JPEG")
    (tmp_path / "half.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"half.jpg.*truncated"):
        open_image(tmp_path / "half.jpg")
    # the predictor's own preprocessing (Python API, ONNX export): a 16-bit PIL image is scaled there too
    import torch

    seen = []
    stub = SimpleNamespace(vis_processor=lambda im: seen.append(np.asarray(im)) or torch.zeros(3, 2, 2), device="cpu")
    Blip2Predictor.preprocess(stub, [Image.fromarray(values)])
    assert seen[0].shape == (6, 5, 3) and (seen[0] == round(40000 / 257)).all()


def _photo(width: int, height: int) -> Image.Image:
    """Smooth gradients plus noise: chroma subsampling and the IDCT both have something to do."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], axis=-1)
    noise = np.random.default_rng(width * height).integers(-30, 30, size=base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


JPEG_FLAVOURS = {
    "baseline 4:2:0": ({}, (64, 64)),
    "progressive": ({"progressive": True}, (64, 64)),
    "4:4:4 q95": ({"subsampling": 0, "quality": 95}, (64, 64)),
    "4:2:2 odd size": ({"subsampling": 1}, (63, 37)),
    "384 px": ({"quality": 90}, (384, 384)),
    "optimised huffman": ({"optimize": True}, (100, 80)),
}


@pytest.mark.parametrize("flavour", list(JPEG_FLAVOURS))
@pytest.mark.parametrize("grey", [False, True], ids=["rgb", "grey"])
def test_jpegs_decode_to_pils_exact_pixels_from_bytes_and_files(flavour, grey, tmp_path):
    """Colour JPEGs come back as decoded (no convert copy), grey ones converted: PIL's pixels either way."""
    options, size = JPEG_FLAVOURS[flavour]
    source = _photo(*size).convert("L") if grey else _photo(*size)
    data = _encoded(source, "JPEG", **options)
    with Image.open(io.BytesIO(data)) as raw:
        pil = np.asarray(raw.convert("RGB"))
    decoded = decode_image(data)
    assert decoded.mode == "RGB" and decoded.size == size
    assert np.array_equal(np.asarray(decoded), pil)
    assert np.array_equal(np.asarray(decoded.resize((17, 9), Image.BICUBIC)),
                          np.asarray(Image.fromarray(pil).resize((17, 9), Image.BICUBIC)))
    path = tmp_path / "photo.JPG"
    path.write_bytes(data)
    from_file = decode_image(path)
    assert getattr(from_file, "fp", None) is None  # the file is closed, the pixels stay
    assert np.array_equal(np.asarray(from_file), pil)


def test_cmyk_truncated_and_corrupt_jpegs():
    """CMYK converts as PIL converts it; truncated data and a corrupt header raise PIL's errors."""
    cmyk = _encoded(_photo(40, 30).convert("CMYK"), "JPEG")
    with Image.open(io.BytesIO(cmyk)) as raw:
        assert np.array_equal(np.asarray(decode_image(cmyk)), np.asarray(raw.convert("RGB")))
    data = _encoded(_photo(64, 64), "JPEG")
    for cut in (len(data) // 3, len(data) - 20):
        with pytest.raises(OSError):
            decode_image(data[:cut])
    with pytest.raises((OSError, SyntaxError)):
        decode_image(b"\xff\xd8\xff\xe0" + b"\x00" * 40)


def _real_jpegs() -> list:
    """JPEGs written by cameras and image tools, not by us: the sample photos installed with matplotlib (a core
    dependency) and gradio (the serve extra), where present."""
    import importlib.util
    from pathlib import Path

    import matplotlib

    found = sorted(Path(matplotlib.get_data_path(), "sample_data").glob("*.jp*g"))
    spec = importlib.util.find_spec("gradio")
    if spec is not None and spec.origin:
        found += sorted(Path(spec.origin).parent.glob("**/*.jp*g"))
    return found


def test_real_photos_decode_to_pils_exact_pixels_through_simplejpeg(monkeypatch):
    """Camera JPEGs (baseline and progressive, 4:2:0 and 4:4:4, up to 787 px) go through simplejpeg and give PIL's
    pixels; with simplejpeg missing, PIL decodes them to the same pixels."""
    import lavis_ext.images as images

    photos = _real_jpegs()
    if not photos:
        pytest.skip("no sample JPEGs installed (matplotlib's sample_data, gradio's media assets)")
    assert images.simplejpeg is not None, "simplejpeg is a core dependency (pyproject.toml)"
    calls = []
    real_decode = images.simplejpeg.decode_jpeg
    monkeypatch.setattr(images.simplejpeg, "decode_jpeg", lambda *a, **k: calls.append(1) or real_decode(*a, **k))
    for path in photos:
        with Image.open(path) as raw:
            pil = np.asarray(raw.convert("RGB"))
        assert np.array_equal(np.asarray(decode_image(path)), pil), path
    assert len(calls) == len(photos)  # every one took the fast path
    monkeypatch.setattr(images, "simplejpeg", None)
    for path in photos:
        with Image.open(path) as raw:
            assert np.array_equal(np.asarray(decode_image(path.read_bytes())), np.asarray(raw.convert("RGB"))), path


def test_jpegs_simplejpeg_declines_go_to_pil(monkeypatch):
    """CMYK is PIL's to convert, truncated and corrupt data PIL's to reject: simplejpeg decodes none of them."""
    import lavis_ext.images as images

    assert images._decode_jpeg(_encoded(_photo(40, 30).convert("CMYK"), "JPEG")) is None
    data = _encoded(_photo(64, 64), "JPEG")
    assert images._decode_jpeg(data[: len(data) // 2]) is None
    assert images._decode_jpeg(b"\xff\xd8\xff\xe0" + b"\x00" * 40) is None
    assert images._decode_jpeg(_encoded(_photo(8, 8), "PNG")) is None
    assert images._decode_jpeg(data) is not None


def test_decompression_bomb_limits_still_apply_to_jpegs(monkeypatch):
    """A JPEG over PIL's MAX_IMAGE_PIXELS is PIL's to refuse (twice the limit: DecompressionBombError), as before."""
    data = _encoded(_photo(200, 200), "JPEG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)
    with pytest.raises(Image.DecompressionBombError):
        decode_image(data)

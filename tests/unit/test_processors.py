"""The fused ToTensor + Normalize gives LAVIS's processors' tensors bit for bit, draws the same random numbers, and
leaves anything it does not know alone."""
from __future__ import annotations

import copy
import io
import pickle
import random

import numpy as np
import pytest
import torch
import torchvision
from omegaconf import OmegaConf
from PIL import Image

import lavis_ext

lavis_ext.register()
from lavis.common.registry import registry  # noqa: E402

from lavis_ext.processors import FusedImageProcessor, fuse_image_processor  # noqa: E402

PROCESSORS = [("blip_image_eval", 64), ("blip_image_eval", 224), ("blip2_image_train", 224), ("blip_image_train", 96)]


def _processor(name: str, size: int):
    return registry.get_processor_class(name).from_config(OmegaConf.create({"image_size": size}))


def _images():
    """Photos as users bring them: odd sizes, a JPEG as PIL decodes it, a grey and a palette image converted to RGB,
    a flat image (every pixel the same), extremes 0 and 255."""
    rng = np.random.RandomState(0)
    noise = Image.fromarray((rng.rand(101, 157, 3) * 255).astype(np.uint8))
    buffer = io.BytesIO()
    noise.save(buffer, "JPEG", quality=85)
    jpeg = Image.open(io.BytesIO(buffer.getvalue()))
    jpeg.load()
    return {
        "noise": noise,
        "jpeg": jpeg,
        "grey": Image.fromarray((rng.rand(64, 48) * 255).astype(np.uint8)).convert("RGB"),
        "palette": noise.convert("P").convert("RGB"),
        "flat": Image.new("RGB", (30, 70), (0, 255, 128)),
    }


def _seeded(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@pytest.mark.parametrize("name,size", PROCESSORS)
def test_same_bits_layout_and_random_draws_as_lavis(name, size):
    stock = _processor(name, size)
    fused = fuse_image_processor(stock)
    assert isinstance(fused, FusedImageProcessor)
    for seed, (label, image) in enumerate(_images().items()):
        _seeded(seed)
        want = stock(image)
        after_stock = (torch.rand(1), random.random(), np.random.rand())
        _seeded(seed)
        got = fused(image)
        after_fused = (torch.rand(1), random.random(), np.random.rand())
        assert got.dtype == want.dtype and got.shape == want.shape and got.stride() == want.stride(), label
        assert torch.equal(got, want), f"{name} {size} {label}: max diff {(got - want).abs().max().item()}"
        assert after_fused == after_stock, f"{label}: the random streams diverged"


def test_other_modes_and_dtypes_go_through_torchvision():
    stock = _processor("blip_image_eval", 32)
    fused = fuse_image_processor(stock)
    grey = Image.fromarray((np.random.RandomState(1).rand(32, 32) * 255).astype(np.uint8))  # mode L: one channel
    for processor in (stock, fused):  # LAVIS's 3-channel Normalize fails on it either way, with the same error
        with pytest.raises(RuntimeError, match="doesn't match the broadcast shape"):
            processor(grey)
    bare = FusedImageProcessor(stock, [], stock.normalize)  # no steps before ToTensor: arrays reach the conversion
    floats = np.random.RandomState(2).rand(20, 24, 3).astype(np.float32)  # ToTensor keeps floats as they are
    assert torch.equal(bare(floats), stock.normalize(torchvision.transforms.ToTensor()(floats)))
    default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)  # ToTensor converts to the default dtype
        image = _images()["noise"]
        got, want = fused(image), stock(image)
        assert got.dtype == torch.float64 and torch.equal(got, want)
    finally:
        torch.set_default_dtype(default)


def test_unknown_processors_are_left_alone():
    assert fuse_image_processor(None) is None

    def plain(image):
        return image

    assert fuse_image_processor(plain) is plain
    stock = _processor("blip_image_eval", 32)
    fused = fuse_image_processor(stock)
    assert fuse_image_processor(fused) is fused

    class Custom(type(stock)):  # overrides the call: may do anything, so it is not fused
        def __call__(self, item):
            return self.transform(item) * 2

    custom = Custom(image_size=32)
    assert fuse_image_processor(custom) is custom
    changed = _processor("blip_image_eval", 32)
    changed.transform.transforms = changed.transform.transforms[:-1]  # no Normalize at the end
    assert fuse_image_processor(changed) is changed


def test_attributes_copy_and_pickle_like_the_wrapped_processor():
    stock = _processor("blip_image_eval", 32)
    fused = fuse_image_processor(stock)
    assert fused.transform is stock.transform and fused.normalize is stock.normalize
    image = _images()["jpeg"]
    for clone in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):  # DataLoader workers pickle datasets
        assert isinstance(clone, FusedImageProcessor) and torch.equal(clone(image), stock(image))

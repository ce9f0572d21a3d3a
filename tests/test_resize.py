"""extractor.resize: the crop-aware resize must be bitwise torchvision's resize + centre crop."""
import numpy as np
import pytest
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from cnncodes.extractor.backbones.loading import load_backbone
from cnncodes.extractor.images import load_rgb
from cnncodes.extractor.resize import pass_order, resize_center_crop

from .conftest import CALTECH, IMAGENET_CHECK, needs_shared

MODES = {Image.Resampling.BICUBIC: InterpolationMode.BICUBIC,
         Image.Resampling.BILINEAR: InterpolationMode.BILINEAR,
         Image.Resampling.LANCZOS: InterpolationMode.LANCZOS}


def reference(img, size, crop, resample):
    return np.asarray(F.center_crop(F.resize(img, size, interpolation=MODES[resample]), list(crop)))


def test_the_installed_pillow_is_reproduced():
    assert pass_order() in ("adaptive", "horizontal")  # else the shortcut would be off


@pytest.mark.parametrize("resample", list(MODES))
@pytest.mark.parametrize("size,crop", [(256, (224, 224)), (232, (224, 224)), (160, (128, 128)),
                                       (256, (224, 192))])
def test_random_shapes_bitwise(resample, size, crop):
    rng = np.random.default_rng(size + crop[1] + int(resample))
    shapes = [(int(w), int(h)) for w, h in rng.integers(40, 1100, (60, 2))]
    shapes += [(300, 256), (256, 300), (256, 256), (1000, 120), (120, 1000), (300, 2000),
               (2000, 300), (257, 256)]
    checked = 0
    for w, h in shapes:
        mode = "L" if (w + h) % 5 == 0 else "RGB"
        shape = (h, w) if mode == "L" else (h, w, 3)
        img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)
        got = resize_center_crop(img, size, crop, resample)
        if got is None:  # only where the resized image is smaller than the crop
            nw, nh = F.get_image_size(F.resize(img, size))
            assert crop[0] > nh or crop[1] > nw
            continue
        np.testing.assert_array_equal(np.asarray(got), reference(img, size, crop, resample),
                                      err_msg=f"{w}x{h} {mode}")
        checked += 1
    assert checked >= 50


@needs_shared
def test_every_real_photo_bitwise():
    files = sorted(CALTECH.glob("*/*/*.jpg")) + sorted(p for p in IMAGENET_CHECK.iterdir()
                                                       if p.suffix != ".csv")
    for f in files[::2]:
        img = load_rgb(f)
        got = resize_center_crop(img, 256, (224, 224), Image.Resampling.BICUBIC)
        np.testing.assert_array_equal(np.asarray(got), reference(img, 256, (224, 224),
                                                                 Image.Resampling.BICUBIC),
                                      err_msg=str(f))


def test_declines_what_it_does_not_reproduce():
    rgb = Image.new("RGB", (300, 200), (10, 20, 30))
    assert resize_center_crop(rgb.convert("RGBA"), 256, (224, 224), Image.Resampling.BICUBIC) is None
    assert resize_center_crop(rgb, 256, (224, 224), Image.Resampling.NEAREST) is None
    assert resize_center_crop(rgb, 100, (224, 224), Image.Resampling.BICUBIC) is None  # torchvision pads


@pytest.mark.parametrize("name,weights", [("efficientnet_lite0", "DEFAULT"), ("resnet18", "none")])
def test_backbones_use_it(name, weights):
    split = load_backbone(name, weights).split
    assert split.resize_crop is not None and split.resize_crop[1] == (224, 224)

"""Resize-then-centre-crop that computes only the pixels the crop keeps, bitwise equal to Pillow.

The preprocessing of most ImageNet weights is "resize the short side to S, centre-crop C"
(256 and 224). Pillow resamples in two separable passes and the crop then throws away about a
quarter of what they computed: on Caltech-sized photos the resize is 70% of the decoding time.

Pillow's result is kept exact by cutting only along lines the passes never mix: a horizontal
pass treats each row on its own, a vertical pass each column. So, for Pillow's usual order
(horizontal pass first):

1. keep the input rows that the kept output rows read (a margin wider than the filter);
2. run the horizontal pass alone on them (``resize((new_w, rows))``);
3. keep the columns of the crop, with the rows put back at their place in a full-height image;
4. run the vertical pass alone (``resize((crop_w, new_h))``), whose coefficients depend only on
   the full heights, and keep the crop's rows.

The other order is the mirror image: recent Pillow (13 does, older releases did not) runs the
vertical pass first when the height shrinks much more than the width. Which order the
installed Pillow uses, and that each single-direction call is one pass, is checked once on
test images; if the check fails, this module declines and the caller resizes the ordinary way.
Pillow's ``box=`` argument cannot be
used instead: Pillow stores it as float32, which moves the filter taps (measured: values off
by up to 2 levels).
"""
from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image

# Pillow's filter supports (src/libImaging/Resample.c). NEAREST and the MKS filters are left to
# Pillow itself.
_SUPPORT = {Image.Resampling.BOX: 0.5, Image.Resampling.BILINEAR: 1.0, Image.Resampling.HAMMING: 1.0,
            Image.Resampling.BICUBIC: 2.0, Image.Resampling.LANCZOS: 3.0}
_MODES = ("RGB", "L")


def resized_size(w: int, h: int, size: int) -> tuple[int, int]:
    """torchvision's ``resize(img, size)`` for an int ``size``: the short side becomes ``size``."""
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    return (size, new_long) if w <= h else (new_long, size)


def _read_range(n_in: int, n_out: int, first: int, count: int, support: float) -> tuple[int, int]:
    """Input lines [lo, hi) that output lines [first, first + count) read, with a margin."""
    scale = n_in / n_out
    reach = support * max(scale, 1.0)
    lo = math.floor((first + 0.5) * scale - reach) - 1
    hi = math.ceil((first + count - 0.5) * scale + reach) + 2
    return max(0, lo), min(n_in, hi)


def _vertical_first(order: str, w: int, h: int, nw: int, nh: int) -> bool:
    # Recent Pillow (13): "If height is being scaled down more than twice the amount the width is,
    # run the vertical pass first"; older Pillow always starts horizontally.
    return order == "adaptive" and (h - nh) > 0 and (h - nh) > (w - nw) * 2


def _cropped(img: Image.Image, nw: int, nh: int, left: int, top: int, cw: int, ch: int, resample,
             order: str) -> Image.Image:
    w, h = img.size
    support = _SUPPORT[resample]
    if _vertical_first(order, w, h, nw, nh):
        x0, x1 = _read_range(w, nw, left, cw, support)
        a = img.crop((x0, 0, x1, h)) if (x0, x1) != (0, w) else img
        a = a.resize((x1 - x0, nh), resample)              # the vertical pass alone
        a = a.crop((-x0, top, w - x0, top + ch))           # the crop's rows, columns in place
        a = a.resize((nw, ch), resample)                   # the horizontal pass alone
        return a.crop((left, 0, left + cw, ch))
    y0, y1 = _read_range(h, nh, top, ch, support)
    a = img.crop((0, y0, w, y1)) if (y0, y1) != (0, h) else img
    a = a.resize((nw, y1 - y0), resample)                  # the horizontal pass alone
    a = a.crop((left, -y0, left + cw, h - y0))             # the crop's columns, rows in place
    a = a.resize((cw, nh), resample)                       # the vertical pass alone
    return a.crop((0, top, cw, top + ch))


def resize_center_crop(img: Image.Image, size: int, crop: tuple[int, int], resample) -> Image.Image | None:
    """``center_crop(resize(img, size), crop)`` as torchvision computes it on a PIL image, bitwise.

    ``crop`` is (height, width). Returns None where this shortcut does not apply (a mode other
    than RGB or L, NEAREST or another filter, a crop larger than the resized image, a Pillow
    whose passes this module does not reproduce); the caller then runs the plain operations.
    """
    resample = Image.Resampling(int(resample))
    ch, cw = crop
    order = pass_order()
    if img.mode not in _MODES or resample not in _SUPPORT or order is None:
        return None
    w, h = img.size
    nw, nh = resized_size(w, h, size)
    if cw > nw or ch > nh:
        return None  # torchvision pads; rare, left to it
    top, left = int(round((nh - ch) / 2.0)), int(round((nw - cw) / 2.0))
    if (nw, nh) == (w, h):
        return img.crop((left, top, left + cw, top + ch))
    return _cropped(img, nw, nh, left, top, cw, ch, resample, order)


@functools.lru_cache(maxsize=1)
def pass_order() -> str | None:
    """The installed Pillow's pass order: 'adaptive' (chosen per shape, as Pillow 13 does),
    'horizontal' (always first, as older Pillow), or None (neither: the shortcut is off).

    Found by running this module on random images shaped to take each branch of Pillow 13's
    rule, for three filters, against Pillow's own resize; the first order that matches on
    every one wins.
    """
    rng = np.random.default_rng(0)
    cases = [(300, 257, 256), (257, 300, 256), (97, 700, 90), (700, 97, 90), (120, 900, 64), (640, 480, 256)]
    imgs = [(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)), size) for w, h, size in cases]
    for order in ("adaptive", "horizontal"):
        if all(_matches(img, size, order) for img, size in imgs):
            return order
    return None


def _matches(img: Image.Image, size: int, order: str) -> bool:
    w, h = img.size
    nw, nh = resized_size(w, h, size)
    c = min(nw, nh) * 7 // 8
    top, left = int(round((nh - c) / 2.0)), int(round((nw - c) / 2.0))
    for resample in (Image.Resampling.BICUBIC, Image.Resampling.BILINEAR, Image.Resampling.LANCZOS):
        ref = img.resize((nw, nh), resample).crop((left, top, left + c, top + c))
        got = _cropped(img, nw, nh, left, top, c, c, resample, order)
        if not np.array_equal(np.asarray(ref), np.asarray(got)):
            return False
    return True

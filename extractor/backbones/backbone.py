"""A backbone: a ready network and exactly the preprocessing its weights need, whole and cut
in two (per image in the decoding workers, then per batch)."""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..decoding import DEFAULT_DECODE
from ..resize import pass_order, resize_center_crop

DEFAULT_MODEL = "efficientnet_lite0"


class SplitTransform:
    """A weights' preprocessing cut in two, with the same operations in the same order.

    ``pil`` runs per image in the decoding workers and returns a uint8 tensor (3, H, W): the
    resize and crop, which are the weights' own PIL operations. ``batch`` turns a stacked uint8
    batch into the normalised float batch with the very torchvision functions the full
    transform calls (``to_tensor``'s ``div(255)`` or ``convert_image_dtype``, then
    ``normalize``), so the result is bitwise that of the full transform (a test checks it),
    while the workers ship 4x fewer bytes and the arithmetic runs vectorised over the batch.
    """

    def __init__(self, pil_ops: list, to_float: str, mean, std, resize_crop: tuple | None = None):
        self.pil_ops, self.to_float = pil_ops, to_float
        self.mean, self.std = list(mean), list(std)
        # (short side, (crop h, crop w), PIL filter) when pil_ops are exactly "resize the short
        # side, centre-crop": extractor.resize then computes only the kept pixels, bitwise.
        self.resize_crop = resize_crop
        if resize_crop:
            pass_order()  # its one-off self-check belongs to setup, not to the first image

    @property
    def pixel_scale(self) -> float:
        """What a uint8 pixel is divided by before ``mean`` and ``std`` apply: 255, or 1 where the
        1/255 is folded into them (``float``, transformers' processors). Runtimes that take the
        uint8 batch into their graph (:func:`extractor.runtimes.normalised_pixels`) read it."""
        return 1.0 if self.to_float == "float" else 255.0

    def pil(self, img):
        from torchvision.transforms import functional as F
        if self.resize_crop:
            out = resize_center_crop(img, *self.resize_crop)
            if out is not None:
                return F.pil_to_tensor(out)
        for op in self.pil_ops:
            img = op(img)
        # a library's own resize and crop (transformers' processors) may hand back the tensor
        return img if isinstance(img, torch.Tensor) else F.pil_to_tensor(img)

    def __call__(self, img) -> torch.Tensor:
        """The whole transform on one image, bitwise the weights' own (with the faster resize)."""
        return self.batch(self.pil(img)[None])[0]

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms import functional as F
        # The same operations as the full transform, in place on the fresh float tensor: the
        # out-of-place versions (``div``, and ``normalize``'s clone) cost three more passes
        # over the batch, a third of the decoding time on a 2-core machine (measured 28 ms vs
        # 9 ms per batch of 32), and give the same bits.
        if self.to_float == "div255":
            x = x.to(dtype=torch.get_default_dtype()).div_(255)
        elif self.to_float == "float":  # the 1/255 is folded into mean and std (transformers' way)
            x = x.to(dtype=torch.float32)
        else:
            x = F.convert_image_dtype(x, torch.float)
        return F.normalize(x, mean=self.mean, std=self.std, inplace=True)


def need_extra(module: str, extra: str, name: str):
    """Import an optional library a model family needs, or one line naming the extra that
    installs it (``pip install 'cnncodes[hf]'``)."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        from ..errors import ModelNotFoundError
        raise ModelNotFoundError(f"{name} needs the {module} library: "
                                 f"pip install 'cnncodes[{extra}]'.") from None


def split_transform(transform) -> SplitTransform | None:
    """Cut a timm ``Compose`` or a torchvision ``ImageClassification`` preset, or ask a transform
    that knows its own cut (``as_split()``, transformers' processors); None otherwise."""
    own = getattr(transform, "as_split", None)
    if callable(own):
        return own()
    from torchvision import transforms as T
    from torchvision.transforms import _presets
    from torchvision.transforms import functional as F
    if isinstance(transform, _presets.ImageClassification):
        t = transform
        # partials, not lambdas: DataLoader workers started by spawn (macOS) pickle them
        ops = [functools.partial(F.resize, size=t.resize_size, interpolation=t.interpolation,
                                 antialias=t.antialias),
               functools.partial(F.center_crop, output_size=t.crop_size)]
        fused = _resize_crop(t.resize_size, None, t.interpolation, t.antialias, t.crop_size)
        return SplitTransform(ops, "convert_image_dtype", t.mean, t.std, fused)
    if isinstance(transform, T.Compose) and len(transform.transforms) >= 2:
        *head, to_tensor, norm = transform.transforms
        pil_types = (T.Resize, T.CenterCrop)
        if (type(to_tensor).__name__ in ("ToTensor", "MaybeToTensor") and isinstance(norm, T.Normalize)
                and all(isinstance(h, pil_types) for h in head) and not norm.inplace):
            fused = None
            if len(head) == 2 and isinstance(head[0], T.Resize) and isinstance(head[1], T.CenterCrop):
                r = head[0]
                fused = _resize_crop(r.size, r.max_size, r.interpolation, r.antialias, head[1].size)
            return SplitTransform(head, "div255", norm.mean, norm.std, fused)
    return None


def _resize_crop(size, max_size, interpolation, antialias, crop) -> tuple | None:
    """The arguments of extractor.resize.resize_center_crop for "resize(size) then
    center_crop(crop)", or None where they are not that (Pillow always antialiases)."""
    from torchvision.transforms import functional as F
    if isinstance(size, (list, tuple)):
        size = size[0] if len(size) == 1 else None
    if isinstance(crop, int):
        crop = (crop, crop)
    elif isinstance(crop, (list, tuple)):
        crop = (crop[0], crop[0]) if len(crop) == 1 else tuple(crop)
    if not isinstance(size, int) or max_size is not None or antialias is False or len(crop) != 2:
        return None
    filt = F.pil_modes_mapping.get(interpolation) if not isinstance(interpolation, int) else interpolation
    return None if filt is None else (size, crop, filt)


@dataclass
class Backbone:
    """A ready-to-run network and everything needed to reproduce its inputs.

    Attributes
    ----------
    name : str
        The model name as given (``efficientnet_lite0``, ``resnet50``, ``timm:convnext_atto``).
    model : torch.nn.Module
        In eval mode, on the CPU.
    transform : callable
        PIL RGB image -> float tensor (3, H, W), the weights' own preprocessing.
    preprocessing : dict
        The resolved preprocessing values (resize, crop, interpolation, mean, std).
    weights : dict
        ``name`` (enum member, package, file name or ``none``), ``file`` and ``sha256``.
    decode : str
        The decode path a new cache of this backbone takes under ``--decode auto``
        (:mod:`extractor.decoding`): ``reduced`` for the families whose preprocessing cnncodes
        runs itself, ``exact`` where it is a library's own processor that users compare codes
        with (``hf:``, ``openclip:``).
    """

    name: str
    model: nn.Module
    transform: Callable
    preprocessing: dict
    weights: dict
    warnings: list[str] = field(default_factory=list)
    decode: str = DEFAULT_DECODE

    @property
    def input_size(self) -> int:
        return int(self.preprocessing["crop"])

    @property
    def split(self) -> SplitTransform | None:
        return split_transform(self.transform)

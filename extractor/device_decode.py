"""``--decode gpu``: JPEGs decoded by nvJPEG and resized on the device, for GPUs that data-loader
cores cannot keep fed.

The Pillow paths (``--decode reduced``, the default, and ``exact``; :mod:`.decoding`) resample
exactly as the weights' own transform does (:mod:`.resize`). This one ships the encoded bytes from the loader
workers, decodes a batch of JPEGs at once with ``torchvision.io.decode_jpeg(device=...)``
(grayscale and CMYK converted to RGB; EXIF orientation read from the headers on the host and
applied on the device, as torchvision's CUDA decoder ignores it), resizes the short side with
``torchvision.transforms.v2.functional.resize`` (antialiased, the weights' filter) and
centre-crops on the device. The codes are close to the exact path's but not equal (other IDCT
and resampling arithmetic; docs/benchmarks.md gives the measured difference). Anything that is not a
JPEG, or that the device decoder refuses, takes the exact Pillow path for that image alone, so
a PNG or an odd JPEG never fails a batch.

Torch is needed here; the module is imported only by runs that decode on a device.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from .decoding import requested_decode
from .errors import SettingsError
from .images import decode_rgb


def _interpolation(pil_filter):
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    modes = {Image.Resampling.BILINEAR: InterpolationMode.BILINEAR,
             Image.Resampling.BICUBIC: InterpolationMode.BICUBIC,
             Image.Resampling.NEAREST: InterpolationMode.NEAREST_EXACT}
    return modes.get(pil_filter)


def check_decode(decode: str, dev, split, model: str, made_by: str | None = None) -> str:
    """``decode`` if this run can decode that way; a one-line :class:`SettingsError` otherwise
    (``made_by``: the cache whose path ``auto`` kept, named in the message)."""
    decode = requested_decode(decode)
    if decode != "gpu":
        return decode
    if dev.type != "cuda":
        if made_by:
            raise SettingsError(f"{made_by} was made with --decode gpu (nvJPEG on a CUDA device); this "
                                f"run is on {dev.type}: resume it on CUDA, or make another cache (--out, "
                                f"or --overwrite).")
        raise SettingsError(f"--decode gpu decodes with nvJPEG on a CUDA device; this run is on "
                            f"{dev.type} (use --decode reduced, the default, or exact).")
    if split is None or not split.resize_crop or _interpolation(split.resize_crop[2]) is None:
        raise SettingsError(f"--decode gpu needs 'resize the short side, centre-crop' preprocessing with a "
                            f"bilinear, bicubic or nearest filter; {model}'s is not that "
                            f"(use --decode reduced or exact).")
    return decode


def _reraise_device_fault(e: RuntimeError) -> None:
    """Out of memory or a broken device is no bad image: it must stop the run, not fail rows."""
    faults = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                               getattr(torch, "AcceleratorError", None)) if t is not None)
    if isinstance(e, faults) or "CUDA error" in str(e):
        raise e


def _orientation(data: bytes) -> int:
    """The EXIF orientation tag of an encoded image (1 when absent); only its headers are read."""
    import io

    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as img:
            return int(img.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - unreadable metadata: as Pillow's exif_transpose, upright
        return 1


def exif_orient(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """A (C, H, W) image turned upright as Pillow's ``ImageOps.exif_transpose`` does."""
    if orientation == 2:
        return img.flip(-1)
    if orientation == 3:
        return img.flip(-1, -2)
    if orientation == 4:
        return img.flip(-2)
    if orientation == 5:
        return img.transpose(-1, -2)
    if orientation == 6:
        return torch.rot90(img, -1, (-2, -1))
    if orientation == 7:
        return img.transpose(-1, -2).flip(-1, -2)
    if orientation == 8:
        return torch.rot90(img, 1, (-2, -1))
    return img


class DeviceDecoder:
    """Encoded images -> a uint8 batch on ``dev``, resized and cropped as ``split`` says.

    ``__call__(rows, datas, errs, content)`` takes what :class:`~.batching.EncodedImages`
    loaded (bytes, or None where reading failed) and returns ``(rows, batch, errs, content)``
    in the form the :class:`~.batching.Encoder` takes: the batch holds the images whose error
    is empty, in row order.
    """

    def __init__(self, split, dev, names=None):
        self.split, self.dev = split, torch.device(dev)
        self.size, self.crop, pil_filter = split.resize_crop
        self.interpolation = _interpolation(pil_filter)
        self.names = names  # row -> name for messages (the table's paths)

    def _resize_crop(self, img: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as F
        img = F.resize(img, self.size, interpolation=self.interpolation, antialias=True)
        return F.center_crop(img, list(self.crop))

    def _decode_jpegs(self, datas: list[bytes]) -> list[torch.Tensor | None]:
        # torchvision 0.29 deprecates its image decoders in favour of TorchCodec's; they are
        # still what the pinned torchvision ships, and TorchCodec is not a dependency (yet).
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
            return self._decode_batch(datas)

    def _decode_batch(self, datas: list[bytes]) -> list[torch.Tensor | None]:
        from torchvision.io import ImageReadMode, decode_jpeg
        tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
        try:
            out = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.dev)
        except RuntimeError as e:  # one bad image fails the batched call: decode them one by one
            _reraise_device_fault(e)
            out = []
            for t in tensors:
                try:
                    out.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=self.dev))
                except RuntimeError as e:
                    _reraise_device_fault(e)
                    out.append(None)  # the exact path decides (and words the error)
        # torchvision applies EXIF orientation on the CPU decoder only: done here, on the device
        return [None if img is None else exif_orient(img, _orientation(d)) for img, d in zip(out, datas)]

    def __call__(self, rows, datas, errs, content=None):
        errs = list(errs)
        if datas is None:  # no row of the batch could be read
            datas = [None] * len(rows)
        images: list[torch.Tensor | None] = [None] * len(rows)
        jpegs = [i for i, d in enumerate(datas) if d is not None and not errs[i] and d[:2] == b"\xff\xd8"]
        for i, img in zip(jpegs, self._decode_jpegs([datas[i] for i in jpegs]) if jpegs else []):
            if img is not None:
                images[i] = self._resize_crop(img)
        for i, d in enumerate(datas):
            if images[i] is not None or errs[i] or d is None:
                continue
            name = Path(self.names[int(rows[i])]).name if self.names is not None else f"row {int(rows[i])}"
            try:  # not a JPEG, or one the device decoder refused: the exact path, for it alone
                exact = self.split.pil(decode_rgb(d, name))
            except Exception as e:  # noqa: BLE001 - any decode error becomes a failed row
                errs[i] = f"{type(e).__name__}: {e}".strip()[:500]
                continue
            images[i] = exact.to(self.dev)
        good = [images[i] for i in range(len(rows)) if not errs[i] and images[i] is not None]
        for i in range(len(rows)):
            if images[i] is None and not errs[i]:
                errs[i] = "no image"
        return rows, torch.stack(good) if good else None, errs, content

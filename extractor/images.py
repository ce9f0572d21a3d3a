"""The images of a data set as one :class:`ImageTable` (rows, labels, splits; one reader of
files and tar members), and decoding them robustly into RGB.

Finding the images of a source is :mod:`.sources`' (image folders, CSV manifests) and
:mod:`.shards`' (WebDataset tar shards).
"""
from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

SPLITS = ("train", "val", "test")
# Folder (and manifest) names of splits, as published data sets spell them.
SPLIT_NAMES = {"train": "train", "val": "val", "validation": "val", "valid": "val", "dev": "val",
               "test": "test"}


@dataclass
class ImageTable:
    """The images of a data set, in a fixed order.

    Attributes
    ----------
    root : Path
        Folder that ``paths`` are relative to.
    paths : list of str
        POSIX paths relative to ``root`` (absolute when a manifest names a file elsewhere).
    labels : numpy.ndarray
        int64 class index per image, -1 when unlabelled.
    splits : list of str
        ``train``, ``val``, ``test`` or ``""`` per image.
    classes : list of str
        Class names; the index is the label.
    sizes, mtimes : list of int
        ``st_size`` and ``st_mtime_ns`` of each file when the table was made (-1 when it could
        not be read): the cheap half of a cache's content check (see ``extractor.cache``).
    """

    root: Path
    paths: list[str]
    labels: np.ndarray
    splits: list[str]
    classes: list[str]
    sizes: list[int] = field(default_factory=list)
    mtimes: list[int] = field(default_factory=list)
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> entries passed over
    archives: object = None  # a .shards.TarMembers when the rows are members of tar shards

    def __len__(self) -> int:
        return len(self.paths)

    def absolute(self, i: int) -> Path:
        """The file that holds row ``i``'s image (its tar shard for a shard source)."""
        if self.archives is not None:
            return self.root / self.archives.shard_of(i)
        return self.root / self.paths[i]

    def stat(self, i: int) -> tuple[int, int]:
        """``(size, mtime_ns)`` of row ``i``'s bytes now (its member's size and shard's mtime)."""
        if self.archives is not None:
            return self.archives.stat(i)
        return file_stat(self.absolute(i))

    def read(self, i: int) -> tuple[bytes, int]:
        """Row ``i``'s encoded image and the mtime of the file it came from."""
        if self.archives is not None:
            return self.archives.read(self.root, i)
        with open(self.absolute(i), "rb") as f:
            return f.read(), os.fstat(f.fileno()).st_mtime_ns

    def digest(self, i: int) -> str:
        """Hex sha256 of row ``i``'s bytes; "" when they cannot be read."""
        try:
            return hashlib.sha256(self.read(i)[0]).hexdigest()
        except OSError:
            return ""

    def load(self, i: int, content: Content | None = None,
             min_size: tuple[int, int] | None = None) -> Image.Image:
        """Row ``i`` decoded by :func:`decode_rgb`'s rules, ``content`` filled as it does."""
        data, mtime = self.read(i)
        return decode_rgb(data, Path(self.paths[i]).name, content, mtime, min_size)

    def list_fingerprint(self) -> str:
        """sha256 over every (path, label, split) and the class names: changes when the image
        list does (a cache's ``image_fingerprint``). What a file holds is checked per row instead
        (size, mtime and a content
        hash in the cache), so a changed image is re-extracted alone."""
        h = hashlib.sha256()
        for p, y, s in zip(self.paths, self.labels.tolist(), self.splits):
            h.update(f"{p}\0{y}\0{s}\n".encode())
        h.update("\0".join(self.classes).encode())
        return h.hexdigest()

    def fingerprint(self) -> str:
        """sha256 over every (path, label, split, file size) and the class names: changes when
        the image list or a file's size does (fine-tuning runs; schema-1 caches)."""
        h = hashlib.sha256()
        for p, y, s, n in zip(self.paths, self.labels.tolist(), self.splits, self.sizes):
            h.update(f"{p}\0{y}\0{s}\0{n}\n".encode())
        h.update("\0".join(self.classes).encode())
        return h.hexdigest()

    def summary_of_skipped(self) -> str:
        """``2 broken link (e.g. cat/x.png), 1 a folder inside a class folder (e.g. dog/more)``."""
        return "; ".join(f"{len(v)} {k} (e.g. {v[0]})" for k, v in self.skipped.items())


def relative_posix(path: Path, root: Path) -> str:
    """``path`` as a POSIX path relative to ``root`` (a row's name), or whole when it lies elsewhere."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def file_stat(path: str | os.PathLike) -> tuple[int, int]:
    """``(st_size, st_mtime_ns)`` of a file, ``(-1, -1)`` when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1
    return st.st_size, st.st_mtime_ns


@dataclass
class Content:
    """What an image file held when it was decoded: the bytes' sha256, size and mtime."""

    sha256: str = ""
    size: int = -1
    mtime_ns: int = -1

    def record(self, data: bytes, mtime_ns: int) -> None:
        """Identify ``data``, read from a file (or tar shard) of mtime ``mtime_ns``."""
        self.sha256, self.size, self.mtime_ns = hashlib.sha256(data).hexdigest(), len(data), mtime_ns


def load_rgb(path: str | os.PathLike, content: Content | None = None) -> Image.Image:
    """Decode any image Pillow reads into an 8-bit RGB image, upright.

    EXIF orientation is applied; 16-bit and 32-bit integer images are scaled to 8 bits rather
    than clipped; transparent pixels are composited on white (their colour is undefined);
    palette, grayscale and CMYK images are converted. Truncated files raise ``OSError``.
    ``content``, when given, is filled with the sha256, size and mtime of the bytes read
    (before decoding, so a file that fails to decode is identified too).
    """
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        data = f.read()
    return decode_rgb(data, Path(path).name, content, st.st_mtime_ns)


def decode_rgb(data: bytes, name: str, content: Content | None = None, mtime_ns: int = -1,
               min_size: tuple[int, int] | None = None) -> Image.Image:
    """:func:`load_rgb` of bytes already read (``name`` for messages).

    ``min_size`` (width, height) asks for a reduced decode (``--decode reduced``): the image at
    the smallest scale that still has at least that many pixels on each side, when it is at
    least twice as large. A JPEG is decoded at that scale (libjpeg's DCT scaling, 1/2, 1/4 or
    1/8, through Pillow's ``draft``: the costly full-size decode and resampling never happen);
    any image still twice as large after that (other formats, which no decoder Pillow has can
    reduce, or a JPEG over 8x) is box-averaged by the largest integer factor that keeps the
    size (``Image.reduce``). Both sides are asked for, so the rule is the same before and after
    EXIF rotation.
    """
    if content is not None:
        content.record(data, mtime_ns)
    if not data:
        raise OSError("empty file")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:  # Pillow's message names the BytesIO object, not the file
        raise UnidentifiedImageError(f"cannot identify image file {name!r}") from None
    with img:
        if min_size is not None:
            img.draft(None, min_size)  # JPEG only (a no-op for other formats)
        img.load()  # decode now: truncated data raises here, not later in a worker
        img = ImageOps.exif_transpose(img)
        img = to_rgb(img)
    if min_size is not None:
        factor = min(img.size[0] // min_size[0], img.size[1] // min_size[1])
        if factor >= 2:
            img = img.reduce(factor)
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        # 16-bit data stored in 'I' is the common case; scale by the type's range, not by the
        # image's own max, so that a dark 16-bit image stays dark.
        top = 65535.0 if mode.startswith("I") and a.max() > 255 else (255.0 if mode.startswith("I") else 1.0)
        a = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        img = Image.fromarray(a, mode="L")
        mode = "L"
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB") if mode != "RGB" else img


def gather_images(inputs) -> list[Path]:
    """Files as given, folders searched recursively (hidden files skipped), in sorted order."""
    out = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and not any(
                part.startswith(".") for part in f.relative_to(p).parts))
        elif p.exists():
            out.append(p)
        else:
            from .errors import ImageSourceError
            raise ImageSourceError(f"{p} does not exist.")
    return out

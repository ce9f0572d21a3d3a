"""Finding images, their labels and splits, and decoding them robustly into RGB.

Three input layouts are understood:

- ``ROOT/<class>/<image>``: an image-folder root, no splits;
- ``ROOT/<split>/<class>/<image>`` with split folders named ``train``, ``val`` or ``test``;
- a CSV manifest with a header ``path,label[,split]`` (paths relative to the CSV's folder or
  absolute; an empty label means unlabelled).

Every non-hidden regular file under a class folder is an image candidate: a file Pillow cannot
decode is not silently ignored, it becomes a failed row with its error in the cache.
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageSourceError

SPLITS = ("train", "val", "test")
# Operating-system litter that is never an image and never worth a failed row.
_IGNORED_NAMES = {"thumbs.db", "desktop.ini"}


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

    def __len__(self) -> int:
        return len(self.paths)

    def absolute(self, i: int) -> Path:
        return self.root / self.paths[i]

    def list_fingerprint(self) -> str:
        """sha256 over every (path, label, split) and the class names: changes when the image
        list does (a cache's ``image_fingerprint``). What a file holds is checked per row instead (size, mtime and a content
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

    def subset(self, rows) -> "ImageTable":
        rows = list(rows)
        return ImageTable(self.root, [self.paths[i] for i in rows], self.labels[rows],
                          [self.splits[i] for i in rows], list(self.classes),
                          [self.sizes[i] for i in rows], [self.mtimes[i] for i in rows])


def _is_candidate(entry: os.DirEntry) -> bool:
    return (not entry.name.startswith(".") and entry.name.lower() not in _IGNORED_NAMES
            and entry.is_file())


def _class_folders(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _files(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if _is_candidate(e))


def find_images(source: str | os.PathLike) -> ImageTable:
    """Read an image folder, a split image folder or a CSV manifest.

    Parameters
    ----------
    source : path
        A folder (``ROOT/<class>/<image>`` or ``ROOT/<split>/<class>/<image>``) or a ``.csv``.

    Examples
    --------
    >>> table = find_images("../shared/datasets/caltech101-mini")  # doctest: +SKIP
    >>> len(table), table.splits[0], table.classes[:2]              # doctest: +SKIP
    (2020, 'train', ['Faces', 'Faces_easy'])
    """
    source = Path(source)
    if not source.exists():
        raise ImageSourceError(f"{source} does not exist: give an image folder or a CSV manifest.")
    if source.is_file():
        table = _from_manifest(source)
    else:
        table = _from_folder(source)
    if not table.paths:
        raise ImageSourceError(
            f"no images found in {source}: expected ROOT/<class>/<image>, "
            f"ROOT/train|val|test/<class>/<image> or a CSV manifest 'path,label[,split]'.")
    stats = [file_stat(table.absolute(i)) for i in range(len(table))]
    table.sizes, table.mtimes = [s for s, _ in stats], [m for _, m in stats]
    return table


def file_stat(path: str | os.PathLike) -> tuple[int, int]:
    """``(st_size, st_mtime_ns)`` of a file, ``(-1, -1)`` when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1
    return st.st_size, st.st_mtime_ns


def file_digest(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes; "" when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return ""


@dataclass
class Content:
    """What an image file held when it was decoded: the bytes' sha256, size and mtime."""

    sha256: str = ""
    size: int = -1
    mtime_ns: int = -1


def _from_folder(root: Path) -> ImageTable:
    top = _class_folders(root)
    split_dirs = [s for s in SPLITS if s in top]
    if split_dirs:
        others = [d for d in top if d not in SPLITS]
        if others:
            raise ImageSourceError(
                f"{root} mixes split folders ({', '.join(split_dirs)}) with other folders "
                f"({', '.join(others[:5])}): use either ROOT/<split>/<class>/ or ROOT/<class>/.")
        layout = [(s, root / s) for s in split_dirs]
    else:
        layout = [("", root)]
    classes = sorted({c for _, folder in layout for c in _class_folders(folder)})
    if not classes:
        raise ImageSourceError(f"{root} has no class folders: expected ROOT/<class>/<image>.")
    index = {c: i for i, c in enumerate(classes)}
    paths, labels, splits = [], [], []
    for split, folder in layout:
        for c in _class_folders(folder):
            for name in _files(folder / c):
                paths.append(f"{split}/{c}/{name}" if split else f"{c}/{name}")
                labels.append(index[c])
                splits.append(split)
    return ImageTable(root, paths, np.asarray(labels, dtype=np.int64), splits, classes)


def _from_manifest(csv_path: Path) -> ImageTable:
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = [h.strip().lower() for h in (reader.fieldnames or [])]
        if "path" not in fields or "label" not in fields:
            raise ImageSourceError(
                f"{csv_path}: a manifest needs a header 'path,label[,split]', got {','.join(fields) or 'none'}.")
        rows = [{k.strip().lower(): (v or "").strip() for k, v in r.items() if k} for r in reader]
    classes = sorted({r["label"] for r in rows if r["label"]})
    index = {c: i for i, c in enumerate(classes)}
    paths, labels, splits = [], [], []
    for n, r in enumerate(rows, start=2):
        split = r.get("split", "")
        if split not in ("",) + SPLITS:
            raise ImageSourceError(f"{csv_path}:{n}: split must be train, val, test or empty, got {split!r}.")
        if not r["path"]:
            raise ImageSourceError(f"{csv_path}:{n}: empty path.")
        paths.append(Path(r["path"]).as_posix())
        labels.append(index[r["label"]] if r["label"] else -1)
        splits.append(split)
    return ImageTable(csv_path.parent, paths, np.asarray(labels, dtype=np.int64), splits, classes)


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
    if content is not None:
        content.sha256, content.size, content.mtime_ns = hashlib.sha256(data).hexdigest(), len(data), st.st_mtime_ns
    if not data:
        raise OSError("empty file")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:  # Pillow's message names the BytesIO object, not the file
        raise UnidentifiedImageError(f"cannot identify image file {Path(path).name!r}") from None
    with img:
        img.load()  # decode now: truncated data raises here, not later in a worker
        img = ImageOps.exif_transpose(img)
        return to_rgb(img)


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

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
import errno
import hashlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageSourceError

SPLITS = ("train", "val", "test")
# Folder (and manifest) names of splits, as published data sets spell them.
SPLIT_NAMES = {"train": "train", "val": "val", "validation": "val", "valid": "val", "dev": "val",
               "test": "test"}
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



def _kind(entry: os.DirEntry) -> str:
    """``file``, ``dir``, ``hidden`` or why the entry is no image: ``broken link``, ``link loop``."""
    if entry.name.startswith(".") or entry.name.lower() in _IGNORED_NAMES:
        return "hidden"
    try:
        if entry.is_dir():
            return "dir"
        if entry.is_file():
            return "file"
    except OSError as e:  # ELOOP: a symbolic link that points at itself
        return "link loop" if e.errno == errno.ELOOP else f"unreadable ({e.strerror})"
    if entry.is_symlink():
        try:
            os.stat(entry.path)
        except OSError as e:
            return "link loop" if e.errno == errno.ELOOP else "broken link"
    return "not a regular file"


class _Scan:
    """Entries of a folder scan, with what was passed over and why (for the summary).

    ``exclude`` is the output file: its folder is never a class, and nothing named after it
    (the cache, its journal, working copy and companion) is ever an image or a class.
    """

    def __init__(self, root: Path, exclude: Path | None):
        self.root, self.exclude = root, exclude
        self.skipped: dict[str, list[str]] = {}

    def _is_output(self, entry: os.DirEntry) -> bool:
        if self.exclude is None:
            return False
        if _kind(entry) == "dir" and _same_path(Path(entry.path), self.exclude.parent):
            return True
        name = self.exclude.name  # the files beside the cache that writing it makes
        ours = {name, f"{name}.journal", f"{name}.work", f"{name}.adding.h5", f"{name}.adding.h5.journal",
                f"{name}.adding.h5.work"}
        return (entry.name in ours or entry.name.startswith((f".{name}.tmp-", f".{name}.adding.h5.tmp-"))) \
            and _same_path(Path(entry.path).parent, self.exclude.parent)

    def skip(self, reason: str, path: Path) -> None:
        self.skipped.setdefault(reason, []).append(_relative(path, self.root))

    def entries(self, folder: Path) -> list[os.DirEntry]:
        try:
            with os.scandir(folder) as it:
                return sorted(it, key=lambda e: e.name)
        except OSError as e:
            raise ImageSourceError(f"cannot read the folder {folder}: {e.strerror}.") from None

    def folders(self, folder: Path) -> list[str]:
        out = []
        for e in self.entries(folder):
            if self._is_output(e):
                self.skip("the output", Path(e.path))
            elif _kind(e) == "dir":
                out.append(e.name)
        return out

    def files(self, folder: Path) -> list[str]:
        out = []
        for e in self.entries(folder):
            kind = _kind(e)
            if self._is_output(e):
                self.skip("the output", Path(e.path))
            elif kind == "file":
                out.append(e.name)
            elif kind == "dir":
                self.skip("a folder inside a class folder", Path(e.path))
            elif kind != "hidden":
                self.skip(kind, Path(e.path))
        return out


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def find_images(source: str | os.PathLike, *, exclude: str | os.PathLike | None = None,
                allow_overlap: bool = False) -> ImageTable:
    """Read an image folder, a split image folder or a CSV manifest.

    Parameters
    ----------
    source : path
        A folder (``ROOT/<class>/<image>`` or ``ROOT/<split>/<class>/<image>``, the split
        folders named ``train``, ``val`` (or ``validation``, ``valid``, ``dev``) and ``test``)
        or a ``.csv``.
    exclude : path, optional
        The output file, when it lies inside ``source``: neither it nor its folder is data.
    allow_overlap : bool
        Accept an image listed in more than one split (a train/test leak); refused by default.

    What was passed over (broken links, sub-folders of class folders, the output folder, link
    loops) is counted in ``table.skipped``, never dropped silently.

    Examples
    --------
    >>> table = find_images("../shared/datasets/caltech101-mini")  # doctest: +SKIP
    >>> len(table), table.splits[0], table.classes[:2]              # doctest: +SKIP
    (2020, 'train', ['Faces', 'Faces_easy'])
    """
    from .shards import is_shard_source, shard_table
    if is_shard_source(source):
        table = shard_table(source, exclude)
        if not table.paths:
            raise ImageSourceError(f"no images found in the shards of {source}"
                                   + (f" ({table.summary_of_skipped()})" if table.skipped else "") + ".")
    else:
        table = _from_files(Path(source), exclude, allow_overlap)
    stats = [table.stat(i) for i in range(len(table))]
    table.sizes, table.mtimes = [s for s, _ in stats], [m for _, m in stats]
    return table


def _from_files(source: Path, exclude, allow_overlap: bool) -> ImageTable:
    if not source.exists() and any(c in source.name for c in "*?["):
        raise ImageSourceError(f"{source}: wildcards are not expanded here; name the folder of the shards "
                               f"or a brace pattern (shards/train-{{000000..000127}}.tar).")
    if not source.exists():
        raise ImageSourceError(f"{source} does not exist: give an image folder, a CSV manifest or tar "
                               f"shards (a folder of .tar files, or a pattern like shards/{{000..127}}.tar).")
    if source.is_file():
        table = _from_manifest(source, allow_overlap)
    else:
        table = _from_folder(source, Path(exclude) if exclude is not None else None)
    if not table.paths:
        raise ImageSourceError(
            f"no images found in {source}: expected ROOT/<class>/<image>, "
            f"ROOT/train|val|test/<class>/<image> or a CSV manifest 'path,label[,split]'"
            + (f" ({table.summary_of_skipped()})" if table.skipped else "") + ".")
    return table


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


def _from_folder(root: Path, exclude: Path | None) -> ImageTable:
    scan = _Scan(root, exclude)
    top = scan.folders(root)
    split_dirs = [d for d in top if d.lower() in SPLIT_NAMES]
    if split_dirs:
        others = [d for d in top if d.lower() not in SPLIT_NAMES]
        if others:
            raise ImageSourceError(
                f"{root} mixes split folders ({', '.join(split_dirs)}) with other folders "
                f"({', '.join(others[:5])}): use either ROOT/<split>/<class>/ or ROOT/<class>/ "
                f"(split folders: {', '.join(sorted(SPLIT_NAMES))}).")
        named = {}
        for d in split_dirs:
            split = SPLIT_NAMES[d.lower()]
            if split in named:
                raise ImageSourceError(f"{root} has two {split} folders ({named[split]} and {d}): keep one.")
            named[split] = d
        layout = [(s, root / named[s]) for s in SPLITS if s in named]
    else:
        layout = [("", root)]
    folders = {folder: scan.folders(folder) if folder != root else top for _, folder in layout}
    classes = sorted({c for names in folders.values() for c in names})
    if not classes:
        raise ImageSourceError(f"{root} has no class folders: expected ROOT/<class>/<image>.")
    index = {c: i for i, c in enumerate(classes)}
    paths, labels, splits = [], [], []
    for split, folder in layout:
        prefix = folder.relative_to(root).as_posix()
        for c in folders[folder]:
            for name in scan.files(folder / c):
                paths.append(f"{prefix}/{c}/{name}" if split else f"{c}/{name}")
                labels.append(index[c])
                splits.append(split)
    table = ImageTable(root, paths, np.asarray(labels, dtype=np.int64), splits, classes)
    table.skipped = scan.skipped
    return table


def _read_manifest(csv_path: Path) -> list[dict]:
    try:
        # utf-8-sig: Excel's "CSV UTF-8" starts with a byte-order mark, which is no header text
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = [h.strip().lower() for h in (reader.fieldnames or [])]
            if "path" not in fields or "label" not in fields:
                raise ImageSourceError(f"{csv_path}: a manifest needs a header 'path,label[,split]', "
                                       f"got {','.join(fields) or 'none'}.")
            return [{k.strip().lower(): (v or "").strip() for k, v in r.items() if k} for r in reader]
    except UnicodeDecodeError:
        raise ImageSourceError(f"{csv_path} is not UTF-8 text (UTF-16 or Latin-1?): save it as 'CSV UTF-8' "
                               f"and run again.") from None


def _from_manifest(csv_path: Path, allow_overlap: bool) -> ImageTable:
    rows = _read_manifest(csv_path)
    classes = sorted({r["label"] for r in rows if r["label"]})
    index = {c: i for i, c in enumerate(classes)}
    paths, labels, splits, seen, skipped = [], [], [], {}, {}
    for n, r in enumerate(rows, start=2):
        split = r.get("split", "")
        split = SPLIT_NAMES.get(split.lower(), split)
        if split not in ("",) + SPLITS:
            raise ImageSourceError(f"{csv_path}:{n}: split must be train, val, test or empty, got {split!r}.")
        if not r["path"]:
            raise ImageSourceError(f"{csv_path}:{n}: empty path.")
        path = Path(r["path"]).as_posix()
        if path in seen:
            first_split = splits[seen[path]]
            if first_split != split and not allow_overlap:
                raise ImageSourceError(
                    f"{csv_path}:{n}: {path} is listed in {first_split or 'no split'} "
                    f"(line {seen[path] + 2}) and "
                    f"in {split or 'no split'}: a leak between splits. "
                    f"Fix the manifest, or pass --allow-overlap.")
            skipped.setdefault("a duplicate manifest row", []).append(f"line {n}: {path}")
            continue
        seen[path] = len(paths)
        if not r["label"]:
            skipped.setdefault("unlabelled rows (extracted; classifiers leave them out)", []).append(path)
        paths.append(path)
        labels.append(index[r["label"]] if r["label"] else -1)
        splits.append(split)
    table = ImageTable(csv_path.parent, paths, np.asarray(labels, dtype=np.int64), splits, classes)
    table.skipped = skipped
    return table


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

"""WebDataset tar shards as an image source, read in place through an index of their members.

A shard is a plain ``.tar`` whose members are grouped into samples by key, as WebDataset does:
``a/b/0001.jpg`` and ``a/b/0001.cls`` are the image and the label of the sample ``a/b/0001``
(the key is the member name up to the first dot of its last part). A sample's label is the
class name of its ``.txt`` member, or of a ``.json`` member (a string, or an object's
``label``/``class``/``class_name``/``cls`` field), else the index of its ``.cls`` member; a
sample without any is unlabelled. A row of the cache is ``<shard>/<key>``, the shard relative
to the data root.

Why ``tarfile`` with an index and not the ``webdataset`` library: WebDataset streams a shard
from the start, which suits training but not this extractor, whose fixed row blocks (the
basis of resume, of bitwise-equal codes and of dealing work out to torchrun ranks) need any
row on demand. One pass over a shard's headers (``tarfile`` seeks over the data) gives each
image member's offset and size; a worker then reads a member with one ``pread`` of the shard,
in any process, without unpacking anything. Compressed shards (``.tar.gz``) cannot be read
that way and are refused.

The split of a shard is read from its name (``train-000012.tar``) or its folder (``val/``); a
folder source holds shards at its top or in its split folders.
"""
from __future__ import annotations

import json
import os
import posixpath
import re
import tarfile
from pathlib import Path

import numpy as np

from .errors import ImageSourceError
from .images import SPLIT_NAMES, ImageTable, relative_posix

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "ppm", "pgm", "pbm", "pnm", "bmp", "tif", "tiff", "gif")
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")  # webdataset's base_plus_ext
_JSON_LABEL_KEYS = ("label", "class", "class_name", "cls", "category")
# What makes images of a shard unreadable (``extract --strict`` stops on them).
UNREADABLE = "an unreadable tar shard"
DAMAGED = "a damaged tar shard (read up to the damage)"
TRUNCATED = "a truncated tar shard (samples after the cut are missing)"
SHARD_DAMAGE = (UNREADABLE, DAMAGED, TRUNCATED)
_COMPRESSED = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")


def is_shard_source(source: str | os.PathLike) -> bool:
    """A brace pattern, a ``.tar`` file, or a folder with ``.tar`` files at its top (an image
    folder has class folders there, and its loose files are never images)."""
    s = str(source)
    if "{" in s and "}" in s and not Path(s).exists():
        return True
    p = Path(s)
    if p.is_file():
        return p.name.endswith(".tar") or p.name.endswith(_COMPRESSED)
    if p.is_dir():
        return bool(_folder_shards(p))
    return False


def _tars(folder: Path) -> list[Path]:
    try:
        return sorted(q for q in folder.iterdir() if q.is_file() and not q.name.startswith(".")
                      and q.name.endswith((".tar",) + _COMPRESSED))
    except OSError:
        return []


def _folder_shards(folder: Path) -> list[Path]:
    """The shards of a folder: the ``.tar`` files at its top and in its split folders
    (``train/``, ``val/``, ...; the split is then the folder's)."""
    subs = []
    try:
        subs = sorted(q for q in folder.iterdir() if q.is_dir() and q.name.lower() in SPLIT_NAMES)
    except OSError:
        pass
    return _tars(folder) + [t for sub in subs for t in _tars(sub)]


def shard_paths(source: str | os.PathLike) -> tuple[Path, list[Path]]:
    """``(root, shards)``: the shards a source names, and the folder rows are relative to."""
    s = str(source)
    p = Path(s)
    if p.is_dir():
        shards, root = _folder_shards(p), p
    elif p.is_file():
        shards, root = [p], p.parent
    else:
        from braceexpand import braceexpand
        shards = [Path(x) for x in braceexpand(s)]
        missing = [q for q in shards if not q.is_file()]
        if missing:
            raise ImageSourceError(f"{missing[0]} does not exist ({len(missing)} of the {len(shards)} shards "
                                   f"that {s} names are missing).")
        root = Path(os.path.commonpath([str(q.parent.absolute()) for q in shards]))
    compressed = [q for q in shards if q.name.endswith(_COMPRESSED) or _gzipped(q)]
    if compressed:
        raise ImageSourceError(f"{compressed[0]} is compressed: its images cannot be read in place. Unpack "
                               f"it to a plain .tar (gunzip keeps the members), as WebDataset shards "
                               f"of images usually are.")
    return root, shards


def _gzipped(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(2) == b"\x1f\x8b"
    except OSError:
        return False


def dedupe(shards: list[Path], skipped: dict[str, list[str]]) -> list[Path]:
    """``shards`` with each file once (a pattern may name one twice, or by two spellings)."""
    seen, out = set(), []
    for q in shards:
        key = os.path.realpath(q)
        if key in seen:
            skipped.setdefault("a shard named twice (read once)", []).append(str(q))
            continue
        seen.add(key)
        out.append(q)
    return out


def split_of(shard: Path) -> str:
    """``train`` for ``train-000012.tar`` or ``train/000012.tar``; ``""`` when neither says."""
    first = re.split(r"[-_.]", shard.name, maxsplit=1)[0].lower()
    return SPLIT_NAMES.get(first) or SPLIT_NAMES.get(shard.parent.name.lower(), "")


def _label(ext: str, data: bytes) -> tuple[str, object] | None:
    """``("name", str)`` or ``("index", int)`` of a label member; None when it holds neither."""
    try:
        text = data.decode("utf-8-sig").strip()  # an editor's byte-order mark is no part of a name
    except UnicodeDecodeError:
        return None
    if ext == "txt":
        return ("name", text) if text else None
    if ext == "cls":
        return ("index", int(text)) if re.fullmatch(r"\d+", text) else None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if isinstance(value, dict):
        value = next((value[k] for k in _JSON_LABEL_KEYS if k in value), None)
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return ("index", value) if value >= 0 else None
    if isinstance(value, str) and value.strip():
        return "name", value.strip()
    return None


def index_shard(path: Path, skipped: dict[str, list[str]]) -> list[tuple[str, int, int, object]]:
    """``(key, offset, size, label)`` of each sample with an image, in shard order (label:
    ``("name", str)``, ``("index", int)`` or None). What is passed over goes into ``skipped``."""
    samples: dict[str, dict] = {}
    name = path.name

    def skip(reason: str, what: str) -> None:
        skipped.setdefault(reason, []).append(f"{name}/{what}")

    try:
        with tarfile.open(path, "r:") as tf:
            while True:
                try:
                    m = tf.next()
                except tarfile.ReadError as e:  # a truncated or damaged shard: keep what came before
                    skipped.setdefault(DAMAGED, []).append(
                        f"{name}: {e}")
                    break
                if m is None:
                    break
                if m.isdir():
                    continue
                if not m.isfile():
                    skip("a tar member that is no regular file (a link, a device)", m.name)
                    continue
                member = posixpath.normpath(m.name).lstrip("/")  # ./a.jpg and /a.jpg are a.jpg
                match = _KEY_EXT.match(member)
                if not match or Path(member).name.startswith("."):
                    skip("a tar member without a key.extension name", m.name)
                    continue
                key, ext = match.group(1), match.group(2).lower()
                sample = samples.setdefault(key, {})
                if ext in IMAGE_EXTENSIONS:
                    if "image" in sample:
                        skip("a second image of a sample (the first is used)", m.name)
                    else:
                        sample["image"] = (m.offset_data, m.size)
                elif ext in ("cls", "txt", "json"):
                    f = tf.extractfile(m)
                    try:
                        label = _label(ext, f.read(1 << 16)) if f is not None else None
                    except (tarfile.ReadError, OSError):  # the shard ends inside this member
                        break
                    if label is None:
                        skip("a label member that holds no class", m.name)
                    else:  # a class name wins over an index
                        sample.setdefault(label[0], label)
            # tarfile takes a shard cut short inside a header for its end: a whole archive
            # ends with zero blocks where the next header would be, and no member's data runs
            # past the end of the file (a member cut short becomes a failed row)
            tf.fileobj.seek(tf.offset)
            tail = tf.fileobj.read(512)
            end = path.stat().st_size
            if len(tail) < 512 or tail.strip(b"\0") or any(
                    sum(sample["image"]) > end for sample in samples.values() if "image" in sample):
                skipped.setdefault(TRUNCATED, []).append(name)
    except (tarfile.ReadError, OSError) as e:  # not a tar at all, or empty: passed over, counted
        skipped.setdefault(UNREADABLE, []).append(f"{name} ({e})")
        return []
    out = []
    for key, sample in samples.items():
        if "image" not in sample:
            skip("a sample with no image member", key)
            continue
        out.append((key, *sample["image"], sample.get("name") or sample.get("index")))
    return out


def shard_table(source: str | os.PathLike, exclude=None):
    """The :class:`~.images.ImageTable` of a shard source (see the module docstring);
    ``exclude`` is the output file (never a shard, should it be named ``.tar``)."""
    root, shards = shard_paths(source)
    skipped: dict[str, list[str]] = {}
    shards = dedupe(shards, skipped)
    if exclude is not None:
        out = os.path.realpath(exclude)
        shards = [q for q in shards if os.path.realpath(q) != out]
    if not shards:
        raise ImageSourceError(f"{source} names no .tar shards.")
    paths, labels_raw, split_col, members, shard_names, stats = [], [], [], [], [], []
    for s, shard in enumerate(shards):
        rel = relative_posix(shard.absolute(), root.absolute())
        shard_names.append(rel)
        st = shard.stat()
        stats.append((st.st_size, st.st_mtime_ns))
        split = split_of(shard)
        for key, offset, size, label in index_shard(shard, skipped):
            paths.append(f"{rel}/{key}")
            labels_raw.append(label)
            split_col.append(split)
            members.append((s, offset, size))
    kinds = {v[0] for v in labels_raw if v}
    if len(kinds) > 1:  # their classes are named by the index: say so, they may be the same classes
        skipped.setdefault("samples labelled by a .cls index beside samples with class names (the index "
                           "is taken as the class name)", []).extend(
            p for p, v in zip(paths, labels_raw) if v and v[0] == "index")
    if kinds == {"index"}:
        # .cls indices only: the label is the index itself, so shard sets that lack different
        # classes (a train and a test set) still agree; classes are named by their index
        top = max(v[1] for v in labels_raw if v)
        classes = [str(i) for i in range(top + 1)]
        labels = np.array([v[1] if v else -1 for v in labels_raw], dtype=np.int64)
    else:
        classes = sorted({str(v[1]) for v in labels_raw if v})
        index = {c: i for i, c in enumerate(classes)}
        labels = np.array([index[str(v[1])] if v else -1 for v in labels_raw], dtype=np.int64)
    if (labels < 0).any():
        skipped.setdefault("unlabelled samples (extracted; classifiers leave them out)", []).extend(
            p for p, y in zip(paths, labels.tolist()) if y < 0)
    table = ImageTable(root, paths, labels, split_col, classes)
    table.archives = TarMembers(shard_names, np.array(members, dtype=np.int64).reshape(-1, 3), stats)
    table.skipped = skipped
    return table


class TarMembers:
    """Where each row's image lies: ``(shard, offset, size)`` per row, and each shard's
    ``(st_size, st_mtime_ns)`` when it was indexed (a shard rewritten since is re-indexed, not
    read at stale offsets)."""

    def __init__(self, shards: list[str], members: np.ndarray, stats: list[tuple[int, int]]):
        self.shards, self.members, self.stats = shards, members, stats

    def shard_of(self, row: int) -> str:
        return self.shards[int(self.members[row, 0])]

    def stat(self, row: int) -> tuple[int, int]:
        """``(member size, shard mtime)``: the cheap half of a row's content check."""
        return int(self.members[row, 2]), self.stats[int(self.members[row, 0])][1]

    def read(self, root: Path, row: int) -> tuple[bytes, int]:
        """The member's bytes and the shard's mtime; ``OSError`` when the shard changed since
        it was indexed."""
        s, offset, size = (int(v) for v in self.members[row])
        with open(root / self.shards[s], "rb") as f:
            st = os.fstat(f.fileno())
            if (st.st_size, st.st_mtime_ns) != tuple(self.stats[s]):
                raise OSError(f"{self.shards[s]} changed since it was indexed; rerun to index it again")
            data = os.pread(f.fileno(), size, offset)
        if len(data) != size:
            raise OSError(f"truncated member ({len(data)} of {size} bytes)")
        return data, st.st_mtime_ns

"""Finding images, their labels and splits: the source a path names, read into one
:class:`~.images.ImageTable`.

Four input layouts are understood:

- ``ROOT/<class>/<image>``: an image-folder root, no splits;
- ``ROOT/<split>/<class>/<image>`` with split folders named ``train``, ``val`` or ``test``;
- a CSV manifest with a header ``path,label[,split]`` (paths relative to the CSV's folder or
  absolute; an empty label means unlabelled);
- WebDataset tar shards (a ``.tar``, a folder of them or a brace pattern), read by :mod:`.shards`.

Every non-hidden regular file under a class folder is an image candidate: a file Pillow cannot
decode is not silently ignored, it becomes a failed row with its error in the cache.
"""
from __future__ import annotations

import csv
import errno
import os
from pathlib import Path

import numpy as np

from .errors import ImageSourceError
from .images import SPLIT_NAMES, SPLITS, ImageTable, relative_posix
from .shards import is_shard_source, shard_table

# Operating-system litter that is never an image and never worth a failed row.
_IGNORED_NAMES = {"thumbs.db", "desktop.ini"}


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
        self.skipped.setdefault(reason, []).append(relative_posix(path, self.root))

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

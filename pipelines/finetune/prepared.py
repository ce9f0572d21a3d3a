"""Images decoded once (``finetune --prepare``, the default): every image larger than what a run
reads of it is decoded and resized once, into a store in the cache folder, and read back from
there every epoch.

Without it every epoch decodes every photo again: a 12-megapixel JPEG costs 15-150 ms a time on
one core, more than the training step it feeds. The store holds two kinds of copies:

- ``train``: the image with its short side brought down to the training resolution (the side at
  which the smallest random crop still has the crop size's pixels,
  :func:`~cnncodes.pipelines.finetune.data.train_min_size`), resized with the weights' filter;
  the random crops are then taken from it. This is not bitwise the crops of a run without the
  store (its pixel grid is coarser), so ``prepare`` is part of a run's recipe.
- ``eval``: the uint8 image the network sees at evaluation (the weights' resize and crop), bitwise
  what a run without the store computes.

Only images whose short side is larger than the copy's are stored; smaller ones (Caltech-sized
photos) are read from their files as before, which costs less than reading a copy would, and
is the same image.

Layout: ``<folder>/<kind>-<decode>-<settings hash>/<sha256 of the file>.npy`` holds one copy,
named by the content it was made from, so runs of every strategy of ``compare``, and data sets
that share photos, share the copies; ``index-<hash of the data's folder>.json`` beside them
remembers each file's size, mtime and sha256, so a later run checks a file by ``stat`` alone and
reads and hashes it only when it changed (the cache's own content rule: a file rewritten with the
same size and mtime, as ``cp -p`` or ``rsync -t`` can, keeps its old copy). A copy is written as
every file cnncodes publishes is (``atomic_write``: to a temporary name, flushed, renamed; 0.6 ms
a copy here, against 20-40 ms to make one), so neither a kill nor a power cut leaves half a copy
under a real name; one that is deleted or cannot be read is made again from its file.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from cnncodes.extractor.devices import usable_cores
from cnncodes.extractor.errors import OutputError
from cnncodes.extractor.files import atomic_write, write_text_atomic
from cnncodes.extractor.images import ImageTable, decode_rgb
from cnncodes.extractor.resize import resized_size

log = logging.getLogger(__name__)

# rows a pass handles between two writes of the index (a killed pass keeps what it made)
_INDEX_EVERY = 512


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:12]


class PreparedImages:
    """The prepared copies of one kind for the rows of ``table``.

    ``side``: files whose short side is larger get a copy; ``make(data, name)`` turns a file's
    bytes into the copy (a uint8 array); ``settings`` name what ``make`` does (the folder's
    hash); ``finish`` turns a loaded copy into what the loader hands on (None: a PIL image).
    """

    def __init__(self, folder: str | os.PathLike, table: ImageTable, kind: str, decode: str, side: int,
                 make: Callable[[bytes, str], np.ndarray], settings: dict, finish: Callable | None = None):
        self.table, self.side, self.make, self.finish = table, int(side), make, finish
        self.folder = Path(folder) / f"{kind}-{decode}-{_digest({'side': side, **settings})}"
        self.index_path = self.folder / f"index-{_digest(str(Path(table.root).resolve()))}.json"
        self.shas: dict[int, str] = {}  # row -> sha256 of the file its copy was made from
        self.made = 0
        self._claimed: set[str] = set()  # copies a thread of this pass makes (one per content)
        self._claim = threading.Lock()

    def _copy_path(self, sha: str) -> Path:
        return self.folder / f"{sha}.npy"

    def __contains__(self, row: int) -> bool:
        return row in self.shas

    # --- the pass -------------------------------------------------------------------------------
    def prepare(self, rows, progress: bool = False, threads: int | None = None) -> dict[int, str]:
        """Make the missing copies of ``rows`` (changed files again); returns row -> sha256 for
        the rows that have one. Files that cannot be read or decoded get none: the loader
        reports them as it always has."""
        index = self._read_index()
        known = len(index)
        self._remove_stale_temporaries()
        todo = []
        for row in map(int, rows):
            entry = index.get(self.table.paths[row])
            if entry and [entry["size"], entry["mtime_ns"]] == list(self.table.stat(row)):
                if entry["sha256"] and self._copy_path(entry["sha256"]).is_file():
                    self.shas[row] = entry["sha256"]
                    continue
                if not entry["sha256"]:
                    continue  # small: read from its file
            todo.append(row)
        if todo:
            self._make(todo, index, known, progress, threads)
        log.info("prepared images: %d copies in %s (%d made now)", len(self.shas), self.folder, self.made)
        return self.shas

    def _make(self, todo: list[int], index: dict, known: int, progress: bool, threads: int | None) -> None:
        """Read, hash and (where missing) make the copies of ``todo`` on ``threads`` threads
        (Pillow decodes and resizes without the GIL), writing the index every few hundred."""
        threads = threads or usable_cores()
        with ThreadPoolExecutor(threads, thread_name_prefix="cnncodes-prepare") as pool, \
                tqdm(total=len(todo), desc="preparing images", unit="img", disable=not progress,
                     leave=False) as bar:
            for start in range(0, len(todo), _INDEX_EVERY):
                chunk = todo[start:start + _INDEX_EVERY]
                for row, (entry, made) in zip(chunk, pool.map(self._prepare_row, chunk)):
                    bar.update()
                    self.made += made
                    if entry is None:
                        continue
                    index[self.table.paths[row]] = entry
                    if entry["sha256"]:
                        self.shas[row] = entry["sha256"]
                if self.shas or known:  # nothing to remember when no image needs a copy
                    self._write_index(index)

    def _prepare_row(self, row: int) -> tuple[dict | None, bool]:
        """``(index entry or None when unreadable, whether a copy was made)`` of one row."""
        try:
            data, mtime = self.table.read(row)
            size = len(data)
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
        except Exception:  # noqa: BLE001 - unreadable: the loader records it when it meets it
            return None, False
        entry = {"size": size, "mtime_ns": mtime, "sha256": ""}
        if min(w, h) <= self.side:
            return entry, False
        sha = hashlib.sha256(data).hexdigest()
        with self._claim:  # the same photo twice in the data: one thread makes its copy
            made = sha not in self._claimed and not self._copy_path(sha).is_file()
            self._claimed.add(sha)
        if made:
            try:
                copy = self.make(data, Path(self.table.paths[row]).name)
            except Exception:  # noqa: BLE001 - a file that fails to decode: no copy
                return None, False
            self._write_copy(sha, copy)
        entry["sha256"] = sha
        return entry, made

    def _write_copy(self, sha: str, copy: np.ndarray) -> None:
        path = self._copy_path(sha)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(path) as tmp, open(tmp, "wb") as f:
                np.save(f, np.ascontiguousarray(copy), allow_pickle=False)
        except OSError as e:
            raise OutputError(f"cannot write the prepared image {path}: {e.strerror or e}; free space "
                              f"or choose another --prepared-dir (or --no-prepare).") from None

    def _remove_stale_temporaries(self) -> None:
        """Copies a killed pass left half-written under temporary names (an hour old: a pass
        running beside this one may still be writing newer ones)."""
        if self.folder.is_dir():
            for tmp in self.folder.glob(".*.tmp-*"):
                with contextlib.suppress(OSError):
                    if time.time() - tmp.stat().st_mtime > 3600:
                        tmp.unlink()

    def _read_index(self) -> dict:
        try:
            index = json.loads(self.index_path.read_text())
            return index if isinstance(index, dict) else {}
        except (OSError, ValueError):
            return {}

    def _write_index(self, index: dict) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.index_path, json.dumps(index))
        except OSError as e:
            raise OutputError(f"cannot write {self.index_path}: {e.strerror or e}; free space or "
                              f"choose another --prepared-dir (or --no-prepare).") from None

    # --- reading ----------------------------------------------------------------------------------
    def load(self, row: int):
        """Row ``row``'s copy, through ``finish`` (a PIL image without one). A copy that is gone or
        cannot be read is made again from the file (the same function, the same pixels)."""
        sha = self.shas[row]
        try:
            copy = np.load(self._copy_path(sha), allow_pickle=False)
        except (OSError, ValueError, EOFError):
            data, _ = self.table.read(row)
            copy = self.make(data, Path(self.table.paths[row]).name)
            if hashlib.sha256(data).hexdigest() == sha:
                try:
                    self._write_copy(sha, copy)
                except OutputError as e:
                    log.debug("%s", e)
        if self.finish is not None:
            return self.finish(copy)
        return Image.fromarray(copy)


# Classes, not closures: DataLoader workers started by spawn (macOS) pickle the dataset.
class TrainCopy:
    """A training copy's maker: the run's decode (``min_size``: reduced), then the short side
    brought down to ``side`` with the weights' filter (Pillow's, antialiased) when larger."""

    def __init__(self, min_size: tuple[int, int] | None, side: int, resample):
        self.min_size, self.side, self.resample = min_size, int(side), resample

    def __call__(self, data: bytes, name: str) -> np.ndarray:
        img = decode_rgb(data, name, min_size=self.min_size)
        if min(img.size) > self.side:
            img = img.resize(resized_size(*img.size, self.side), self.resample)
        return np.asarray(img)


class EvalCopy:
    """An evaluation copy's maker: the run's decode, then the weights' resize and crop as the
    split transform's per-image half runs them (a uint8 (3, H, W) array); ``finish`` is its
    per-batch half on one copy, so a copy gives bitwise what the transform gives the file."""

    def __init__(self, min_size: tuple[int, int] | None, split):
        self.min_size, self.split = min_size, split

    def __call__(self, data: bytes, name: str) -> np.ndarray:
        return self.split.pil(decode_rgb(data, name, min_size=self.min_size)).numpy()

    def finish(self, copy: np.ndarray):
        import torch
        return self.split.batch(torch.from_numpy(copy)[None])[0]


def make_stores(cfg, bb, table: ImageTable) -> tuple[PreparedImages, PreparedImages | None]:
    """A run's two stores (not filled): training copies at :func:`~.data.training_side` of its
    ``augment``, and evaluation copies where the weights' transform splits into a per-image
    resize and crop (None otherwise). Each folder's hash names everything its copies depend on:
    the decode, the side, the filter, the transform as it prints (timm's crop modes differ
    there, not in the preprocessing dict) and the versions of the libraries that compute them."""
    import PIL
    import torchvision
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import pil_modes_mapping

    from cnncodes.extractor.decoding import decode_min_size

    from cnncodes.pipelines.finetune.data import train_min_size, training_side
    pre = bb.preprocessing
    versions = {"pillow": PIL.__version__, "torchvision": torchvision.__version__}
    side = training_side(pre, cfg.augment)
    interp = pre.get("interpolation", "bilinear")
    make = TrainCopy(train_min_size(cfg.decode, pre, cfg.augment), side,
                     pil_modes_mapping[InterpolationMode(interp)])
    train = PreparedImages(cfg.prepared_dir, table, "train", cfg.decode, side, make,
                           {"interpolation": interp, "min_size": make.min_size, **versions})
    if bb.split is None or not isinstance(pre.get("resize"), (int, float)):
        return train, None
    make = EvalCopy(decode_min_size(cfg.decode, pre), bb.split)
    transform = re.sub(r" at 0x[0-9a-fA-F]+", "", repr(bb.transform))  # no object addresses
    evals = PreparedImages(cfg.prepared_dir, table, "eval", cfg.decode, int(pre["resize"]), make,
                           {"preprocessing": pre, "transform": transform, "min_size": make.min_size,
                            **versions},
                           finish=make.finish)
    return train, evals


def store_exclude(cfg) -> Path | None:
    """What ``find_images`` leaves out of the data when ``--prepared-dir`` lies inside the data
    folder (``cnncodes finetune .`` with the default ``cache/prepared``): its top folder there is
    neither a class nor a split."""
    data, store = Path(cfg.data).resolve(), Path(cfg.prepared_dir).resolve()
    if not data.is_dir() or data == store or data not in store.parents:
        return None
    return data / store.relative_to(data).parts[0] / "store"

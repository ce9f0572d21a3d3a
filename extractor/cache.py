"""The HDF5 cache of CNN codes: self-describing, resumable, never half-written and taken for whole.

This module speaks numpy and h5py only (no torch), so classifiers read caches without a network.

Layout (readable with plain h5py)::

    /images/path    str   image path relative to the data root
    /images/label   int64 class index, -1 when unlabelled
    /images/split   str   train | val | test | ""
    /images/status  uint8 enum: 0 pending, 1 done, 2 failed
    /images/error   str   the error of failed rows, "" otherwise
    /images/sha256  str   hex sha256 of the bytes the row's codes were made from ("" while pending)
    /images/size    int64 their size, and /images/mtime_ns the file's mtime then (-1 while pending)
    /classes        str   class names; the index is the label
    /codes/<layer>  N x D float32|float16, chunked, gzip, resizable; attrs: module, kind,
                    pooling, unpooled_shape, stride, dim

Root attributes: ``format``, ``schema_version``, ``model``, ``weights`` (JSON), ``weights_sha256``,
``preprocessing`` (JSON), ``pooling``, ``dtype``, ``precision``, ``layers`` (JSON list),
``versions`` (JSON), ``image_fingerprint``, ``n_images``, ``data_root``, ``created`` and
``complete`` (true only when every row is done or failed).

Crash safety. HDF5 files are not safe against a process killed mid-write, so the file at the
cache path is only ever replaced atomically (``os.replace``). A writing session holds an
exclusive lock in ``<cache>.journal/``, appends each finished batch there as an atomically
renamed ``.npz`` shard (the durable record), and also writes it into a working copy of the
cache. ``commit()`` finalises the working copy and renames it over the cache. After a ``kill
-9`` the working copy is discarded and the next session replays the shards.

Content. The codes of a row belong to the bytes they were made from. Each writing session
compares every finished row's recorded size and mtime with the file's now (cheap), hashes only
the files where they differ, and puts a row whose content really changed back to pending, so
that one file is extracted again and nothing stale is kept (:meth:`CacheWriter.refresh`).
Schema-1 caches (before these columns) are checked by the image list and file sizes only.
"""
from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import logging
import os
import shutil
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from .errors import CacheError, CacheLockedError, IncompatibleCacheError
from .files import atomic_write, fsync_path

log = logging.getLogger(__name__)

FORMAT = "cnncodes-cache"
SCHEMA_VERSION = 2
CONTENT = ("sha256", "size", "mtime_ns")  # per-row columns of what the codes were made from
PENDING, DONE, FAILED = 0, 1, 2
STATUS_NAMES = {PENDING: "pending", DONE: "done", FAILED: "failed"}
STATUS_DTYPE = h5py.enum_dtype({"pending": PENDING, "done": DONE, "failed": FAILED}, basetype="u1")
_STR = h5py.string_dtype("utf-8")
_CHUNK_BYTES = 512 * 1024  # within h5py's advice of 10 KiB to 1 MiB per chunk


@dataclass
class LayerSpec:
    """What a ``/codes/<name>`` dataset holds."""

    name: str
    dim: int
    attrs: dict


def _json_attr(value) -> str:
    return json.dumps(value, sort_keys=True)


def _chunk_rows(dim: int, itemsize: int) -> int:
    return int(max(1, min(4096, _CHUNK_BYTES // max(1, dim * itemsize))))


def create_cache(path: str | os.PathLike, *, paths, labels, splits, classes, layers: list[LayerSpec],
                 attrs: dict) -> None:
    """Write a new cache with every row pending, atomically.

    ``attrs`` are the root attributes (dicts and lists are stored as JSON strings).
    """
    path = Path(path)
    n = len(paths)
    dtype = np.dtype(attrs.get("dtype", "float32"))
    with atomic_write(path) as tmp:
        with h5py.File(tmp, "w") as f:
            for k, v in attrs.items():
                f.attrs[k] = _json_attr(v) if isinstance(v, (dict, list, tuple)) else v
            f.attrs["format"] = FORMAT
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["layers"] = _json_attr([l.name for l in layers])
            f.attrs["n_images"] = n
            f.attrs["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            f.attrs["complete"] = n == 0
            g = f.create_group("images")
            g.create_dataset("path", data=np.array(paths, dtype=object), dtype=_STR)
            g.create_dataset("label", data=np.asarray(labels, dtype=np.int64))
            g.create_dataset("split", data=np.array(splits, dtype=object), dtype=_STR)
            g.create_dataset("status", data=np.zeros(n, dtype=np.uint8), dtype=STATUS_DTYPE)
            g.create_dataset("error", data=np.array([""] * n, dtype=object), dtype=_STR)
            g.create_dataset("sha256", data=np.array([""] * n, dtype=object), dtype=_STR)
            g.create_dataset("size", data=np.full(n, -1, dtype=np.int64))
            g.create_dataset("mtime_ns", data=np.full(n, -1, dtype=np.int64))
            g["status"].attrs["values"] = "0 pending, 1 done, 2 failed"
            f.create_dataset("classes", data=np.array(list(classes), dtype=object), dtype=_STR)
            codes = f.create_group("codes")
            for layer in layers:
                rows = _chunk_rows(layer.dim, dtype.itemsize)
                ds = codes.create_dataset(layer.name, shape=(n, layer.dim), maxshape=(None, layer.dim),
                                          dtype=dtype, chunks=(min(rows, max(n, 1)), layer.dim),
                                          compression="gzip", compression_opts=4, shuffle=True)
                for k, v in layer.attrs.items():
                    ds.attrs[k] = _json_attr(v) if isinstance(v, (dict, list, tuple)) else v


def _decode_attr(v):
    if isinstance(v, bytes):
        v = v.decode()
    if isinstance(v, str) and v[:1] in "[{":
        try:
            return json.loads(v)
        except ValueError:
            return v
    if isinstance(v, np.generic):
        return v.item()
    return v


def read_attrs(path: str | os.PathLike) -> dict:
    """Root attributes of a cache, JSON values decoded; raises CacheError for anything else."""
    path = Path(path)
    if not path.exists():
        raise CacheError(f"{path} does not exist.")
    if not h5py.is_hdf5(path):
        raise CacheError(f"{path} is not an HDF5 file.")
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: _decode_attr(v) for k, v in f.attrs.items()}
    except OSError as e:
        raise CacheError(f"{path} cannot be read as HDF5: {e}") from e
    if attrs.get("format") != FORMAT:
        raise CacheError(f"{path} is an HDF5 file but not a cnncodes cache (no format='{FORMAT}').")
    if int(attrs.get("schema_version", 0)) > SCHEMA_VERSION:
        raise CacheError(f"{path} has cache schema version {attrs['schema_version']}, newer than "
                         f"this cnncodes reads ({SCHEMA_VERSION}): upgrade cnncodes.")
    return attrs


class Cache:
    """Read access to a cache file.

    Examples
    --------
    >>> with open_cache("cache/digits-efficientnet_lite0.h5") as c:  # doctest: +SKIP
    ...     X, y = c.codes("penultimate"), c.labels
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.attrs = read_attrs(self.path)
        self._f = h5py.File(self.path, "r")

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _read(self, name: str, rows=None) -> np.ndarray:
        """A dataset's values; a damaged file (a failing chunk filter, a cut file) becomes one
        CacheError that names the cache and says how to rebuild it."""
        try:
            ds = self._f[name]
            return ds[()] if rows is None else ds[rows]
        except (OSError, KeyError) as e:
            raise CacheError(f"{self.path} is damaged: /{name} cannot be read "
                             f"({str(e).split('(')[0].strip()}). "
                             f"Rebuild it: run the same `cnncodes extract` with --overwrite.") from None

    @property
    def layers(self) -> list[str]:
        return list(self.attrs["layers"])

    @property
    def classes(self) -> list[str]:
        return [s.decode() if isinstance(s, bytes) else s for s in self._read("classes")]

    @property
    def paths(self) -> list[str]:
        return [s.decode() for s in self._read("images/path")]

    @property
    def splits(self) -> np.ndarray:
        return np.array([s.decode() for s in self._read("images/split")], dtype=object)

    @property
    def labels(self) -> np.ndarray:
        return self._read("images/label")

    @property
    def status(self) -> np.ndarray:
        return self._read("images/status")

    @property
    def errors(self) -> list[str]:
        return [s.decode() for s in self._read("images/error")]

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete"))

    @property
    def content(self) -> dict[str, np.ndarray] | None:
        """Per row: ``sha256``, ``size`` and ``mtime_ns`` of the bytes its codes were made from
        (None for a schema-1 cache)."""
        return _read_content(self._f)

    def layer_attrs(self, layer: str) -> dict:
        self._check_layer(layer)
        return {k: _decode_attr(v) for k, v in self._f["codes"][layer].attrs.items()}

    def _check_layer(self, layer: str) -> None:
        if layer not in self._f["codes"]:
            raise CacheError(f"layer '{layer}' is not in {self.path}; it holds: "
                             f"{', '.join(self._f['codes'].keys())}.")

    def codes(self, layer: str, rows=None) -> np.ndarray:
        """The N x D codes of ``layer`` (all rows, or the given row indices)."""
        self._check_layer(layer)
        return self._read(f"codes/{layer}", None if rows is None else np.sort(np.asarray(rows)))

    def summary(self) -> dict:
        st = self.status
        splits = self.splits
        unmerged, damaged = Journal(self.path).row_count()
        return {
            "path": str(self.path), "format": self.attrs["format"],
            "schema_version": int(self.attrs["schema_version"]), "model": self.attrs.get("model"),
            "weights": self.attrs.get("weights"), "preprocessing": self.attrs.get("preprocessing"),
            "pooling": self.attrs.get("pooling"), "dtype": self.attrs.get("dtype"),
            "precision": self.attrs.get("precision"),
            "layers": {name: {"dim": int(self._f["codes"][name].shape[1]),
                              **{k: v for k, v in self.layer_attrs(name).items() if k != "dim"}}
                       for name in self.layers},
            "images": int(len(st)), "done": int((st == DONE).sum()), "failed": int((st == FAILED).sum()),
            "pending": int((st == PENDING).sum()),
            "unmerged_rows": unmerged, "damaged_shards": damaged,
            "splits": {s or "(none)": int((splits == s).sum()) for s in sorted(set(splits.tolist()))},
            "classes": len(self.classes), "complete": self.complete,
            "created": self.attrs.get("created"), "image_fingerprint": self.attrs.get("image_fingerprint"),
            "versions": self.attrs.get("versions"), "data_root": self.attrs.get("data_root"),
            "size_bytes": self.path.stat().st_size,
        }


def _read_content(f: h5py.File) -> dict[str, np.ndarray] | None:
    g = f["images"]
    if not all(k in g for k in CONTENT):
        return None
    return {"sha256": np.array([s.decode() for s in g["sha256"][()]], dtype=object),
            "size": g["size"][()], "mtime_ns": g["mtime_ns"][()]}


def changed_rows(content: dict[str, np.ndarray] | None, status: np.ndarray, sizes, mtimes) -> np.ndarray:
    """Finished rows whose file's size or mtime now (``sizes``, ``mtimes``) is not what the
    cache recorded: candidates for a content check. Empty for schema-1 caches."""
    if content is None:
        return np.zeros(0, dtype=np.int64)
    differ = (content["size"] != np.asarray(sizes, dtype=np.int64)) | \
             (content["mtime_ns"] != np.asarray(mtimes, dtype=np.int64))
    return np.flatnonzero(differ & (status != PENDING))


def open_cache(path: str | os.PathLike) -> Cache:
    """Open a cache for reading (a context manager)."""
    return Cache(path)


# What reading a damaged or hand-made shard raises (numpy's npz reader is a zip reader).
_SHARD_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)


class Journal:
    """The shards of a writing session, in ``<cache>.journal/``."""

    def __init__(self, cache_path: str | os.PathLike):
        self.cache_path = Path(cache_path)
        self.dir = self.cache_path.with_name(self.cache_path.name + ".journal")

    def shards(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return sorted(self.dir.glob("rows-*.npz"))

    def row_count(self) -> tuple[int, int]:
        """``(rows, damaged)``: rows held by readable shards, and how many shards are damaged
        (a writing session drops those and extracts their rows again)."""
        n = damaged = 0
        for s in self.shards():
            try:
                with np.load(s, allow_pickle=False) as z:
                    n += len(z["rows"])
            except _SHARD_ERRORS:
                damaged += 1
        return n, damaged

    def write(self, rows: np.ndarray, status: np.ndarray, errors: list[str], codes: dict[str, np.ndarray],
              content: dict[str, np.ndarray] | None = None) -> Path:
        """One batch, atomically (see :func:`~.files.atomic_write`)."""
        name = f"rows-{int(rows[0]):012d}-{int(rows[-1]):012d}.npz"
        arrays = {"rows": rows.astype(np.int64), "status": status.astype(np.uint8),
                  "errors": np.array(errors, dtype=str) if errors else np.zeros(len(rows), dtype="<U1")}
        arrays.update({f"codes/{k}": v for k, v in codes.items()})
        if content is not None:
            arrays.update({"content/sha256": np.asarray(content["sha256"], dtype="<U64"),
                           "content/size": np.asarray(content["size"], dtype=np.int64),
                           "content/mtime_ns": np.asarray(content["mtime_ns"], dtype=np.int64)})
        with atomic_write(self.dir / name) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)
        return self.dir / name

    def remove(self) -> None:
        """Delete the journal folder and everything in it (the caller holds the lock)."""
        for leftover in self.dir.iterdir():
            leftover.unlink()
        self.dir.rmdir()

    @staticmethod
    def read(shard: Path) -> tuple[np.ndarray, np.ndarray, list[str], dict[str, np.ndarray], dict | None]:
        """``(rows, status, errors, codes, content)`` of a shard (content None in older shards)."""
        with np.load(shard, allow_pickle=False) as z:
            codes = {k.split("/", 1)[1]: z[k] for k in z.files if k.startswith("codes/")}
            content = {k.split("/", 1)[1]: z[k] for k in z.files if k.startswith("content/")} or None
            return z["rows"], z["status"], [str(e) for e in z["errors"]], codes, content


def _lock(journal: Journal) -> int:
    """The exclusive writer's lock of ``journal``'s cache: a held ``flock``, as a descriptor."""
    journal.dir.mkdir(exist_ok=True)
    fd = os.open(journal.dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EAGAIN, errno.EACCES):
            raise CacheLockedError(
                f"{journal.cache_path} is being written by another cnncodes process; wait for it "
                f"to finish, or write to another --out.") from None
        raise
    return fd


def discard_cache(path: str | os.PathLike) -> bool:
    """Delete a cache with its journal and working copy, unless another process is writing it.

    Returns whether there was anything to delete.
    """
    path = Path(path)
    journal = Journal(path)
    if not path.exists() and not journal.dir.exists():
        return False
    fd = _lock(journal)
    try:
        for p in (path, path.with_name(path.name + ".work")):
            p.unlink(missing_ok=True)
        journal.remove()
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    return True


class CacheWriter:
    """An exclusive writing session on an existing cache (see the module docstring).

    Use as a context manager; ``add`` each batch, then ``commit``. Leaving the context without
    commit keeps the shards, so the next session resumes from them.
    """

    def __init__(self, path: str | os.PathLike, create=None):
        self.path = Path(path)
        self.create = create  # called under the lock to (re)create the file, journal reset
        self.journal = Journal(self.path)
        self.work = self.path.with_name(self.path.name + ".work")
        self._lock_fd = None
        self._f = None
        self._ds: dict[str, h5py.Dataset] = {}

    def __enter__(self):
        fd = self._lock_fd = _lock(self.journal)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        for stale in self.journal.dir.glob(".*.tmp-*"):  # a shard cut off before its rename
            stale.unlink()
        if self.create is not None:
            for shard in self.journal.shards():
                shard.unlink()
            self.create()
        shutil.copyfile(self.path, self.work)  # a working copy left by a killed session is stale
        self._f = h5py.File(self.work, "r+")
        self._status = self._f["images/status"][()]
        for shard in self.journal.shards():  # replay what a killed session finished
            try:
                batch = Journal.read(shard)
                self._check_shard(*batch)
            except _SHARD_ERRORS as e:
                # Shards are renamed into place whole, so only damage or a hand edit gets here.
                # Its rows stay pending and are extracted again.
                log.warning("ignoring unreadable journal shard %s (%s); its images will be redone", shard, e)
                shard.unlink()
                continue
            self._apply(*batch)
        return self

    def __exit__(self, *exc):
        self.close()

    def _check_shard(self, rows, status, errors, codes, content) -> None:
        """A shard must fit this cache: rows in range and sorted, one entry per row in every
        array, codes of this cache's layers and widths. Raises ValueError otherwise."""
        n = len(self._status)
        if rows.ndim != 1 or not len(rows) or rows.min() < 0 or rows.max() >= n or (np.diff(rows) <= 0).any():
            raise ValueError(f"rows outside 0..{n - 1} or unsorted")
        if len(status) != len(rows) or len(errors) != len(rows) or \
                not set(np.unique(status)) <= {DONE, FAILED}:
            raise ValueError("status or errors do not match the rows")
        for name, block in codes.items():
            if name not in self._f["codes"] or block.shape != (len(rows), self._f["codes"][name].shape[1]):
                raise ValueError(f"codes of '{name}' do not fit the cache")
        if content is not None and any(len(content.get(k, ())) != len(rows) for k in CONTENT):
            raise ValueError("content columns do not match the rows")

    @property
    def status(self) -> np.ndarray:
        """Status per row, including rows added in this session."""
        return self._status

    def pending_rows(self) -> np.ndarray:
        return np.flatnonzero(self._status == PENDING)

    def add(self, rows, status, errors, codes: dict[str, np.ndarray],
            content: dict[str, np.ndarray] | None = None) -> None:
        """Record one batch: ``rows`` (sorted), a status per row, errors, codes per layer (one
        row per entry of ``rows``; failed rows hold zeros) and, per row, the ``sha256``,
        ``size`` and ``mtime_ns`` of the bytes the codes were made from."""
        rows = np.asarray(rows, dtype=np.int64)
        status = np.asarray(status, dtype=np.uint8)
        self.journal.write(rows, status, errors, codes, content)
        self._apply(rows, status, errors, codes, content)

    @property
    def content(self) -> dict[str, np.ndarray] | None:
        """The per-row content columns as this session has them (None for schema 1)."""
        return _read_content(self._f)

    def refresh(self, sizes, mtimes, digest) -> tuple[int, int]:
        """Bring finished rows whose file changed back to pending.

        A row whose recorded size or mtime differs from ``sizes[row]`` / ``mtimes[row]`` is
        hashed with ``digest(row)``: when the content differs, the row is pending again (its
        old codes are no longer taken for the file's); when only the mtime moved, the new
        stat is recorded so the next check is cheap again. Returns ``(stale, restated)``.
        """
        content = self.content
        rows = changed_rows(content, self._status, sizes, mtimes)
        if not len(rows):
            return 0, 0
        now = np.array([digest(int(r)) for r in rows], dtype=object)
        stale = rows[now != content["sha256"][rows]]
        same = rows[now == content["sha256"][rows]]
        g = self._f["images"]
        size, mtime = content["size"], content["mtime_ns"]  # whole columns: one write each
        size[same], mtime[same] = np.asarray(sizes)[same], np.asarray(mtimes)[same]
        size[stale] = mtime[stale] = -1
        g["size"][...], g["mtime_ns"][...] = size, mtime
        if len(stale):
            self._status[stale] = PENDING
            g["status"][...] = self._status
            for name, blank in (("error", ""), ("sha256", "")):
                column = self._read_strings(g[name])
                column[stale] = blank
                g[name][...] = column
        if len(stale):
            log.info("%d images changed since their codes were made; extracting them again", len(stale))
        return len(stale), len(same)

    @staticmethod
    def _read_strings(ds: h5py.Dataset) -> np.ndarray:
        return np.array([v.decode() if isinstance(v, bytes) else v for v in ds[()]], dtype=object)

    def _apply(self, rows, status, errors, codes, content=None) -> None:
        # Batches are contiguous row blocks, except where a resume skipped done rows: write
        # each contiguous run as one slice (h5py's fancy indexing is far slower).
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        for part in np.split(np.arange(len(rows)), breaks):
            if not len(part):
                continue
            lo, hi = int(rows[part[0]]), int(rows[part[-1]]) + 1
            for name, block in codes.items():
                self._dataset(f"codes/{name}")[lo:hi] = block[part]
            self._dataset("images/status")[lo:hi] = status[part]
            if any(errors[i] for i in part):
                self._dataset("images/error")[lo:hi] = np.array([errors[i] for i in part], dtype=object)
            if content is not None and "sha256" in self._f["images"]:
                self._dataset("images/sha256")[lo:hi] = np.asarray(content["sha256"])[part].astype(object)
                self._dataset("images/size")[lo:hi] = np.asarray(content["size"])[part]
                self._dataset("images/mtime_ns")[lo:hi] = np.asarray(content["mtime_ns"])[part]
        self._status[rows] = status

    def _dataset(self, name: str) -> h5py.Dataset:
        # Datasets stay open for the whole session: HDF5 keeps a dataset's chunk cache only
        # while it is open, and `f[name][...] = x` opens and closes it each time, which
        # inflates, patches and re-deflates a whole 512 KiB gzip chunk per batch and layer
        # (measured: 0.24 s of a 5.4 s run of 512 images and two layers, against 0.03 s).
        if name not in self._ds:
            self._ds[name] = self._f[name]
        return self._ds[name]

    def _discard_file(self) -> None:
        """Close a working copy that is thrown away (the session did not commit).

        HDF5 flushes a file's chunk caches when it closes, and on a full disk that flush fails,
        noisily and, at exit, fatally (h5py segfaulted). The copy's bytes are worthless now (the
        journal's shards, each whole or absent, are the durable record), so it is cut to zero
        length first: that frees its blocks for the flush, whose writes then go to a file that
        is deleted right after.
        """
        try:
            os.truncate(self.work, 0)
        except OSError:
            pass
        hook, sys.unraisablehook = sys.unraisablehook, lambda *_: None  # h5py's dealloc complaints
        try:
            self._close_file()
        except (OSError, RuntimeError) as e:
            log.debug("the discarded working copy %s did not close cleanly: %s", self.work, e)
            self._f = None
        finally:
            sys.unraisablehook = hook

    def _close_file(self) -> None:
        self._ds.clear()  # HDF5 flushes each dataset's chunk cache as the file closes
        self._f.close()
        self._f = None

    def add_layers_from(self, source: str | os.PathLike) -> list[str]:
        """Copy the ``/codes`` datasets that this cache lacks from ``source``, a complete cache
        of the same images made by the same recipe (the caller checks the recipe).

        Both must agree on which rows failed; the new datasets keep the source's chunking,
        compression and attributes. Returns the names of the layers added.
        """
        with h5py.File(source, "r") as src:
            if not bool(src.attrs.get("complete")):
                raise CacheError(f"{source} is incomplete; finish it before adding its layers.")
            status = src["images/status"][()]
            if len(status) != len(self._status) or (status != self._status).any():
                raise IncompatibleCacheError(
                    f"{source} and {self.path} disagree on which images were extracted or failed.")
            theirs, ours = _read_content(src), self.content
            if theirs is not None and ours is not None:
                known = (ours["sha256"] != "") & (theirs["sha256"] != "")
                if (ours["sha256"][known] != theirs["sha256"][known]).any():
                    raise IncompatibleCacheError(
                        f"images changed while layers were added to {self.path}: rerun the same command "
                        f"(the changed images are extracted again).")
            names = [n for n in src["codes"] if n not in self._f["codes"]]
            for name in names:
                src.copy(src["codes"][name], self._f["codes"], name=name)
            layers = list(_decode_attr(self._f.attrs["layers"])) + names
            self._f.attrs["layers"] = _json_attr(layers)
        return names

    def commit(self) -> bool:
        """Finalise the working copy and rename it over the cache; returns ``complete``."""
        complete = bool((self._status != PENDING).all())
        self._f.attrs["complete"] = complete
        self._close_file()
        fsync_path(self.work)
        os.replace(self.work, self.path)
        fsync_path(self.path.parent)
        for shard in self.journal.shards():
            shard.unlink()
        return complete

    def close(self) -> None:
        if self._f is not None:
            self._discard_file()  # commit() closes the file it publishes: this one is not wanted
        if self.work.exists():
            self.work.unlink()
        if self._lock_fd is not None:
            if not self.journal.shards():
                self.journal.remove()
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

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
    /codes/<layer>  N x D float32|float16, chunked, gzip, resizable; attrs: module, hook
                    (output | input), kind (map | map-channels-last | tokens | vector),
                    prefix_tokens, patch_tokens, class_token (tokens), grid, pooling,
                    unpooled_shape, stride, dim (caches before 0.1's token models: kind
                    holds output | input, and there is no hook)

Root attributes: ``format``, ``schema_version``, ``model``, ``weights`` (JSON), ``weights_sha256``,
``preprocessing`` (JSON), ``pooling``, ``dtype``, ``precision``, ``layers`` (JSON list),
``versions`` (JSON), ``image_fingerprint``, ``n_images``, ``data_root``, ``created`` and
``complete`` (true only when every row is done or failed).

Writing (the journal, the working copy, atomic commits, per-row content checks) is
:mod:`.writer`'s and :mod:`.journal`'s; this module creates caches and reads them. Schema-1
caches (before the content columns) are checked by the image list and file sizes only.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from .decoding import canonical_decode
from .errors import CacheError
from .files import atomic_write
from .journal import CONTENT, Journal

log = logging.getLogger(__name__)

FORMAT = "cnncodes-cache"
SCHEMA_VERSION = 2
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


def json_attr(value) -> str:
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
                f.attrs[k] = json_attr(v) if isinstance(v, (dict, list, tuple)) else v
            f.attrs["format"] = FORMAT
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["layers"] = json_attr([l.name for l in layers])
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
                    ds.attrs[k] = json_attr(v) if isinstance(v, (dict, list, tuple)) else v


def decode_attr(v):
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
            attrs = {k: decode_attr(v) for k, v in f.attrs.items()}
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
        return read_content(self._f)

    def layer_attrs(self, layer: str) -> dict:
        self._check_layer(layer)
        return {k: decode_attr(v) for k, v in self._f["codes"][layer].attrs.items()}

    def dim(self, layer: str) -> int:
        """The width of ``layer``'s codes (one number per image)."""
        self._check_layer(layer)
        return int(np.prod(self._f["codes"][layer].shape[1:]))

    def _check_layer(self, layer: str) -> None:
        if layer not in self._f["codes"]:
            raise CacheError(f"layer '{layer}' is not in {self.path}; it holds: "
                             f"{', '.join(self._f['codes'].keys())}.")

    def codes(self, layer: str, rows=None, dtype=None, block_bytes: int = 64 << 20) -> np.ndarray:
        """The N x D codes of ``layer`` (all rows, or the given row indices, sorted), as ``dtype``
        (default: as stored).

        Read in blocks of about ``block_bytes`` straight into the result, so that converting a
        float16 cache to float32 holds no second full-size copy."""
        self._check_layer(layer)
        name = f"codes/{layer}"
        ds = self._f[name]
        rows = np.arange(len(ds)) if rows is None else np.sort(np.asarray(rows, dtype=np.int64))
        out = np.empty((len(rows), *ds.shape[1:]), dtype=np.dtype(dtype or ds.dtype))
        step = max(1, block_bytes // max(1, ds.dtype.itemsize * int(np.prod(ds.shape[1:]))))
        for lo in range(0, len(rows), step):
            r = rows[lo:lo + step]
            span = int(r[-1] - r[0]) + 1
            if span <= 4 * len(r):  # one contiguous read, then the rows wanted from it
                out[lo:lo + len(r)] = self._read(name, slice(int(r[0]), int(r[-1]) + 1))[r - r[0]]
            else:
                out[lo:lo + len(r)] = self._read(name, r)
        return out

    def verify(self, block_bytes: int = 64 << 20) -> int:
        """Read every dataset whole, in blocks of rows, so that a damaged chunk shows now, not in
        the middle of a fit; raises CacheError naming the dataset. Returns the bytes read."""
        total = 0
        names = [f"images/{k}" for k in self._f["images"]] + ["classes"]
        names += [f"codes/{n}" for n in self._f["codes"]]
        for name in names:
            ds = self._f[name]
            step = max(1, block_bytes // max(1, ds.dtype.itemsize * int(np.prod(ds.shape[1:]))))
            for lo in range(0, max(1, len(ds)), step):
                total += self._read(name, slice(lo, lo + step)).nbytes
        return total

    def summary(self) -> dict:
        st = self.status
        splits = self.splits
        unmerged, damaged = Journal(self.path).row_count()
        return {
            "path": str(self.path), "format": self.attrs["format"],
            "schema_version": int(self.attrs["schema_version"]), "model": self.attrs.get("model"),
            "weights": self.attrs.get("weights"), "preprocessing": self.attrs.get("preprocessing"),
            "pooling": self.attrs.get("pooling"), "dtype": self.attrs.get("dtype"),
            "precision": self.attrs.get("precision"), "runtime": self.attrs.get("runtime") or "torch",
            "decode": canonical_decode(self.attrs.get("decode")),
            "layers": {name: {"dim": self.dim(name),
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


def read_content(f: h5py.File) -> dict[str, np.ndarray] | None:
    """The content columns of an open cache file (None for schema 1); damage is a CacheError."""
    g = f["images"]
    if not all(k in g for k in CONTENT):
        return None
    try:
        return {"sha256": np.array([s.decode() for s in g["sha256"][()]], dtype=object),
                "size": g["size"][()], "mtime_ns": g["mtime_ns"][()]}
    except OSError as e:
        raise CacheError(f"{f.filename} is damaged: /images cannot be read ({str(e).split('(')[0].strip()}). "
                         f"Rebuild it: run the same `cnncodes extract` with --overwrite.") from None


def content_digest(content: dict[str, np.ndarray] | None) -> str | None:
    """sha256 over every row's content hash: changes whenever a row's codes are made from other
    bytes (records built on a cache's codes key on it). None for schema-1 caches."""
    if content is None:
        return None
    return hashlib.sha256("\n".join(content["sha256"].tolist()).encode()).hexdigest()


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

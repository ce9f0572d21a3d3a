"""Writing a cache: an exclusive session that never leaves a half-written file at the cache path.

HDF5 files are not safe against a process killed mid-write, so the file at the cache path is
only ever replaced atomically. A :class:`CacheWriter` session holds the journal's lock, appends
each finished batch to the journal (the durable record) and also writes it into a working copy
of the cache; ``commit()`` finalises the working copy and renames it over the cache. After a
``kill -9`` the working copy is discarded and the next session replays the shards.

Content. The codes of a row belong to the bytes they were made from. Each writing session
compares every finished row's recorded size and mtime with the file's now (cheap), hashes only
the files where they differ, and puts a row whose content really changed back to pending, so
that one file is extracted again and nothing stale is kept (:meth:`CacheWriter.refresh`).
"""
from __future__ import annotations

import fcntl
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import h5py
import numpy as np

from .cache import DONE, FAILED, PENDING, changed_rows, decode_attr, json_attr, read_content
from .errors import CacheError, IncompatibleCacheError
from .files import publish
from .journal import _SHARD_ERRORS, CONTENT, Journal, lock_journal

log = logging.getLogger(__name__)


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
        # journal shards whose rows are in the working copy, by name -> (inode, mtime): a shard
        # renamed over one of the same name (a block computed again) is another shard
        self._applied: dict[str, tuple[int, int]] = {}
        self.keep_journal = False  # other ranks may still write into it: never remove it on close

    def __enter__(self):
        fd = self._lock_fd = lock_journal(self.journal)
        try:
            return self._open(fd)
        except BaseException:  # a failed setup (a full disk while copying...) keeps no lock
            self.close()
            raise

    def _open(self, fd: int):
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
        self.replayed = len(self.absorb())  # replay what a killed session finished
        return self

    @staticmethod
    def _identity(shard: Path) -> tuple[int, int] | None:
        try:
            st = os.stat(shard)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns

    def absorb(self, expected=(), wait: float = 0.0) -> list[tuple[np.ndarray, np.ndarray, list[str]]]:
        """Apply the journal's shards that this session has not applied yet: a killed session's,
        or those that the other ranks of a torchrun extraction write beside this one's (see
        :class:`ShardWriter`). Returns ``(rows, status, errors)`` of each.

        ``expected`` names shards known to exist (the other ranks said so): each is looked up
        by name, for up to ``wait`` seconds, because a network file system's cached listing of
        the folder may not show another machine's files yet."""
        out = []
        deadline = time.monotonic() + wait
        named = [self.journal.dir / n for n in expected]
        for shard in named:
            while not shard.exists() and time.monotonic() < deadline:
                time.sleep(0.2)
        for shard in sorted(set(self.journal.shards()) | {p for p in named if p.exists()}):
            ident = self._identity(shard)
            if ident is None or self._applied.get(shard.name) == ident:
                continue
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
            self._applied[shard.name] = ident
            out.append(batch[:3])
        return out

    def __exit__(self, *exc):
        self.close()

    def _check_shard(self, rows, status, errors, codes, content) -> None:
        """A shard must fit this cache: rows in range and sorted, one entry per row in every
        array, codes of this cache's layers and widths. Raises ValueError otherwise."""
        n = len(self._status)
        if rows.dtype.kind not in "iu" or status.dtype.kind not in "iu":
            raise ValueError("rows and status must be integers")
        if rows.ndim != 1 or not len(rows) or rows.min() < 0 or rows.max() >= n or (np.diff(rows) <= 0).any():
            raise ValueError(f"rows outside 0..{n - 1} or unsorted")
        if set(codes) != set(self._f["codes"]):  # a layer left out would keep zeros as codes
            raise ValueError(f"codes of {sorted(codes)}, the cache holds {sorted(self._f['codes'])}")
        if len(status) != len(rows) or len(errors) != len(rows) or \
                not set(np.unique(status)) <= {DONE, FAILED}:
            raise ValueError("status or errors do not match the rows")
        for name, block in codes.items():
            if block.dtype.kind != "f" or block.shape != (len(rows), self._f["codes"][name].shape[1]):
                raise ValueError(f"codes of '{name}' do not fit the cache")
        if content is not None and (any(len(content.get(k, ())) != len(rows) for k in CONTENT)
                                    or content["sha256"].dtype.kind != "U"):
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
        shard = self.journal.write(rows, status, errors, codes, content)
        self._apply(rows, status, errors, codes, content)
        self._applied[shard.name] = self._identity(shard)

    @property
    def content(self) -> dict[str, np.ndarray] | None:
        """The per-row content columns as this session has them (None for schema 1)."""
        return read_content(self._f)

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
            theirs, ours = read_content(src), self.content
            if theirs is not None and ours is not None:
                known = (ours["sha256"] != "") & (theirs["sha256"] != "")
                if (ours["sha256"][known] != theirs["sha256"][known]).any():
                    raise IncompatibleCacheError(
                        f"images changed while layers were added to {self.path}: rerun the same command "
                        f"(the changed images are extracted again).")
            names = [n for n in src["codes"] if n not in self._f["codes"]]
            for name in names:
                src.copy(src["codes"][name], self._f["codes"], name=name)
            layers = list(decode_attr(self._f.attrs["layers"])) + names
            self._f.attrs["layers"] = json_attr(layers)
        return names

    def commit(self) -> bool:
        """Finalise the working copy and rename it over the cache; returns ``complete``.

        Shards that appear in the journal meanwhile (another rank still writing) are applied
        first; one renamed into place after that stays in the journal for the next session."""
        self.absorb()
        complete = bool((self._status != PENDING).all())
        self._f.attrs["complete"] = complete
        self._close_file()
        publish(self.work, self.path)
        for shard in self.journal.shards():
            if self._applied.get(shard.name) == self._identity(shard):
                shard.unlink(missing_ok=True)
        self._applied.clear()
        return complete

    def close(self) -> None:
        if self._lock_fd is None:  # never opened (or closed): nothing here is this session's
            return
        if self._f is not None:
            self._discard_file()  # commit() closes the file it publishes: this one is not wanted
        if self.work.exists():
            self.work.unlink()
        if self._lock_fd is not None:
            if not self.journal.shards() and not self.keep_journal:
                self.journal.remove()
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None


class ShardWriter:
    """What a torchrun rank other than 0 writes: journal shards only, beside those of rank 0's
    :class:`CacheWriter` session, which holds the lock, applies them and commits the cache.
    Each shard is renamed into place whole, so a rank killed at any moment loses at most the
    batch it was computing. ``written`` names them (rank 0 looks each up by name)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.journal = Journal(self.path)
        self.work = self.journal.dir  # what a failed write names
        self.written: list[str] = []

    def add(self, rows, status, errors, codes: dict[str, np.ndarray],
            content: dict[str, np.ndarray] | None = None) -> None:
        shard = self.journal.write(np.asarray(rows, dtype=np.int64), np.asarray(status, dtype=np.uint8),
                                   errors, codes, content)
        self.written.append(shard.name)

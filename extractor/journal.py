"""The journal of a cache's writing session: finished batches as shards, and the writer's lock.

A writing session holds an exclusive ``flock`` in ``<cache>.journal/lock`` and appends each
finished batch there as an ``.npz`` shard, written through
:func:`~cnncodes.extractor.files.atomic_write` (whole or absent). The shards are the durable
record of a session: after a ``kill -9`` the next session replays them
(:class:`~cnncodes.extractor.writer.CacheWriter`).
"""
from __future__ import annotations

import errno
import fcntl
import os
import zipfile
from pathlib import Path

import numpy as np

from .errors import CacheLockedError
from .files import atomic_write

CONTENT = ("sha256", "size", "mtime_ns")  # per-row columns of what the codes were made from

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
        """Delete the journal folder: its lock, shards and cut-off temporary files (the caller
        holds the lock). A folder that is not empty after that (a file appeared meanwhile) is
        left for the next session."""
        for leftover in list(self.dir.iterdir()):
            if leftover.name == "lock" or leftover.name.startswith(("rows-", ".rows-")):
                leftover.unlink(missing_ok=True)
        try:
            self.dir.rmdir()
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                raise

    @staticmethod
    def read(shard: Path) -> tuple[np.ndarray, np.ndarray, list[str], dict[str, np.ndarray], dict | None]:
        """``(rows, status, errors, codes, content)`` of a shard (content None in older shards)."""
        with np.load(shard, allow_pickle=False) as z:
            codes = {k.split("/", 1)[1]: z[k] for k in z.files if k.startswith("codes/")}
            content = {k.split("/", 1)[1]: z[k] for k in z.files if k.startswith("content/")} or None
            return z["rows"], z["status"], [str(e) for e in z["errors"]], codes, content


def lock_journal(journal: Journal) -> int:
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
    fd = lock_journal(journal)
    try:
        for p in (path, path.with_name(path.name + ".work")):
            p.unlink(missing_ok=True)
        journal.remove()
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    return True

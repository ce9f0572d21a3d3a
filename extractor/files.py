"""Files that are never half-written, and names that are safe in a path. Standard library only.

Every file cnncodes publishes (caches, journal shards, models, checkpoints, records) goes
through :func:`atomic_write`: written to a temporary name beside the target, flushed to disk,
renamed over the target, and the folder flushed too (write, fsync, rename, fsync(dir)), so
neither a kill nor a power cut leaves a truncated file under the real name.
"""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
import threading
from pathlib import Path

from .errors import OutputError


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's (or a folder's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a folder; the rename is then the best there is
        if not os.path.isdir(path):
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; write the file there. On a normal exit it is
    fsynced and renamed over ``path`` (and the folder fsynced); on an exception it is deleted
    and ``path`` is left as it was.

    Examples
    --------
    >>> with atomic_write("result.json") as tmp:   # doctest: +SKIP
    ...     tmp.write_text("{}")
    """
    path = Path(path)
    # the thread too: threads of one process may write the same file (two copies of one photo)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        yield tmp
        publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def publish(finished: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename the ``finished`` file over ``path`` durably: fsync it, rename, fsync the folder.
    (For a file written in place beside its target, such as a cache's working copy.)"""
    path = Path(path)
    fsync_path(finished)
    os.replace(finished, path)
    fsync_path(path.parent)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """``path.write_text(text)`` through :func:`atomic_write`."""
    path = Path(path)
    with atomic_write(path) as tmp:
        tmp.write_text(text)
    return path


def slug(name: str) -> str:
    """``name`` made safe as one path component: anything but letters, digits, ``.``, ``_`` and
    ``-`` becomes ``-`` (``timm:convnext_tiny.fb_in1k`` -> ``timm-convnext_tiny.fb_in1k``)."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", str(name)).strip(".") or "-"


def dataset_name(data: str | os.PathLike) -> str:
    """The name of a data set in default output paths: its folder's name (a manifest's stem),
    resolved, so ``.`` is the folder it means; made safe with :func:`slug`."""
    if "{" in Path(data).name:  # a brace pattern of tar shards: its folder and its own name
        pattern = Path(data)
        name = re.sub(r"-*[{},]+-*", "-", pattern.name.removesuffix(".tar")).strip("-")
        return slug(f"{pattern.parent.resolve().name}-{name}")
    data = Path(data).resolve()
    return slug(data.stem if data.is_file() else data.name)


def check_writable(path: str | os.PathLike, *, folder: bool = False) -> Path:
    """Make sure ``path`` (a file to be written, or with ``folder`` a folder to write into) can
    be written, before any long work: its folder is created if missing and a scratch file is
    made and removed there. Raises :class:`~.errors.OutputError` naming the path otherwise."""
    path = Path(path)
    where = path if folder else (path.parent if str(path.parent) else Path("."))
    try:
        where.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=where):
            pass
    except OSError as e:
        raise OutputError(f"cannot write to {where}: {e.strerror or e}; choose another place.") from None
    return path

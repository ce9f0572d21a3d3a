"""Keyed JSON records of finished work (sweep fits, compare strategies) and atomic JSON writes.

A record holds the ``key`` it was made under and the ``RESULTS_VERSION`` of the code that made
it; a rerun reuses it only when both are the same, so changed settings, or a cnncodes whose
fits come out differently, redo the work instead of reading a stale answer.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

# Bump when a stored result (a sweep fit, a LogME score, a compare strategy) would come out
# differently from the same inputs: every record made before is then redone once.
RESULTS_VERSION = 2


def write_json(path: Path, obj, indent: int | None = None) -> None:
    """Write through a temporary file and a rename: a kill never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=indent, default=str) + "\n")
    os.replace(tmp, path)


def read_record(path: Path, key: dict) -> dict | None:
    """The record at ``path`` when it was made under ``key`` by this ``RESULTS_VERSION``; None
    when missing, unreadable, or made under another key or version."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if record.get("results_version") != RESULTS_VERSION:
        return None
    return record if record.get("key") == json.loads(json.dumps(key, default=str)) else None


def write_record(path: Path, key: dict, indent: int | None = None, **fields) -> dict:
    """Store finished work under ``key`` (atomically) and return the record."""
    record = {"key": key, "results_version": RESULTS_VERSION, **fields}
    write_json(path, record, indent=indent)
    return record

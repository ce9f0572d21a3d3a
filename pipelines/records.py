"""Keyed JSON records of finished work (sweep fits, compare strategies) and atomic JSON writes.

A record holds the ``key`` it was made under and the ``RESULTS_VERSION`` of the code that made
it; a rerun reuses it only when both are the same, so changed settings, or a cnncodes whose
fits come out differently, redo the work instead of reading a stale answer.
"""
from __future__ import annotations

import json
from pathlib import Path

from cnncodes.extractor.files import write_text_atomic

# Bump when a stored result (a sweep fit, a LogME score, a compare strategy) would come out
# differently from the same inputs: every record made before is then redone once.
RESULTS_VERSION = 2


def write_json(path: Path, obj, indent: int | None = None) -> None:
    """Write JSON atomically (see :func:`~cnncodes.extractor.files.atomic_write`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(obj, indent=indent, default=str) + "\n")


def read_record(path: Path, key: dict, upgrade=None) -> dict | None:
    """The record at ``path`` when it was made under ``key`` by this ``RESULTS_VERSION``; None
    when missing, unreadable, or made under another key or version. ``upgrade`` maps a stored
    key to what it means today (a setting added since, absent from it, had its former value)."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if record.get("results_version") != RESULTS_VERSION or not isinstance(record.get("key"), dict):
        return None
    stored = upgrade(record["key"]) if upgrade else record["key"]
    return record if stored == json.loads(json.dumps(key, default=str)) else None


def write_record(path: Path, key: dict, indent: int | None = None, **fields) -> dict:
    """Store finished work under ``key`` (atomically) and return the record."""
    record = {"key": key, "results_version": RESULTS_VERSION, **fields}
    write_json(path, record, indent=indent)
    return record

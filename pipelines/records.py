"""Keyed JSON records of finished work (sweep fits, compare strategies) and atomic JSON writes.

A record holds the ``key`` it was made under; a rerun reuses it only when the key is the same,
so changed settings redo the work instead of reading a stale answer.
"""
from __future__ import annotations

import json
import os
from pathlib import Path


def write_json(path: Path, obj, indent: int | None = None) -> None:
    """Write through a temporary file and a rename: a kill never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=indent, default=str) + "\n")
    os.replace(tmp, path)


def read_record(path: Path, key: dict) -> dict | None:
    """The record at ``path`` when it was made under ``key``; None when missing, unreadable or
    made under another key."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return record if record.get("key") == json.loads(json.dumps(key, default=str)) else None

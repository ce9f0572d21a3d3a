"""Fine-tuning checkpoints: written atomically, read with ``weights_only=True``, and checked
against the recipe of the run that wants to resume from them.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (no pickled
objects), so ``torch.load(..., weights_only=True)`` reads it and ``extract --weights`` accepts
it: its ``"model"`` entry is the network's state dict.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch

from cnncodes.pipelines.finetune.freezing import FinetuneError


def rng_state() -> dict:
    """Every random generator a training step draws from (torch CPU and CUDA, numpy, Python)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    py_version, py_state, py_gauss = random.getstate()
    state = {"torch": torch.get_rng_state(), "python": list(py_state),
             "python_version": py_version, "python_gauss": py_gauss,
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(state: dict, path: Path) -> None:
    """Write to a temporary file and rename: a kill leaves the old checkpoint, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FinetuneError(f"{path} is not a readable checkpoint ({e}); start again with --overwrite.") from e
    if not isinstance(ckpt, dict) or "recipe" not in ckpt or "model" not in ckpt:
        raise FinetuneError(f"{path} is not a cnncodes fine-tuning checkpoint.")
    return ckpt


def recipe_differences(saved: dict, now: dict) -> list[str]:
    """Human-readable differences between two recipes, e.g. ``lr: 0.001 in the run, 0.01 now``."""
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str):
            continue
        if key == "classes":
            gone, new = sorted(set(a or []) - set(b or [])), sorted(set(b or []) - set(a or []))
            what = "; ".join(filter(None, [f"gone: {', '.join(gone[:5])}" if gone else "",
                                            f"new: {', '.join(new[:5])}" if new else ""])) or "same names, new order"
            out.append(f"classes differ ({what})")
        elif key == "data_fingerprint":
            out.append("the image list differs (images added, removed, moved or changed)")
        else:
            out.append(f"{key}: {_short(a)} in the run, {_short(b)} now")
    return out


def _short(v) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= 60 else s[:57] + "..."

"""Fine-tuning checkpoints: written atomically and read with ``weights_only=True``; the run that
wants to resume from one compares its recipe with
:func:`~cnncodes.extractor.recipe.describe_differences`.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (no pickled
objects), so ``torch.load(..., weights_only=True)`` reads it and ``extract --weights`` accepts
it: its ``"model"`` entry is the network's state dict.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cnncodes.extractor.files import atomic_write
from cnncodes.extractor.recipe import describe_differences

from cnncodes.pipelines.finetune.config import CHANGED_DEFAULTS, FORMER_DEFAULTS
from cnncodes.pipelines.finetune.freezing import FinetuneError

log = logging.getLogger(__name__)
# Everything a run writes into its folder; a new run removes them first.
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "result.json", "curves.png", "confusion.png")


@dataclass
class Progress:
    """Where a run stands between epochs: what a checkpoint saves and a resume restores."""

    history: list = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"accuracy": -1.0, "epoch": None})
    stage_i: int = 0   # the stage to run next
    stage_ep: int = 0  # epochs of it already done
    ckpt: dict | None = None  # resumed from; kept until its stage has its optimiser state back

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> Progress:
        return cls(history=ckpt["history"], best=ckpt["best"], stage_i=ckpt["next_stage"],
                   stage_ep=ckpt["next_stage_epoch"], ckpt=ckpt)


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
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(state: dict, path: Path) -> None:
    """Write through :func:`~cnncodes.extractor.files.atomic_write`: a kill (or a power cut)
    leaves the old checkpoint, never half of one."""
    with atomic_write(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FinetuneError(f"{path} is not a readable checkpoint ({e}); "
                            f"start again with --overwrite.") from e
    if not isinstance(ckpt, dict) or "recipe" not in ckpt or "model" not in ckpt:
        raise FinetuneError(f"{path} is not a cnncodes fine-tuning checkpoint.")
    return ckpt


def remove_stale_temporaries(out: Path) -> None:
    """Delete what a kill during a save left: :func:`~cnncodes.extractor.files.atomic_write`'s
    temporary files, which nothing reads."""
    if out.is_dir():
        for tmp in out.glob(".*.pt.tmp-*"):
            tmp.unlink(missing_ok=True)


def checkpoint_to_resume(out: Path, recipe: dict, *, resume: bool, overwrite: bool) -> dict | None:
    """The checkpoint in ``out`` to continue from, or None when the run starts afresh.

    With ``resume``, a ``last.pt`` made by the same ``recipe`` is continued, and so is one whose
    recipe differs only by more epochs of its last stage (the run is *extended*: the checkpoint
    comes back with ``extended`` set); one made by another is an error unless ``overwrite``
    (then the run starts again). Without ``resume``, an existing run is an error unless
    ``overwrite``.
    """
    last = out / "last.pt"
    if last.exists() and resume:
        try:
            ckpt = load_checkpoint(last)
        except FinetuneError:
            if not overwrite:
                raise
            log.info("%s cannot be read: starting again (--overwrite)", last)
            return None
        made = {**FORMER_DEFAULTS, **ckpt["recipe"]}  # as runs made before those settings worked
        diffs = describe_differences(made, recipe, where=("in the run", "now"))
        if not diffs:
            return ckpt
        if extends(made, recipe):
            log.info("extending %s: its last stage runs %s epochs now", out, recipe["stages"][-1]["epochs"])
            return {**ckpt, "extended": True}
        if not overwrite:
            older = [k for k in FORMER_DEFAULTS if k not in ckpt["recipe"] and made[k] != recipe.get(k)]
            flags = [f"--{k.replace('_', '-')}" for k in older]
            hint = (f" It was made before {' and '.join(flags)} existed: resume it with "
                    + " ".join(f"{f} {made[k]}" for f, k in zip(flags, older)) + "." if older else "")
            former = [k for k, v in CHANGED_DEFAULTS.items()
                      if made.get(k) == v != recipe.get(k) and k not in older]
            if former:
                hint += (" It was made with cnncodes' former defaults: resume it with "
                         + " ".join(f"--{k.replace('_', '-')} {made[k]:g}" if isinstance(made[k], float)
                                    else f"--{k.replace('_', '-')} {made[k]}" for k in former) + ".")
            raise FinetuneError(f"cannot resume {out}: it was made by a different recipe: "
                                f"{'; '.join(diffs)}.{hint} Use another --out, or --overwrite to start "
                                f"again.")
        log.info("%s was made by another recipe (%s): starting again", out, "; ".join(diffs))
    elif last.exists() and not overwrite:
        raise FinetuneError(f"{out} already holds a run; pass --resume to continue it or "
                            f"--overwrite to start again.")
    elif not overwrite and (present := _contents(out)):
        # Not this run's last.pt (deleted to save space, or never there): best.pt, result.json
        # or a user's own files would be replaced by a run nobody asked to replace.
        raise FinetuneError(f"{out} is not empty ({', '.join(present[:4])}"
                            f"{', ...' if len(present) > 4 else ''}) "
                            f"and holds no run to resume: choose another --out, or pass --overwrite to "
                            f"replace the run files in it.")
    elif resume:
        log.info("nothing to resume in %s: starting a new run", out)
    return None


def extends(made: dict, recipe: dict) -> bool:
    """Whether ``recipe`` is ``made`` with more epochs of its last stage and nothing else changed
    (``stages``: the resolved list of ``{name, epochs, module}``; the ``stages`` setting's text
    is resolved into it, so only the list is compared)."""
    old, new = made.get("stages"), recipe.get("stages")
    if not (isinstance(old, list) and isinstance(new, list) and old and len(old) == len(new)):
        return False
    others = [k for k in set(made) | set(recipe) if k != "stages"]
    if describe_differences(made, recipe, keys=others):
        return False
    *head_old, last_old = old
    *head_new, last_new = new
    return head_old == head_new and {k: v for k, v in last_old.items() if k != "epochs"} == \
        {k: v for k, v in last_new.items() if k != "epochs"} and last_new["epochs"] > last_old["epochs"]


def _contents(out: Path) -> list[str]:
    """What a folder holds (hidden files aside), sorted; empty when it does not exist."""
    return sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) if out.is_dir() else []


def clear_run(out: Path) -> None:
    """Make ``out`` ready for a new run: created, and without a former run's files."""
    out.mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)

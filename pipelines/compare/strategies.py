"""``cnncodes compare``: the transfer-learning strategies side by side on the same test images.

Four strategies, each resumable on its own (a finished one is read back, not redone):

- ``probe``: CNN codes of one layer + a cross-validated linear SVM (the layer from ``layer``,
  or the best layer of an earlier sweep report, else ``penultimate``);
- ``top``: fine-tune the top stage (``head:H,stageK:E``, K the network's last stage);
- ``all``: fine-tune everything (``head:H,all:E``);
- ``scratch``: the same network from random initialisation (``all:H+E``).

Every strategy trains on the train split and is scored on the test split; the fine-tuning runs
hold out the same stratified share of train for validation (same seed).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from cnncodes.extractor.backbones.backbone import DEFAULT_MODEL
from cnncodes.extractor.errors import IncompatibleCacheError
from cnncodes.extractor.files import dataset_name, slug

from cnncodes.pipelines.compare.report import CompareResult, write_compare_report
from cnncodes.pipelines.finetune.config import FORMER_DEFAULTS
from cnncodes.pipelines.finetune.data import make_splits
from cnncodes.pipelines.finetune.freezing import FinetuneError
from cnncodes.pipelines.finetune.prepared import store_exclude
from cnncodes.pipelines.finetune.result import convergence
from cnncodes.pipelines.finetune.training import FinetuneConfig, finetune, recipe_settings
from cnncodes.pipelines.records import read_record, write_record

log = logging.getLogger(__name__)
STRATEGIES = ("probe", "top", "all", "scratch")
COLUMNS = ["strategy", "what", "test_accuracy", "best_val_accuracy", "train_seconds", "seconds_per_epoch",
           "epochs", "trainable_params", "run"]


def best_layer_from_sweep(report: str | Path, model: str) -> str:
    """The best layer of ``model`` in a sweep report folder (its ``sweep.json``)."""
    path = Path(report) / "sweep.json" if Path(report).is_dir() else Path(report)
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise FinetuneError(f"cannot read the sweep report {path}: {e}") from None
    rows = [r for r in summary.get("rows", [])
            if r.get("model") == model and r.get("cv_accuracy") is not None]
    if not rows:
        raise FinetuneError(f"the sweep report {path} has no fitted layer of {model}.")
    return max(rows, key=lambda r: r["cv_accuracy"])["layer"]


def _top_stage(model: str) -> str:
    from cnncodes.extractor import list_layers
    _, aliases = list_layers(model, "none")
    return max(a for a in aliases if a.startswith("stage"))


def _probe(data, out: Path, cfg: FinetuneConfig, layer: str, progress, runtime: str | None = None) -> dict:
    from cnncodes.extractor import extract

    from cnncodes.pipelines.probes.classifiers import fit_linear_probe
    from cnncodes.pipelines.probes.codes import load_codes
    t0 = time.perf_counter()
    try:
        ex = extract(data, out / "codes.h5", model=cfg.model, weights=cfg.weights, layers=[layer],
                     device=cfg.device, batch_size=cfg.batch_size, progress=progress, runtime=runtime,
                     decode=cfg.decode)
    except IncompatibleCacheError as e:
        raise e.with_remedy(f"Delete {e.path} (compare made it) or choose another --report.") from None
    codes = load_codes(ex.path, layer)
    # compare has no --folds: the probe's folds follow the data, 5 at most, as many as the
    # smallest class allows (at least 2)
    train_y = codes.y[codes.splits != "test"]
    smallest = int(np.bincount(train_y, minlength=len(codes.classes)).min()) if len(train_y) else 0
    if smallest < 2:
        raise FinetuneError(f"the linear probe needs at least 2 training images in every class; "
                            f"{data} has a class with {smallest}.")
    fit = fit_linear_probe(codes, layer, "svm", seed=cfg.seed, solver="auto", folds=min(5, smallest))
    dim = ex.layers[layer]
    return {"strategy": "probe", "what": f"linear SVM on {layer} codes (C={fit.C:g})",
            "test_accuracy": fit.test_accuracy, "best_val_accuracy": fit.cv_accuracy,
            "train_seconds": round(time.perf_counter() - t0, 2), "seconds_per_epoch": None, "epochs": None,
            "trainable_params": int(dim * len(fit.classes) + len(fit.classes)), "run": str(ex.path),
            "extract_seconds": round(ex.seconds, 2), "fit_seconds": round(fit.seconds, 2), "layer": layer}


def _finetune_row(strategy: str, cfg: FinetuneConfig, what: str, progress) -> dict:
    r = finetune(cfg, resume=True, overwrite=True, progress=progress is not False)
    return {"strategy": strategy, "what": what, "test_accuracy": r.test_accuracy,
            "best_val_accuracy": r.best_val_accuracy, "train_seconds": r.train_seconds,
            "seconds_per_epoch": r.seconds_per_epoch, "epochs": r.epochs_run,
            "trainable_params": max(s["trainable_params"] or 0 for s in r.stages), "run": cfg.out,
            "stages": r.stages}


def default_compare_dir(data, model: str) -> Path:
    """``reports/compare-<data>-<model>``, made safe as a path component."""
    return Path("reports") / f"compare-{dataset_name(data)}-{slug(model)}"


def _plans(base: FinetuneConfig, top: str, head_epochs: int, epochs: int) -> dict:
    """The fine-tuning strategies' configs (their ``out`` still unset) and descriptions."""
    return {
        "top": (replace(base, stages=f"head:{head_epochs},{top}:{epochs}"), f"fine-tune {top} and the head"),
        "all": (replace(base, stages=f"head:{head_epochs},all:{epochs}"), "fine-tune everything"),
        "scratch": (replace(base, stages=f"all:{head_epochs + epochs}", from_scratch=True),
                    "train from random initialisation"),
    }


def _strategy_row(strategy: str, data, out: Path, base: FinetuneConfig, fingerprint: str, layer: str,
                  plans: dict, progress, runtime: str | None = None) -> dict:
    """One strategy's row: read back when it was finished under the same settings, else run."""
    settings = {"data": str(data), "model": base.model, "weights": base.weights, "seed": base.seed,
                "fingerprint": fingerprint}
    if strategy == "probe":
        key = {**settings, "layer": layer, "decode": base.decode}
    else:
        cfg, what = plans[strategy]
        cfg = replace(cfg, out=str(out / "runs" / strategy))
        key = {**settings, "config": recipe_settings(cfg)}
    path = out / "strategies" / f"{strategy}.json"
    # a strategy finished before a fine-tuning setting existed was run with its former value
    record = read_record(path, key, upgrade=lambda k: {**k, "config": {**FORMER_DEFAULTS, **k["config"]}}
                         if isinstance(k.get("config"), dict) else k)
    if record is None:
        log.info("compare: %s", strategy)
        row = (_probe(data, out, base, layer, progress, runtime) if strategy == "probe"
               else _finetune_row(strategy, cfg, what, progress))
        record = write_record(path, key, indent=2, row=row)
    return record["row"]


def compare(data, model: str = DEFAULT_MODEL, *, weights: str = "DEFAULT", layer: str | None = None,
            sweep_report=None, out=None, head_epochs: int = 2, epochs: int = 3,
            strategies=STRATEGIES, config: FinetuneConfig | None = None,
            progress: bool | None = None, runtime: str | None = None) -> CompareResult:
    """Run the strategies and write the report.

    ``config`` carries the fine-tuning settings (learning rates, batch size, seed, ...); its
    ``stages`` and ``from_scratch`` are set per strategy.

    Returns
    -------
    CompareResult
        ``table`` has one row per strategy; ``conclusion``, ``settings``, ``seconds``,
        ``report`` (folder) and ``files`` describe it.
    """
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise FinetuneError(f"unknown strategy {', '.join(unknown)}; choose from {', '.join(STRATEGIES)}.")
    out = Path(out or default_compare_dir(data, model))
    base = replace(config or FinetuneConfig(str(data), ""), data=str(data), model=model, weights=weights)
    splits = make_splits(data, base.val_fraction, base.seed,
                         exclude=store_exclude(base) if base.prepare else None)
    if not len(splits.test):
        raise FinetuneError(f"compare needs a test split ({data}/test/<class>/...) so that every "
                            f"strategy is scored on the same images.")
    layer = layer or (best_layer_from_sweep(sweep_report, model) if sweep_report else "penultimate")
    top = _top_stage(model)
    plans = _plans(base, top, head_epochs, epochs)
    (out / "strategies").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    fingerprint = splits.table.fingerprint()
    df = pd.DataFrame([_strategy_row(s, data, out, base, fingerprint, layer, plans, progress, runtime)
                       for s in strategies])
    for c in COLUMNS:
        if c not in df:
            df[c] = None
    settings = {"data": str(data), "model": model, "weights": weights, "layer": layer, "top_stage": top,
                "head_epochs": head_epochs, "epochs": epochs, "seed": base.seed, "lr": base.lr,
                "head_lr_mult": base.head_lr_mult, "batch_size": base.batch_size, "images": splits.sizes(),
                "classes": len(splits.classes)}
    result = CompareResult(table=df, conclusion=conclude(df, splits.sizes(), len(splits.classes), top, layer,
                                                         epochs),
                           settings=settings, seconds=round(time.perf_counter() - t0, 1), report=str(out))
    result.files = {k: str(v) for k, v in write_compare_report(result).items()}
    return result


def conclude(df: pd.DataFrame, sizes: dict, n_classes: int, top: str, layer: str,
             epochs: int | None = None) -> list[str]:
    """Plain sentences: the winner, and what the measured gaps say (2 points = a real difference).

    Only what the figures show: a fine-tuning run whose last stage had not converged
    (:func:`~cnncodes.pipelines.finetune.result.convergence`) is never read as a verdict: where
    it lost, the reading says so and how to rerun; no sentence infers how similar the data is
    to ImageNet from which strategy won.
    """
    acc = {r["strategy"]: r["test_accuracy"] for _, r in df.iterrows() if r["test_accuracy"] is not None}
    if not acc:
        return []
    unfinished = {r["strategy"]: why for _, r in df.iterrows()
                  if isinstance(r.get("stages"), list) and (why := convergence(r["stages"]))}
    rerun = (f"rerun with --epochs {2 * epochs} (finished strategies are kept and extended, not started "
             f"again)" if epochs else "rerun with more --epochs")
    best = max(acc, key=acc.get)
    lines = [f"Best: {best} ({acc[best]:.4f} test accuracy) with {sizes['train'] + sizes['val']} training "
             f"images, {(sizes['train'] + sizes['val']) / n_classes:.0f} per class."]
    gap = 0.02
    tuned_runs = {k: acc[k] for k in ("top", "all") if k in acc}
    tuned = max(tuned_runs.values(), default=0)
    open_runs = [k for k in tuned_runs if k in unfinished]
    if "probe" in acc and tuned_runs and tuned <= acc["probe"] + gap:
        if open_runs:
            lines.append(f"Inconclusive: fine-tuning ({tuned:.4f} at best) has not beaten the linear probe "
                         f"({acc['probe']:.4f}) by more than 2 points, but it had not converged ("
                         + "; ".join(f"{k}: {unfinished[k]}" for k in open_runs) + f"); {rerun}.")
        else:
            lines.append(f"Fine-tuning ({tuned:.4f} at best, converged) does not beat the linear probe "
                         f"({acc['probe']:.4f}) by more than 2 points: the pretrained codes already fit this "
                         f"data; keep the network fixed"
                         + (", reading an earlier layer" if layer not in ("penultimate", top) else "") + ".")
    elif "probe" in acc and tuned_runs:
        lines.append(f"Fine-tuning beats the linear probe by {100 * (tuned - acc['probe']):.1f} points: "
                     f"moving the weights pays on this data"
                     + (" (and it had not converged: more epochs may add more)." if open_runs else "."))
    if "top" in acc and "all" in acc:
        if open_runs:
            lines.append(f"Tuning {top} against tuning everything is not read: "
                         + " and ".join(open_runs) + " had not converged.")
        elif acc["all"] > acc["top"] + gap:
            lines.append(f"Unfreezing everything beats tuning only {top} by "
                         f"{100 * (acc['all'] - acc['top']):.1f} points: the early layers had to change for "
                         f"this data.")
        else:
            lines.append(f"Tuning only {top} ({acc['top']:.4f}) is at least as good as tuning everything "
                         f"({acc['all']:.4f}): ImageNet's early layers serve this data as they are.")
    if "scratch" in acc and len(acc) > 1:
        pre = max(v for k, v in acc.items() if k != "scratch")
        behind = pre - acc["scratch"]
        head = (f"Training from scratch reaches {acc['scratch']:.4f}, {100 * behind:.1f} points below the "
                f"best pretrained strategy: ")
        if behind <= gap:
            lines.append(head + "this data set is large enough to learn without pretraining.")
        elif "scratch" in unfinished:
            lines.append(head + f"but it had not converged ({unfinished['scratch']}), so this shows that "
                         f"pretraining learns faster, not that the data needs it.")
        else:
            lines.append(head + "pretraining is what makes this data set learnable.")
    return lines

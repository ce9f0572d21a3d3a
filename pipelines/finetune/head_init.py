"""Probe, then fine-tune (LP-FT): the new head starts as the linear probe of the penultimate codes.

A random head pushes large, random gradients through the pretrained layers at the first
unfrozen step and distorts the features the probe would have used (Kumar et al., "Fine-Tuning
can Distort Pretrained Features and Underperform Out-of-Distribution", ICLR 2022: about +1 point
in distribution and +10 out of distribution over plain fine-tuning). So, before the first
epoch, the training split's penultimate codes are computed once (the eval transform, no
augmentation; the run's decode path) and a cross-validated softmax probe is fitted on them by
the same solver as ``fit-softmax``; its weights, mapped through its standardisation, become the
head's. This is also why the two halves of the toolkit meet here: a saved softmax probe *is* a
head.

The probe is then calibrated on the validation images by one temperature (Guo et al. 2017): C is
chosen for accuracy, and the most accurate C is often a weakly regularised one whose logits are
huge (C = 100 on the digits: a mean training loss of 9.9 on augmented crops). Such a head sends
gradients ``W^T (p - y)`` scaled by its weight norm into the first unfrozen layers: measured on
the digits, fine-tuning everything from the uncalibrated head went from 0.81 to 0.10
validation accuracy in one epoch. Dividing the head by the temperature (0.5 to 100) that
minimises the validation images' cross-entropy keeps the probe's predictions (the same argmax)
and gives the fine-tuning a head as confident as the probe really is.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cnncodes.extractor.images import ImageTable

from cnncodes.pipelines.probes.calibration import fit_temperature as _fit_temperature
from cnncodes.pipelines.probes.codes import Codes

log = logging.getLogger(__name__)
INIT_HEADS = ("probe", "random")
# The probe of a large training set is fitted on a stratified share of it: rank 0 encodes these
# rows while the other ranks wait (about 100 s at 100 images/s on a CPU).
MAX_ROWS = 10_000


@dataclass
class HeadInit:
    """How the head started: ``probe`` (weight, bias for the head, and the probe's figures) or
    ``random`` (with why, when a probe was asked for)."""

    kind: str
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    C: float | None = None
    cv_accuracy: float | None = None
    rows: int = 0
    seconds: float = 0.0
    why: str = ""
    temperature: float = 1.0     # the head is the probe divided by this (1: not calibrated)
    val_rows: int = 0            # the validation images it was calibrated on

    def as_dict(self) -> dict:
        return {"kind": self.kind, "C": self.C,
                "cv_accuracy": None if self.cv_accuracy is None else round(float(self.cv_accuracy), 4),
                "rows": self.rows, "seconds": round(self.seconds, 2), "why": self.why,
                "temperature": round(float(self.temperature), 4), "val_rows": self.val_rows}


# A strongly regularised probe is too soft, and sharpening it is calibration too (Omniglot's
# alphabets: C = 0.01, temperature 0.81), but never by more than 2x: a probe right on every
# validation image (common on a small validation split) would otherwise be sharpened without
# limit, the exploding head this calibration is there to prevent. Above 100 the validation
# images disagree with the probe so much that no scaling is a calibration. Fewer than
# MIN_VAL_ROWS validation images (of at least two classes the probe knows) leave the head as is.
TEMPERATURE_BOUNDS = (0.5, 100.0)
MIN_VAL_ROWS = 20


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The probes' temperature scaling (:func:`~cnncodes.pipelines.probes.calibration.fit_temperature`)
    within the head's :data:`TEMPERATURE_BOUNDS`."""
    return _fit_temperature(logits, y, TEMPERATURE_BOUNDS)


def head_arrays(probe, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A softmax :class:`~cnncodes.pipelines.probes.linear_model.LinearProbe` (standardised rows)
    as a ``Linear`` head's ``(weight, bias)`` on the raw codes.

    ``x W^T + b`` on standardised rows is ``x (W / scale)^T + (b - (W / scale) mean)`` on raw
    ones. A binary probe's one logit ``s`` becomes the two logits ``(0, s)`` (the same softmax).
    Classes the probe never saw (none of their images in training) get zero weights and a bias
    30 below the lowest of the others, so the head starts as the probe on every input.
    """
    coef, intercept = np.asarray(probe.coef, np.float64), np.asarray(probe.intercept, np.float64)
    if probe.norm == "standard":
        scale = np.asarray(probe.scale, np.float64)
        coef = coef / scale
        intercept = intercept - coef @ np.asarray(probe.mean, np.float64)
    elif probe.norm != "none":
        raise ValueError(f"a head can start from a probe on standardised or raw codes, not {probe.norm!r}.")
    if coef.shape[0] == 1 and len(probe.classes_) == 2:
        coef = np.vstack([np.zeros_like(coef), coef])
        intercept = np.concatenate([[0.0], intercept])
    weight = np.zeros((n_classes, coef.shape[1]))
    bias = np.full(n_classes, intercept.min() - 30.0)
    idx = np.asarray(probe.classes_, dtype=np.int64)
    weight[idx], bias[idx] = coef, intercept
    return weight.astype(np.float32), bias.astype(np.float32)


def floored_standardisation(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and spread of ``X`` for the head's probe, each spread at least the median
    feature's.

    Plain standardisation divides by each feature's spread on the training images, and a
    network's codes hold features that barely vary there (216 of Lite0's 1,280 penultimate ones
    vary by less than 0.001 on the digits): the probe's weights on them, mapped to raw codes,
    become huge (a head of norm 2,160 on the digits), and an augmented crop or a moving backbone
    changes those features by far more than their training spread, so the head's logits explode
    (a training loss of 7 to 11 in the head's first epoch, then divergence once everything
    trains). With the spread floored at the median feature's, the probe is as accurate (digits:
    test 0.975 against 0.969, CV 0.950 against 0.939) and the head's norm 14 times smaller.
    """
    X = np.asarray(X, np.float64)
    mean, spread = X.mean(0), X.std(0)
    floor = float(np.median(spread)) if np.median(spread) > 0 else float(spread.max(initial=0.0))
    return mean, np.maximum(spread, floor if floor > 0 else 1.0)


def fit_probe_head(model_name: str, weights: str, table: ImageTable, rows, n_classes: int, *, decode: str,
                   seed: int, device: str = "auto", val_rows=(),
                   batch_size: int = 32, max_rows: int = MAX_ROWS) -> HeadInit:
    """The softmax probe of ``rows``' penultimate codes as the head's weights (not applied),
    divided by the temperature that calibrates it on ``val_rows`` (none: not calibrated).

    The codes come from a network built afresh with the run's weights, so the model about to be
    fine-tuned is never touched (batch norm folding, devices, eval mode); of more than
    ``max_rows`` training images, a stratified share. A probe needs at least 2 images of every
    class present: otherwise the head stays random, and the result says why.
    """
    import time

    from cnncodes.extractor.backbones.loading import load_backbone
    from cnncodes.extractor.encoding import encode_rows

    from cnncodes.pipelines.probes.classifiers import fit_linear_probe
    from cnncodes.pipelines.probes.metrics import stratified_sample
    t0 = time.perf_counter()
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) > max_rows:  # a start for the head, not the final word: a stratified share will do
        rows = rows[stratified_sample(table.labels[rows], max_rows, seed)]
    y = table.labels[rows]
    counts = np.bincount(y, minlength=n_classes)
    smallest = int(counts[counts > 0].min()) if len(rows) else 0
    if smallest < 2 or (counts > 0).sum() < 2:
        return HeadInit("random", why=f"a probe needs 2 training images of every class and 2 classes; "
                                      f"the smallest class has {smallest}")
    val_rows = np.asarray(val_rows, dtype=np.int64)
    if len(val_rows) > max_rows // 4:
        val_rows = val_rows[stratified_sample(table.labels[val_rows], max_rows // 4, seed)]
    bb = load_backbone(model_name, weights, seed=seed)  # the run's network, random weights too
    codes, errors = encode_rows(bb, table, np.concatenate([rows, val_rows]), ["penultimate"],
                                device=device, batch_size=batch_size, decode=decode)
    ok = np.array([not e for e in errors], dtype=bool)
    X_val = codes["penultimate"][len(rows):][ok[len(rows):]]
    y_val = table.labels[val_rows][ok[len(rows):]]
    ok = ok[:len(rows)]
    X, y, kept = codes["penultimate"][:len(rows)][ok], y[ok], rows[ok]
    counts = np.bincount(y, minlength=n_classes)
    smallest = int(counts[counts > 0].min()) if len(y) else 0
    if smallest < 2 or (counts > 0).sum() < 2:
        return HeadInit("random", why="too few training images decoded for a probe")
    mean, scale = floored_standardisation(X)
    data = Codes(Path(""), "penultimate", ((X - mean) / scale).astype(np.float32), y,
                 np.full(len(y), "train", dtype=object), kept, [table.paths[r] for r in kept],
                 list(table.classes), {}, {})
    fit = fit_linear_probe(data, "penultimate", "softmax", folds=min(5, smallest), seed=seed,
                           solver="batched", norm="none")
    w, b = head_arrays(fit.pipeline, n_classes)
    w, b = w / scale, b - (w / scale) @ mean  # the same scores on raw codes
    # validation images of a class without training images would each cost a loss of about 30
    # (its bias), whatever the temperature: they say nothing of the probe's confidence
    known = np.isin(y_val, np.unique(y))
    X_val, y_val = X_val[known], y_val[known]
    calibrate = len(y_val) >= MIN_VAL_ROWS and len(np.unique(y_val)) >= 2
    t = fit_temperature(X_val @ w.T.astype(np.float64) + b, y_val) if calibrate else 1.0
    log.info("head from a softmax probe (C=%g, CV accuracy %.3f on %d images), temperature %.3g on %d "
             "validation images", fit.C, fit.cv_accuracy, len(y), t, len(y_val))
    return HeadInit("probe", w / t, b / t, fit.C, fit.cv_accuracy, len(y), time.perf_counter() - t0,
                    temperature=t, val_rows=len(y_val) if calibrate else 0)


def apply_head(head: torch.nn.Linear, init: HeadInit) -> None:
    """Copy a probe's ``(weight, bias)`` into ``head`` (nothing for a random start)."""
    if init.kind != "probe":
        return
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(init.weight, dtype=head.weight.dtype))
        head.bias.copy_(torch.as_tensor(init.bias, dtype=head.bias.dtype))

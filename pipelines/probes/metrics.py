"""Folds and scores of the probes in plain numpy: scikit-learn's, without importing it.

``stratified_kfold`` is ``StratifiedKFold(n, shuffle=True, random_state=seed).split`` and the
scores are ``accuracy_score``, ``balanced_accuracy_score``, ``f1_score(average="macro")`` and
``confusion_matrix``, the same numbers (tests compare them on many label sets). Written out
here because importing scikit-learn costs about 2 s on this 2-core machine, more than a fit of
a few thousand codes takes with the batched solver; the folds must be scikit-learn's exactly,
so that a fit is comparable with a stock ``GridSearchCV`` over the same folds.
"""
from __future__ import annotations

import numpy as np


def stratified_kfold(y, n_splits: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``list(StratifiedKFold(n_splits, shuffle=True, random_state=seed).split(y, y))``, the
    same (train, test) index arrays, for integer ``seed`` and labels of at least ``n_splits``
    rows in some class (the caller checks every class)."""
    y = np.asarray(y).ravel()
    _, y_idx, y_inv = np.unique(y, return_index=True, return_inverse=True)
    _, class_perm = np.unique(y_idx, return_inverse=True)   # classes by order of appearance
    y_encoded = class_perm[y_inv.reshape(-1)]
    n_classes = len(y_idx)
    if np.all(n_splits > np.bincount(y_encoded)):
        raise ValueError(f"n_splits={n_splits} cannot be greater than the number of members in each class.")
    y_order = np.sort(y_encoded)
    allocation = np.asarray([np.bincount(y_order[i::n_splits], minlength=n_classes) for i in range(n_splits)])
    rng = np.random.RandomState(seed)
    test_folds = np.empty(len(y), dtype="i")
    for k in range(n_classes):
        folds_for_class = np.arange(n_splits).repeat(allocation[:, k])
        rng.shuffle(folds_for_class)
        test_folds[y_encoded == k] = folds_for_class
    indices = np.arange(len(y))
    return [(indices[test_folds != i], indices[test_folds == i]) for i in range(n_splits)]


def confusion(y_true, y_pred, n_classes: int) -> np.ndarray:
    """``confusion_matrix(y_true, y_pred, labels=range(n_classes))`` of class indices."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    return np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes).reshape(n_classes,
                                                                                             n_classes)


def classification_scores(y_true, y_pred) -> tuple[float, float, float]:
    """(accuracy, balanced accuracy, macro-F1) over the classes present in either array."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    labels, inv = np.unique(np.concatenate([y_true, y_pred]), return_inverse=True)
    t, p = inv[:len(y_true)], inv[len(y_true):]
    cm = confusion(t, p, len(labels)).astype(np.float64)
    tp, support, predicted = np.diag(cm), cm.sum(1), cm.sum(0)
    accuracy = float(tp.sum() / max(1, len(y_true)))
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(support > 0, tp / support, 0.0)
        # balanced accuracy: the mean recall of the classes that occur in y_true
        balanced = float(recall[support > 0].mean())
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return accuracy, balanced, float(f1.mean())


def stratified_sample(y, size: int, seed: int) -> np.ndarray:
    """Sorted positions of at most ``size`` rows of ``y``, an equal share of every class (all of
    a class smaller than its share; at least 2 of a class that has them, so folds can be drawn).
    Seeded, so the same call gives the same sample."""
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    share = max(2, size // max(1, len(classes)))
    picked = [rng.permutation(np.flatnonzero(y == c))[:share] for c in classes]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


# What chooses C (``--select``): the column of :func:`classification_scores` of that name.
SELECT = ("accuracy", "balanced_accuracy", "macro_f1")


def fold_scores(y, pred, splits) -> np.ndarray:
    """(folds, 3): accuracy, balanced accuracy and macro-F1 of ``pred`` on each fold's held-out
    rows of ``splits`` (a list of (train, held) index arrays)."""
    return np.array([classification_scores(y[held], pred[held]) for _, held in splits])


def balanced_weights(y, mask=None) -> np.ndarray:
    """Row weights of scikit-learn's ``class_weight="balanced"``: ``n / (K * n_c)`` for a row of
    class c, counted over the rows where ``mask`` holds (all rows without one; rows outside it
    get their class's weight too, or 0 for a class absent from it). The weights of the
    counted rows sum to their number, so C keeps its meaning."""
    y = np.asarray(y)
    mask = np.ones(len(y), dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    labels, inv = np.unique(y, return_inverse=True)
    counts = np.bincount(inv[mask], minlength=len(labels)).astype(np.float64)
    present = counts > 0
    per_class = np.zeros(len(labels))
    per_class[present] = mask.sum() / (present.sum() * counts[present])
    return per_class[inv]


def imbalance(y) -> float:
    """The largest class's size over the smallest's (1 for balanced labels)."""
    counts = np.unique(np.asarray(y), return_counts=True)[1]
    return float(counts.max() / counts.min()) if len(counts) else 1.0

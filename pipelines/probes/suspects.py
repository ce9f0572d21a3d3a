"""Training images whose given label is probably wrong, from a probe's out-of-fold probabilities.

Confident learning (Northcutt et al. 2021, cleanlab's ``find_label_issues``), without the
library: every training row is scored by a model that never saw it (the out-of-fold scores of
the chosen C, calibrated by the fit's temperature), and the rows are ranked by the probability
of their given label (cleanlab's ``self_confidence`` ranking), least likely first. A row is
also *flagged* where confident learning counts it off the diagonal of the confident joint:
some other class's probability reaches that class's threshold (the mean probability of the
class over the rows labelled with it), and among the classes that reach theirs the most
probable is not the given one.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnncodes.extractor.files import atomic_write


@dataclass
class Suspects:
    """Training rows ranked by the out-of-fold probability of their given label."""

    order: np.ndarray        # positions into the training rows, least likely label first
    p_given: np.ndarray      # per training row
    predicted: np.ndarray    # class index (into the probe's classes) of the highest probability
    p_predicted: np.ndarray
    flagged: np.ndarray      # bool: off the confident joint's diagonal

    def top(self, share: float) -> np.ndarray:
        """The first ``share`` of the ranking (at least one row)."""
        return self.order[:max(1, int(round(share * len(self.order))))]


def rank_suspects(proba: np.ndarray, y: np.ndarray) -> Suspects:
    """Rank rows of out-of-fold class probabilities ``proba`` (n, K) with given labels ``y``
    (class indices into proba's columns)."""
    proba, y = np.asarray(proba, np.float64), np.asarray(y, np.int64)
    n, K = proba.shape
    rows = np.arange(n)
    p_given = proba[rows, y]
    counts = np.bincount(y, minlength=K)
    sums = np.zeros((K, K))
    np.add.at(sums, y, proba)
    # class j's threshold: the mean probability of j on the rows labelled j (cleanlab's)
    thresholds = np.where(counts > 0, np.diag(sums) / np.maximum(counts, 1), np.inf)
    above = proba >= thresholds[None, :]
    confident = np.where(above, proba, -1.0).argmax(1)
    flagged = above.any(1) & (confident != y)
    predicted = proba.argmax(1)
    # least likely given label first; ties: the more probable other class first, then row order
    order = np.lexsort((rows, -proba[rows, predicted], p_given))
    return Suspects(order, p_given, predicted, proba[rows, predicted], flagged)


def write_suspects_csv(path: Path, suspects: Suspects, classes: list[str], class_ids: np.ndarray,
                       y: np.ndarray, rows: np.ndarray, paths: list[str]) -> Path:
    """``suspects.csv``: every training row, least likely label first (rank, cache row, path,
    given and predicted class, their probabilities, flagged). ``class_ids`` maps the
    probability columns to indices into ``classes``; ``y`` are those column indices."""
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["rank", "row", "path", "given", "predicted", "p_given", "p_predicted", "flagged"])
        for rank, i in enumerate(suspects.order, 1):
            w.writerow([rank, int(rows[i]), paths[i], classes[int(class_ids[y[i]])],
                        classes[int(class_ids[suspects.predicted[i]])], f"{suspects.p_given[i]:.6f}",
                        f"{suspects.p_predicted[i]:.6f}", int(suspects.flagged[i])])
    return path

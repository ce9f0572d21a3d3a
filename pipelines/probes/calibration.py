"""Calibrated probabilities of a probe: one temperature fitted on out-of-fold scores, and the
expected calibration error (ECE) before and after it.

Temperature scaling (Guo et al. 2017) divides the decision scores by one number ``T`` before the
softmax; ``T`` minimises the cross-entropy of the out-of-fold scores of the chosen C (rows that
no model of their fold saw), so no test row takes part. For the softmax probe it corrects
over- or under-confidence; for the linear SVM, whose scores are margins and not logits, it is
the multi-class form of Platt scaling with one parameter (the slope), which keeps the SVM's
ranking of classes, hence its predictions. The ECE is the usual 15 equal-width bins of the top
probability: the mean |accuracy - confidence| weighted by the bins' shares of rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cnncodes.pipelines.probes.linear_model import probabilities

ECE_BINS = 15
# Wide enough for an SVM's margins (near 1, so T well below 1 sharpens them) and for a weakly
# regularised softmax's huge logits; beyond these bounds no scaling is a calibration.
BOUNDS = (1e-3, 1e3)


def as_logits(scores: np.ndarray) -> np.ndarray:
    """(n, K) logits of decision scores: a binary probe's one column ``s`` is ``(0, s)``."""
    scores = np.asarray(scores, np.float64)
    return np.stack([np.zeros_like(scores), scores], axis=1) if scores.ndim == 1 else scores


def fit_temperature(scores: np.ndarray, y: np.ndarray, bounds: tuple[float, float] = BOUNDS) -> float:
    """The temperature ``T`` within ``bounds`` that minimises the mean cross-entropy of
    ``softmax(scores / T)`` against the class indices ``y`` (a one-dimensional problem, convex
    in ``1 / T``, so unimodal in ``log T``: a golden-section search to 1e-3 in ``log T``).

    Not scipy's ``minimize_scalar``: importing ``scipy.optimize`` takes 0.4-0.7 s on this
    2-core machine, longer than a whole fit of the digits' codes."""
    logits = as_logits(scores)
    picked = logits[np.arange(len(y)), np.asarray(y, np.int64)]
    top = logits.max(1)

    def nll(log_t: float) -> float:
        t = np.exp(log_t)
        z = (logits - top[:, None]) / t
        return float(np.mean(np.log(np.exp(z).sum(1)) + (top - picked) / t))

    lo, hi = np.log(bounds[0]), np.log(bounds[1])
    ratio = (np.sqrt(5) - 1) / 2
    a, b = lo + (1 - ratio) * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(a), nll(b)
    while hi - lo > 1e-3:
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = lo + (1 - ratio) * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(b)
    return float(np.exp((lo + hi) / 2))


def reliability(proba: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> dict:
    """The reliability diagram's bins of the top probability (``confidence``, ``accuracy``,
    ``count`` per non-empty bin) and the ECE."""
    proba, y = np.asarray(proba), np.asarray(y)
    conf, pred = proba.max(1), proba.argmax(1)
    right = (pred == y).astype(np.float64)
    which = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)   # (0, 1/b], (1/b, 2/b], ...
    count = np.bincount(which, minlength=bins)
    conf_sum = np.bincount(which, conf, minlength=bins)
    right_sum = np.bincount(which, right, minlength=bins)
    used = count > 0
    ece = float(np.abs(right_sum - conf_sum).sum() / max(1, len(y)))
    return {"ece": ece, "confidence": (conf_sum[used] / count[used]).tolist(),
            "accuracy": (right_sum[used] / count[used]).tolist(), "count": count[used].tolist()}


def expected_calibration_error(proba: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    return reliability(proba, y, bins)["ece"]


@dataclass
class Calibration:
    """The fitted temperature and the ECE before (T = 1) and after it, on the out-of-fold rows it
    was fitted on and on the test rows (None without them)."""

    temperature: float
    ece_cv_before: float
    ece_cv_after: float
    ece_test_before: float | None = None
    ece_test_after: float | None = None

    def proba(self, scores: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities of decision scores."""
        return probabilities(np.asarray(scores, np.float64) / self.temperature)

    def as_dict(self) -> dict:
        r = lambda v: None if v is None else round(float(v), 6)
        return {"temperature": r(self.temperature), "ece_cv_before": r(self.ece_cv_before),
                "ece_cv_after": r(self.ece_cv_after), "ece_test_before": r(self.ece_test_before),
                "ece_test_after": r(self.ece_test_after), "bins": ECE_BINS}


def calibrate(cv_scores: np.ndarray, y_cv: np.ndarray, test_scores=None, y_test=None) -> Calibration:
    """Fit the temperature on out-of-fold ``cv_scores`` (labels ``y_cv``, class indices) and
    measure the ECE before and after, there and on the test rows."""
    t = fit_temperature(cv_scores, y_cv)
    before = expected_calibration_error(probabilities(np.asarray(cv_scores, np.float64)), y_cv)
    cal = Calibration(t, before, 0.0)
    cal.ece_cv_after = expected_calibration_error(cal.proba(cv_scores), y_cv)
    if test_scores is not None and len(y_test):
        cal.ece_test_before = expected_calibration_error(probabilities(np.asarray(test_scores, np.float64)),
                                                         y_test)
        cal.ece_test_after = expected_calibration_error(cal.proba(test_scores), y_test)
    return cal

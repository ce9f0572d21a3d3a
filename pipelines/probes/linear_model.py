"""A fitted linear probe in plain numpy: normalisation, then scores ``x W^T + b``.

The batched solver's result. It computes what the scikit-learn Pipeline of the same steps
computes (StandardScaler or Normalizer, then LinearSVC or multinomial LogisticRegression: the
same formulas in the same order), and is saved in that Pipeline's array format, so a saved
model reads back as that Pipeline. It exists so that fitting a probe imports neither
scikit-learn nor torch: importing scikit-learn costs about 2 s on this 2-core machine, more
than most fits (:meth:`LinearProbe.to_pipeline` gives the Pipeline itself).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cnncodes.pipelines.probes.normalise import signed_sqrt
from cnncodes.pipelines.probes.pipeline_steps import pipeline_from_arrays, probe_arrays


def labels_of(scores: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """The predicted classes of decision scores, by scikit-learn's convention (one column for
    two classes: positive means the second)."""
    return classes[(scores > 0).astype(int) if scores.ndim == 1 else scores.argmax(1)]


def probabilities(scores: np.ndarray) -> np.ndarray:
    """Softmax probabilities of multinomial scores; the logistic function of a binary logit."""
    if scores.ndim == 1:
        p = np.exp(-np.logaddexp(0.0, -scores))  # 1 / (1 + exp(-s)) without overflow (scipy's expit)
        return np.stack([1 - p, p], axis=1)
    scores = scores - scores.max(1, keepdims=True)
    p = np.exp(scores)
    return p / p.sum(1, keepdims=True)


def _unit_rows(X: np.ndarray) -> np.ndarray:
    """scikit-learn's ``normalize(X, "l2")`` in place: norms below 10 eps count as 1."""
    norms = np.sqrt(np.einsum("ij,ij->i", X, X))
    norms[norms < 10 * np.finfo(norms.dtype).eps] = 1.0
    X /= norms[:, np.newaxis]
    return X


@dataclass(eq=False)
class LinearProbe:
    """A linear SVM (``linear_svc``) or softmax (``logistic``) probe with its normalisation.

    ``coef`` (K, D) and ``intercept`` (K,) follow scikit-learn's conventions: one row for two
    classes (the positive class's weights, or the logit of class 1 against class 0).
    """

    kind: str
    C: float
    norm: str                      # standard | l2 | power | none
    coef: np.ndarray
    intercept: np.ndarray
    classes_: np.ndarray
    mean: np.ndarray | None = None     # standard only: the training rows' mean and spread
    scale: np.ndarray | None = None
    n_samples: int = 0

    @classmethod
    def from_weights(cls, loss: str, C: float, norm: str, classes, W, intercept, mean=None, scale=None,
                     n_samples: int = 0) -> LinearProbe:
        """The probe of weights ``W`` (D, K) and ``intercept`` (K,), one column per class."""
        classes = np.asarray(classes)
        coef, b = np.asarray(W, dtype=np.float64).T, np.asarray(intercept, dtype=np.float64)
        if len(classes) == 2:  # scikit-learn's binary convention: one row, positive class
            if loss == "squared_hinge":  # one-vs-rest of two classes: w0 = -w1, the positive one
                coef, b = coef[1:], b[1:]
            else:                        # the logit of class 1 against class 0
                coef, b = coef[1:] - coef[:1], b[1:] - b[:1]
        return cls("linear_svc" if loss == "squared_hinge" else "logistic", float(C), norm,
                   np.ascontiguousarray(coef), b, classes,
                   None if mean is None else np.asarray(mean, dtype=np.float64),
                   None if scale is None else np.asarray(scale, dtype=np.float64), int(n_samples))

    @property
    def n_features_in_(self) -> int:
        return self.coef.shape[1]

    def transform(self, X) -> np.ndarray:
        """The normalised rows, as the Pipeline's normalisation steps give them."""
        X = np.asarray(X)
        X = np.array(X, dtype=X.dtype if X.dtype in (np.float32, np.float64) else np.float64)
        if self.norm == "standard":  # in the rows' precision, as StandardScaler does
            X -= self.mean.astype(X.dtype, copy=False)
            X /= self.scale.astype(X.dtype, copy=False)
        elif self.norm in ("l2", "power"):
            X = _unit_rows(signed_sqrt(X) if self.norm == "power" else X)
        return X

    def decision_function(self, X) -> np.ndarray:
        scores = self.transform(X) @ self.coef.T + self.intercept
        return scores.ravel() if scores.shape[1] == 1 else scores

    def predict(self, X) -> np.ndarray:
        return labels_of(self.decision_function(X), self.classes_)

    @property
    def predict_proba(self):
        """Class probabilities (softmax only; a linear SVM has none, as LinearSVC)."""
        if self.kind != "logistic":
            raise AttributeError("a linear SVM gives no probabilities")
        return self._predict_proba

    def _predict_proba(self, X) -> np.ndarray:
        return probabilities(self.decision_function(X))

    def to_pipeline(self):
        """The fitted scikit-learn Pipeline of the same steps (what a saved probe reads back as)."""
        return pipeline_from_arrays(*probe_arrays(self))

    @property
    def steps(self) -> list:
        return self.to_pipeline().steps

    @property
    def named_steps(self):
        return self.to_pipeline().named_steps

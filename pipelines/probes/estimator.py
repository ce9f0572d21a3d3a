"""The batched solver as a scikit-learn estimator (for Pipelines and grid searches of one's own).

:func:`pipelines.classifiers.fit_linear_probe` does not use it: it drives
:class:`~.solver.cv_path.CVPath` directly, every fold of a C at once.
"""
from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.metaestimators import available_if
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from cnncodes.pipelines.probes.linear_model import labels_of, probabilities
from cnncodes.pipelines.probes.solver.cv_path import fit_one
from cnncodes.pipelines.probes.solver.losses import LOSSES


class BatchedLinearClassifier(ClassifierMixin, BaseEstimator):
    """A linear SVM (squared hinge, one-vs-rest) or softmax classifier fitted by the batched
    solver's L-BFGS (numpy on the CPU, torch on CUDA).

    A scikit-learn estimator (it passes ``parametrize_with_checks``).

    Examples
    --------
    >>> clf = BatchedLinearClassifier(loss="log_loss", C=0.1).fit(X, y)  # doctest: +SKIP
    """

    def __init__(self, loss: str = "squared_hinge", C: float = 1.0, max_iter: int = 300,
                 tol: float = 1e-4, device: str = "cpu"):
        self.loss = loss
        self.C = C
        self.max_iter = max_iter
        self.tol = tol
        self.device = device

    def fit(self, X, y):
        X, y = validate_data(self, X, y, dtype=[np.float32, np.float64])
        check_classification_targets(y)
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}.")
        if not self.C > 0:
            raise ValueError(f"C must be > 0, got {self.C!r}.")
        if len(np.unique(y)) < 2:
            raise ValueError(f"needs samples of at least 2 classes, got {len(np.unique(y))} class.")
        probe, evaluations = fit_one(X, y, self.loss, float(self.C), self.max_iter, self.tol, self.device)
        self.classes_, self.coef_, self.intercept_ = probe.classes_, probe.coef, probe.intercept
        self.n_iter_ = evaluations  # objective evaluations of L-BFGS
        return self

    def decision_function(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=[np.float32, np.float64])
        scores = X @ self.coef_.T + self.intercept_
        return scores.ravel() if scores.shape[1] == 1 else scores

    def predict(self, X):
        return labels_of(self.decision_function(X), self.classes_)

    @available_if(lambda self: self.loss == "log_loss")
    def predict_proba(self, X):
        return probabilities(self.decision_function(X))

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = True
        return tags

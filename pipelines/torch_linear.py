"""Linear classifiers fitted as batched tensor problems: every fold x every C in one solve.

scikit-learn fits one (fold, C) model at a time, in float64. Here all F x G models of a grid
search are one parameter tensor W (F*G, D, K) and one L-BFGS problem whose objective is the sum
of the models' objectives; the models share nothing but the data, so the sum is minimised by
each model's own minimiser. Objectives match scikit-learn's up to a positive factor 1/(C n):

- ``squared_hinge`` (LinearSVC, one-vs-rest): mean_n sum_k max(0, 1 - t_nk s_nk)^2 + ||W||^2 / (2 C n)
- ``log_loss`` (multinomial LogisticRegression): mean_n CE(s_n, y_n) + ||W||^2 / (2 C n)

The intercept is penalised for the SVM (liblinear's convention, intercept_scaling=1) and not
for softmax (LogisticRegression's), so both solve exactly scikit-learn's problem.
"""
from __future__ import annotations

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.metaestimators import available_if
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

LOSSES = ("squared_hinge", "log_loss")


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def fit_batched(Xs: torch.Tensor, y: torch.Tensor, masks: torch.Tensor, Cs, n_classes: int,
                loss: str = "squared_hinge", max_iter: int = 300, tol: float = 1e-5, init=None):
    """Fit F x G linear models at once.

    Parameters
    ----------
    Xs : (F, N, D) float tensor
        The rows as each fold's model sees them (already normalised per fold).
    y : (N,) long tensor
        Class index per row.
    masks : (F, N) bool tensor
        Training rows of each fold.
    Cs : sequence of G floats
        Inverse regularisation strengths.
    init : (W, b) as returned for G = 1, optional
        Starting point (warm start), broadcast to every C.

    Returns
    -------
    W : (F, G, D, K) tensor, b : (F, G, K) tensor
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}.")
    F, N, D = Xs.shape
    G, K = len(Cs), n_classes
    dev, dt = Xs.device, Xs.dtype
    C = torch.as_tensor(list(Cs), dtype=dt, device=dev)                      # (G,)
    w = masks.to(dt) / masks.sum(1, keepdim=True).to(dt)                     # (F, N) mean weights
    n = masks.sum(1).to(dt)                                                  # (F,)
    reg = 1.0 / (2.0 * C[None, :] * n[:, None])                              # (F, G)
    W = torch.zeros(F, D, G * K, dtype=dt, device=dev)
    b = torch.zeros(F, 1, G * K, dtype=dt, device=dev)
    if init is not None:
        W.copy_(init[0][:, 0].repeat(1, 1, G))
        b.copy_(init[1][:, 0].repeat(1, G)[:, None])
    W.requires_grad_(True)
    b.requires_grad_(True)
    if loss == "squared_hinge":
        T = torch.full((N, K), -1.0, dtype=dt, device=dev)
        T[torch.arange(N, device=dev), y] = 1.0
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, history_size=20, tolerance_grad=tol,
                            tolerance_change=tol * 1e-3, line_search_fn="strong_wolfe")

    def objective():
        opt.zero_grad()
        S = (torch.bmm(Xs, W) + b).view(F, N, G, K)                          # scores
        if loss == "squared_hinge":
            per_row = torch.clamp(1 - T[None, :, None, :] * S, min=0).pow(2).sum(-1)   # (F, N, G)
        else:
            per_row = torch.logsumexp(S, -1) - S.gather(-1, y.view(1, N, 1, 1).expand(F, N, G, 1)).squeeze(-1)
        data = torch.einsum("fng,fn->fg", per_row, w)
        penalty = reg * W.view(F, D, G, K).pow(2).sum((1, 3))
        if loss == "squared_hinge":  # liblinear penalises the intercept (intercept_scaling=1)
            penalty = penalty + reg * b.view(F, G, K).pow(2).sum(-1)
        total = (data + penalty).sum()
        total.backward()
        return total

    opt.step(objective)
    with torch.no_grad():
        return (W.detach().view(F, D, G, K).permute(0, 2, 1, 3).contiguous(),
                b.detach().view(F, G, K))


def cv_scores_batched(X: np.ndarray, y: np.ndarray, splits, grid, classifier: str, norm: str,
                      device: str = "auto"):
    """Cross-validated accuracy of every C (rows) in every fold (columns), fitted all at once.

    Normalisation is fitted per fold on that fold's training rows only: ``standard`` uses each
    fold's own mean and standard deviation (as StandardScaler would); ``l2`` and ``power``
    are per-row and need no fitting. Returns (scores, out-of-fold predictions per C).
    """
    from .classifiers import signed_sqrt
    dev = _device(device)
    classes, idx = np.unique(y, return_inverse=True)
    X = np.asarray(X, dtype=np.float32)
    if norm == "power":
        X = signed_sqrt(X)
    if norm in ("l2", "power"):
        X = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), np.finfo(np.float32).tiny)
    Xt = torch.as_tensor(np.ascontiguousarray(X), device=dev)
    F = len(splits)
    masks = torch.zeros(F, len(y), dtype=torch.bool, device=dev)
    for f, (train, _) in enumerate(splits):
        masks[f, torch.as_tensor(train, device=dev)] = True
    if norm == "standard":
        m = masks.to(Xt.dtype)
        n = m.sum(1, keepdim=True)
        mu = (m @ Xt) / n                                                   # (F, D)
        var = (m @ Xt.pow(2)) / n - mu.pow(2)
        sd = torch.sqrt(torch.clamp(var, min=0))
        sd = torch.where(sd < 10 * torch.finfo(Xt.dtype).eps, torch.ones_like(sd), sd)
        Xs = (Xt[None] - mu[:, None]) / sd[:, None]
    else:
        Xs = Xt[None].expand(F, -1, -1).contiguous()
    yt = torch.as_tensor(idx, dtype=torch.long, device=dev)
    loss = "squared_hinge" if classifier == "svm" else "log_loss"
    scores = np.zeros((len(grid), F))
    oof = np.empty((len(grid), len(y)), dtype=y.dtype)
    # All folds at once, one C at a time from strong to weak regularisation, each C starting
    # from the previous solution: batching the C values too makes every model wait for the
    # slowest (weakest-regularised) one; measured 2x slower than this on the Caltech codes.
    order = sorted(range(len(grid)), key=lambda g: grid[g])
    state = None
    for g in order:
        state = fit_batched(Xs, yt, masks, [grid[g]], len(classes), loss, init=state)
        W, b = state
        with torch.no_grad():
            for f, (_, held) in enumerate(splits):
                h = torch.as_tensor(held, device=dev)
                pred = (Xs[f, h] @ W[f, 0] + b[f, 0]).argmax(-1).cpu().numpy()
                oof[g, held] = classes[pred]
                scores[g, f] = float((classes[pred] == y[held]).mean())
    return [scores[g] for g in range(len(grid))], oof


class TorchLinearClassifier(ClassifierMixin, BaseEstimator):
    """A linear SVM (squared hinge, one-vs-rest) or softmax classifier fitted with torch L-BFGS.

    A scikit-learn estimator (it passes ``parametrize_with_checks``); the grid search of
    :func:`pipelines.classifiers.fit_linear_probe` uses :func:`fit_batched` directly.

    Examples
    --------
    >>> clf = TorchLinearClassifier(loss="log_loss", C=0.1).fit(X, y)  # doctest: +SKIP
    """

    def __init__(self, loss: str = "squared_hinge", C: float = 1.0, max_iter: int = 300,
                 tol: float = 1e-5, device: str = "cpu"):
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
        self.classes_, idx = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"needs samples of at least 2 classes, got {len(self.classes_)} class.")
        dev = _device(self.device)
        Xt = torch.as_tensor(np.ascontiguousarray(X, dtype=np.float32), device=dev)
        yt = torch.as_tensor(idx, dtype=torch.long, device=dev)
        W, b = fit_batched(Xt[None], yt, torch.ones(1, len(yt), dtype=torch.bool, device=dev), [float(self.C)],
                           len(self.classes_), self.loss, self.max_iter, self.tol)
        coef, intercept = W[0, 0].T.cpu().numpy(), b[0, 0].cpu().numpy()
        if len(self.classes_) == 2:  # scikit-learn's binary convention: one row, positive class
            coef, intercept = coef[1:] - coef[:1], intercept[1:] - intercept[:1]
        self.coef_, self.intercept_ = coef.astype(np.float64), intercept.astype(np.float64)
        self.n_iter_ = self.max_iter
        return self

    def decision_function(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=[np.float32, np.float64])
        scores = X @ self.coef_.T + self.intercept_
        return scores.ravel() if scores.shape[1] == 1 else scores

    def predict(self, X):
        scores = self.decision_function(X)
        idx = (scores > 0).astype(int) if scores.ndim == 1 else scores.argmax(1)
        return self.classes_[idx]

    @available_if(lambda self: self.loss == "log_loss")
    def predict_proba(self, X):
        scores = self.decision_function(X)
        if scores.ndim == 1:
            scores = np.stack([-scores / 2, scores / 2], axis=1)
        scores = scores - scores.max(1, keepdims=True)
        p = np.exp(scores)
        return p / p.sum(1, keepdims=True)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = True
        return tags

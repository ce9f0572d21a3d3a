"""Linear classifiers fitted as batched tensor problems: every fold x every C in one solve.

scikit-learn fits one (fold, C) model at a time, in float64. Here the F folds' models are one
parameter tensor (F, D, K) and one L-BFGS problem whose objective is the sum of the models'
objectives; the models share nothing but the data, so the sum is minimised by each model's own
minimiser. The C grid is walked from strong to weak regularisation with warm starts, in a
rotated, preconditioned basis (see :class:`BatchedProblem`). Objectives match scikit-learn's up
to a positive factor 1/(C n):

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

from cnncodes.extractor.devices import resolve_device

LOSSES = ("squared_hinge", "log_loss")


def _device(device: str) -> torch.device:
    # torch.linalg.eigh (the fold preconditioning) has no MPS kernel: CUDA or the CPU.
    return resolve_device(device, accelerators=("cuda",))


# Curvature of the data term per unit of feature variance, used only to scale the
# preconditioner (a wrong guess costs a constant factor in conditioning, not correctness).
_CURVATURE = {"squared_hinge": 1.0, "log_loss": 0.1}


# Gradient tolerance of the cross-validation solves (the final refit uses the estimator's tol,
# 1e-4 by default, scikit-learn's). CV only ranks the C values; measured on the Caltech codes
# (1,515 x 1,280, 102 classes), 3e-4 instead of 1e-4 moves the CV accuracy of the chosen C by
# <= 0.07 points and any C by <= 0.3 points, and takes the softmax grid from 11.2 s to 6.0 s.
CV_TOL = 3e-4


class BatchedProblem:
    """F linear classification problems over the same rows, rotated and preconditioned once.

    CNN codes are badly conditioned (eigenvalues of their covariance spread over many decades;
    the benchmark's 20,000 x 2,048 matrix repeats features), which makes first-order solvers
    and L-BFGS crawl. Each fold's weights are written in the eigenbasis of its training rows'
    second-moment matrix, ``W = V (s * u)``, with ``s_i = (h lambda_i + 1 / (C n))^-1/2``: the
    L2 penalty stays diagonal (V is orthogonal), the objective and its minimiser are exactly
    those of the original problem, and the Hessian in ``u`` is close to the identity. The
    eigendecomposition is done once and serves every C of the grid.
    """

    def __init__(self, Xs: torch.Tensor, y: torch.Tensor, masks: torch.Tensor, n_classes: int,
                 loss: str = "squared_hinge"):
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}.")
        self.F, N, self.D = Xs.shape
        self.K, self.loss, self.Xs = n_classes, loss, Xs
        dt, dev = Xs.dtype, Xs.device
        # Only each fold's training rows enter its objective: gather them, padded to the largest
        # fold with rows of weight 0 (stratified folds differ by a row or two).
        counts = masks.sum(1)
        L = int(counts.max())
        order = torch.argsort((~masks).to(torch.int8), dim=1, stable=True)[:, :L]  # training rows first
        valid = torch.arange(L, device=dev)[None, :] < counts[:, None]
        self.n = counts.to(dt)                                                     # (F,)
        self.w = valid.to(dt) / self.n[:, None]                                    # (F, L) mean weights
        self.y = torch.where(valid, y[order], 0)                                   # (F, L)
        Xtr = torch.gather(Xs, 1, order[:, :, None].expand(-1, -1, self.D))         # (F, L, D)
        root = self.w.sqrt()[:, :, None]
        # The preconditioner needs only rough eigenvalues, and V is orthogonal to float32
        # precision, so the rotated problem is the original one: no float64 needed.
        lam, V = torch.linalg.eigh(torch.bmm((Xtr * root).transpose(1, 2), Xtr * root))
        self.lam = lam.clamp(min=0)                                                 # (F, D)
        self.V = V                                                                  # (F, D, D)
        self.Z = torch.bmm(Xtr, V)                                                  # rotated training rows
        del Xtr
        if loss == "squared_hinge":
            self.T = torch.full((self.F, L, self.K), -1.0, dtype=dt, device=dev)
            self.T.scatter_(2, self.y[:, :, None], 1.0)

    def solve(self, C: float, init=None, max_iter: int = 300, tol: float = 1e-4):
        """Minimise every fold's objective at this C; ``init`` is a previous solution (warm
        start). Returns ``(omega, b)``: weights in the rotated basis (F, D, K) and intercepts."""
        F, D, K = self.F, self.D, self.K
        dt = self.Z.dtype
        reg = 1.0 / (2.0 * float(C) * self.n)                                      # (F,)
        scale = torch.rsqrt(_CURVATURE[self.loss] * self.lam + 2 * reg[:, None])[:, :, None]  # (F, D, 1)
        u = torch.zeros(F, D, K, dtype=dt, device=self.Z.device)
        b = torch.zeros(F, 1, K, dtype=dt, device=self.Z.device)
        if init is not None:
            u.copy_(init[0] / scale)
            b.copy_(init[1][:, None])
        u.requires_grad_(True)
        b.requires_grad_(True)
        opt = torch.optim.LBFGS([u, b], lr=1, max_iter=max_iter, history_size=20, tolerance_grad=tol,
                                tolerance_change=tol * 1e-3, line_search_fn="strong_wolfe")
        y = self.y

        def objective():
            opt.zero_grad()
            omega = u * scale
            S = torch.baddbmm(b, self.Z, omega)                                     # (F, L, K)
            if self.loss == "squared_hinge":
                per_row = torch.clamp(1 - self.T * S, min=0).pow(2).sum(-1)          # (F, L)
            else:
                per_row = torch.logsumexp(S, -1) - S.gather(-1, y[:, :, None]).squeeze(-1)
            penalty = reg * omega.pow(2).sum((1, 2))
            if self.loss == "squared_hinge":  # liblinear penalises the intercept (intercept_scaling=1)
                penalty = penalty + reg * b.pow(2).sum((1, 2))
            total = ((per_row * self.w).sum(1) + penalty).sum()
            total.backward()
            return total

        opt.step(objective)
        with torch.no_grad():
            return (u * scale).detach(), b.detach()[:, 0]

    def scores(self, state, f: int, rows) -> torch.Tensor:
        """Decision scores of fold ``f``'s model on rows of ``Xs``."""
        return self.Xs[f, rows] @ (self.V[f] @ state[0][f]) + state[1][f]

    def rotate(self, W: torch.Tensor, b: torch.Tensor):
        """A state (for ``solve``'s ``init``) from weights in the original basis, (F, D, K), (F, K)."""
        return torch.bmm(self.V.transpose(1, 2), W.to(self.V.dtype)), b.to(self.V.dtype)

    def weights(self, state) -> tuple[torch.Tensor, torch.Tensor]:
        """(W, b) in the original feature basis: (F, D, K), (F, K)."""
        return torch.bmm(self.V, state[0]), state[1]


def cv_scores_batched(X: np.ndarray, y: np.ndarray, splits, grid, classifier: str, norm: str,
                      device: str = "auto"):
    """Cross-validated accuracy of every C (rows) in every fold (columns), fitted all at once.

    Normalisation is fitted per fold on that fold's training rows only: ``standard`` uses each
    fold's own mean and standard deviation (as StandardScaler would); ``l2`` and ``power``
    are per-row and need no fitting. Returns (scores, out-of-fold predictions per C, and per C
    the folds' average weights ``(W (D, K), b (K,))`` in the standardised basis).
    """
    from cnncodes.pipelines.probes.classifiers import signed_sqrt
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
    problem = BatchedProblem(Xs, yt, masks, len(classes), loss)
    mean_weights = [None] * len(grid)  # per C, the folds' average: a warm start for the refit
    state = None
    for g in sorted(range(len(grid)), key=lambda g: grid[g]):
        state = problem.solve(grid[g], state, tol=CV_TOL)
        W, b = problem.weights(state)
        mean_weights[g] = (W.mean(0).cpu().numpy(), b.mean(0).cpu().numpy())
        with torch.no_grad():
            for f, (_, held) in enumerate(splits):
                pred = problem.scores(state, f, torch.as_tensor(held, device=dev)).argmax(-1).cpu().numpy()
                oof[g, held] = classes[pred]
                scores[g, f] = float((classes[pred] == y[held]).mean())
    return [scores[g] for g in range(len(grid))], oof, mean_weights


class TorchLinearClassifier(ClassifierMixin, BaseEstimator):
    """A linear SVM (squared hinge, one-vs-rest) or softmax classifier fitted with torch L-BFGS.

    A scikit-learn estimator (it passes ``parametrize_with_checks``); the grid search of
    :func:`pipelines.classifiers.fit_linear_probe` uses :class:`BatchedProblem` directly.

    Examples
    --------
    >>> clf = TorchLinearClassifier(loss="log_loss", C=0.1).fit(X, y)  # doctest: +SKIP

    ``init=(W, b)`` (shapes (n_features, n_classes) and (n_classes,)) starts the solver there
    instead of at zero: the grid search passes the folds' average solution at the chosen C.
    """

    def __init__(self, loss: str = "squared_hinge", C: float = 1.0, max_iter: int = 300,
                 tol: float = 1e-4, device: str = "cpu", init=None):
        self.loss = loss
        self.C = C
        self.max_iter = max_iter
        self.tol = tol
        self.device = device
        self.init = init

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
        problem = BatchedProblem(Xt[None], yt, torch.ones(1, len(yt), dtype=torch.bool, device=dev),
                                 len(self.classes_), self.loss)
        start = None
        if self.init is not None:  # (W (D, K), b (K,)), e.g. the cross-validation's solution
            W0, b0 = (torch.as_tensor(np.asarray(a), dtype=torch.float32, device=dev) for a in self.init)
            if W0.shape != (Xt.shape[1], len(self.classes_)) or b0.shape != (len(self.classes_),):
                raise ValueError(f"init must be (W, b) of shapes ({Xt.shape[1]}, {len(self.classes_)}) and "
                                 f"({len(self.classes_)},), got {tuple(W0.shape)} and {tuple(b0.shape)}.")
            start = problem.rotate(W0[None], b0[None])
        W, b = problem.weights(problem.solve(float(self.C), start, max_iter=self.max_iter, tol=self.tol))
        coef, intercept = W[0].T.cpu().numpy(), b[0].cpu().numpy()
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

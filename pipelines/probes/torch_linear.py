"""Linear classifiers fitted as batched tensor problems: every fold of the C grid in one solve.

scikit-learn fits one (fold, C) model at a time, in float64, on a copy of each fold's rows.
Here the M models of one C (the folds') are one parameter tensor and one L-BFGS problem whose
objective is the sum of the models' objectives; the models share nothing but the data, so the
sum is minimised by each model's own minimiser. The C grid is walked from strong to weak
regularisation with warm starts. Objectives match scikit-learn's up to a positive factor
1/(C n):

- ``squared_hinge`` (LinearSVC, one-vs-rest): mean_n sum_k max(0, 1 - t_nk s_nk)^2 + ||W||^2 / (2 C n)
- ``log_loss`` (multinomial LogisticRegression): mean_n CE(s_n, y_n) + ||W||^2 / (2 C n)

The intercept is penalised for the SVM (liblinear's convention, intercept_scaling=1) and not
for softmax (LogisticRegression's), so both solve exactly scikit-learn's problem.

Memory is bounded by the codes. No fold gets a copy of its rows: every model reads the one
n x D matrix, each through its own standardisation (folded into its weights) and with a weight
of zero on the rows it must not see, so one matrix product serves all models. Scores and
gradients are computed over blocks of rows, so nothing n x D is allocated besides the codes.
Gradients are written out by hand (two matrix products per block); no autograd graph is kept.

Two bases, chosen by shape:

- more rows than dimensions (*primal*): weights ``W = V (s * u)`` in the eigenbasis ``V`` of
  the standardised codes' second-moment matrix (estimated once, on a sample of rows) with
  ``s_i = (h lambda_i + 1 / (C n))^-1/2``. CNN codes are badly conditioned (eigenvalues spread
  over decades, repeated features), which makes L-BFGS crawl; in this basis the Hessian is
  close to the identity, while the L2 penalty stays the same (V is orthogonal).
- fewer training rows than dimensions (*dual*): the weights of an L2-regularised linear model
  lie in the span of its training rows (representer theorem), so each fold works in an
  orthonormal basis of its own rows' span, from the eigendecomposition of its n x n Gram
  matrix. The problem is then exactly the primal one on n_train-dimensional features:
  36 images of 31,360-d codes take megabytes, not a 31,360^2 eigendecomposition.
"""
from __future__ import annotations

import math
import os
import time

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.metaestimators import available_if
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from cnncodes.extractor.devices import resolve_device

LOSSES = ("squared_hinge", "log_loss")

# Curvature of the data term per unit of feature variance, used only to scale the
# preconditioner (a wrong guess costs a constant factor in conditioning, not correctness).
_CURVATURE = {"squared_hinge": 1.0, "log_loss": 0.1}

# Gradient tolerance of the cross-validation solves (the final refit uses the estimator's tol,
# 1e-4 by default, scikit-learn's). CV only ranks the C values; measured on the Caltech codes
# (1,515 x 1,280, 102 classes), 3e-4 instead of 1e-4 moves the CV accuracy of the chosen C by
# <= 0.07 points and any C by <= 0.3 points, and takes the softmax grid from 11.2 s to 6.0 s.
CV_TOL = 3e-4

# Rows sampled for the preconditioner's eigenbasis: it needs rough eigenvalues only, and the
# d x d second-moment matrix of 20,000 rows is as good as that of 500,000 for that.
PRECONDITION_ROWS = 20_000
# Above this width the eigenbasis (d^2 memory, d^3 time) costs more than it saves: the
# preconditioner is then the per-feature second moment alone.
EIGENBASIS_MAX_DIM = 4096
# Working memory of one block of rows (codes, scores and their gradients).
BLOCK_BYTES = 32 << 20


def _device(device: str) -> torch.device:
    # torch.linalg.eigh (the preconditioning) has no MPS kernel: CUDA or the CPU.
    return resolve_device(device, accelerators=("cuda",))


def _blocks(n: int, row_bytes: int):
    step = max(256, BLOCK_BYTES // max(1, row_bytes))
    return [slice(lo, min(n, lo + step)) for lo in range(0, n, step)]


def _loss_and_grad(loss: str, S: torch.Tensor, y: torch.Tensor, w: torch.Tensor):
    """Weighted data term of scores ``S`` (B, M, K) with labels ``y`` (B,) and row weights
    ``w`` (B, M); returns (value, dS)."""
    if loss == "squared_hinge":
        T = torch.full_like(S, -1.0)
        T.scatter_(2, y[:, None, None].expand(-1, S.shape[1], 1), 1.0)
        h = torch.clamp_(1 - T * S, min=0)
        value = (h.pow(2).sum(-1) * w).sum()
        return value, h.mul_(T).mul_(-2 * w[:, :, None])
    lse = torch.logsumexp(S, -1, keepdim=True)
    picked = S.gather(2, y[:, None, None].expand(-1, S.shape[1], 1))
    value = ((lse - picked)[..., 0] * w).sum()
    P = torch.exp_(S - lse)
    P.scatter_add_(2, y[:, None, None].expand(-1, S.shape[1], 1), torch.full_like(picked, -1.0))
    return value, P.mul_(w[:, :, None])


class SharedRows:
    """M models reading the same rows ``X`` (n, D), model m through ``(x - offset_m) / scale_m``,
    with weights in one shared orthonormal basis ``V`` (primal form).

    ``shift`` (M, D) is where the model's true input is centred off the offset, only needed
    for the SVM's penalised intercept: intercept = b - shift . W.
    """

    def __init__(self, X, offset, scale, V, lam, shift=None, center=None):
        self.X, self.offset, self.scale, self.V, self.lam = X, offset, scale, V, lam
        self.shift = shift
        self.M, self.D = offset.shape
        self.n = X.shape[0]
        # Blocks of rows are centred on ``center`` (the rows' mean) before the product, so a
        # feature with a large mean and a small spread keeps its float32 precision.
        self.center = center
        self._offset = offset if center is None else offset - center

    def _rows(self, blk: slice) -> torch.Tensor:
        return self.X[blk] if self.center is None else self.X[blk] - self.center

    def weights(self, omega):
        """(M, D, K) weights in the models' (standardised) input basis."""
        return omega if self.V is None else torch.matmul(self.V, omega)

    def predict(self, omega, b) -> torch.Tensor:
        """(n, M) index of the highest score of every row under every model."""
        A, beff = self._effective(omega, b)
        M, D, K = A.shape
        return torch.cat([self._block_scores(self._rows(blk), A, beff).argmax(-1)
                          for blk in _blocks(self.n, 4 * (D + 2 * M * K))])

    def _effective(self, omega, b):
        W = self.weights(omega)
        A = W / self.scale[:, :, None]                                 # weights on raw rows
        beff = b - torch.einsum("md,mdk->mk", self._offset, A)
        return A, beff

    def _block_scores(self, X, A, beff):
        M, D, K = A.shape
        S = X @ A.permute(1, 0, 2).reshape(D, M * K)
        return S.view(-1, M, K).add_(beff)

    def value_and_grad(self, omega, b, y, w, loss):
        """Data term summed over all rows and its gradient in (omega, b)."""
        M, D, K = omega.shape
        A, beff = self._effective(omega, b)
        gA = torch.zeros(D, M * K, dtype=A.dtype, device=A.device)
        gbeff = torch.zeros(M, K, dtype=A.dtype, device=A.device)
        total = torch.zeros((), dtype=torch.float64, device=A.device)
        for blk in _blocks(self.n, 4 * (D + 4 * M * K)):
            X = self._rows(blk)
            v, dS = _loss_and_grad(loss, self._block_scores(X, A, beff), y[blk], w[blk])
            total += v.double()
            gA.addmm_(X.T, dS.view(len(X), M * K))
            gbeff += dS.sum(0)
        gA = gA.view(D, M, K).permute(1, 0, 2) - self._offset[:, :, None] * gbeff[:, None, :]
        gW = gA / self.scale[:, :, None]
        gomega = gW if self.V is None else torch.matmul(self.V.transpose(1, 2), gW)
        return total, gomega, gbeff

    def intercept_shift(self, omega):
        """shift . W per model (M, K), or None."""
        if self.shift is None:
            return None
        return torch.einsum("md,mdk->mk", self.shift, self.weights(omega))


class FoldBases:
    """M models, each on features ``Phi[m]`` (n, r): the codes expressed in an orthonormal
    basis of model m's training rows (dual form); ``lam`` (M, r) their second moments."""

    def __init__(self, Phi, lam, intercept_in_basis: bool = False):
        self.Phi, self.lam = Phi, lam
        self.M, self.n, self.D = Phi.shape
        self.shift = None
        # the SVM's penalised intercept is a coordinate of the basis (rows augmented by a
        # constant 1), so the separate intercept stays 0
        self.intercept_in_basis = intercept_in_basis

    def scores(self, omega, b, rows: slice):
        return torch.baddbmm(b[:, None, :], self.Phi[:, rows], omega).permute(1, 0, 2)

    def predict(self, omega, b) -> torch.Tensor:
        return torch.cat([self.scores(omega, b, blk).argmax(-1)
                          for blk in _blocks(self.n, 4 * self.M * (self.D + 2 * omega.shape[2]))])

    def value_and_grad(self, omega, b, y, w, loss):
        M, D, K = omega.shape
        gomega = torch.zeros_like(omega)
        gb = torch.zeros_like(b)
        total = torch.zeros((), dtype=torch.float64, device=omega.device)
        for blk in _blocks(self.n, 4 * M * (D + 4 * K)):
            v, dS = _loss_and_grad(loss, self.scores(omega, b, blk), y[blk], w[blk])
            total += v.double()
            dS = dS.permute(1, 0, 2)                                    # (M, B, K)
            gomega.baddbmm_(self.Phi[:, blk].transpose(1, 2), dS)
            gb += dS.sum(1)
        if self.intercept_in_basis:
            gb.zero_()
        return total, gomega, gb

    def intercept_shift(self, omega):
        return None


class BatchedProblem:
    """Minimise M independent objectives (one per model) of one loss at one C at a time.

    ``design`` is a :class:`SharedRows` or :class:`FoldBases`; ``y`` (n,) class indices of
    every row; ``masks`` (M, n) which rows each model trains on.
    """

    def __init__(self, design, y: torch.Tensor, masks: torch.Tensor, n_classes: int,
                 loss: str = "squared_hinge"):
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}.")
        self.design, self.y, self.K, self.loss = design, y, n_classes, loss
        dt = design.lam.dtype
        self.n = masks.sum(1).to(dt)                                      # (M,) training rows per model
        self.w = (masks.to(dt) / self.n[:, None]).T.contiguous()          # (n, M) mean weights

    def solve(self, C: float, init=None, max_iter: int = 300, tol: float = 1e-4):
        """Minimise every model's objective at this C; ``init`` is a previous solution (warm
        start). Returns ``(omega, b)``: weights in the design's basis (M, D, K), intercepts (M, K)."""
        d = self.design
        M, D, K = d.M, d.D, self.K
        dt, dev = d.lam.dtype, d.lam.device
        reg = 1.0 / (2.0 * float(C) * self.n)                                      # (M,)
        if self.loss == "log_loss" and K == 2:
            # Two softmax columns split one logit's weights in halves (w1 = -w0 = w / 2 at the
            # optimum), so their penalty is half the binomial one: double it to solve
            # LogisticRegression's binary problem at this C.
            reg = 2 * reg
        scale = torch.rsqrt(_CURVATURE[self.loss] * d.lam + 2 * reg[:, None])[:, :, None]  # (M, D, 1)
        u0 = torch.zeros(M, D, K, dtype=dt, device=dev)
        b0 = torch.zeros(M, K, dtype=dt, device=dev)
        if init is not None:
            u0.copy_(init[0] / scale)
            b0.copy_(init[1])
        # liblinear penalises the intercept (unless it is a coordinate of the design's basis)
        penalise_b = self.loss == "squared_hinge" and not getattr(d, "intercept_in_basis", False)
        split = M * D * K

        def objective(z: torch.Tensor):
            u, b = z[:split].view(M, D, K), z[split:].view(M, K)
            omega = u * scale
            value, gomega, gb = d.value_and_grad(omega, b, self.y, self.w, self.loss)
            value = value + (reg * omega.pow(2).sum((1, 2))).sum()
            gomega = gomega + 2 * reg[:, None, None] * omega
            if penalise_b:
                shift = d.intercept_shift(omega)
                bt = b if shift is None else b - shift
                value = value + (reg * bt.pow(2).sum(1)).sum()
                gb = gb + 2 * reg[:, None] * bt
                if shift is not None:  # d(bt)/d(omega) through shift . V omega
                    g = -2 * reg[:, None, None] * d.shift[:, :, None] * bt[:, None, :]
                    gomega = gomega + (g if d.V is None else torch.matmul(d.V.transpose(1, 2), g))
            return float(value), torch.cat([(gomega * scale).reshape(-1), gb.reshape(-1)])

        # the history holds 2 x 20 vectors of every model's weights: fewer for very large models
        history = 20 if split <= 4_000_000 else 8
        with torch.no_grad(), _Threads():
            z, self.n_evaluations = lbfgs(objective, torch.cat([u0.reshape(-1), b0.reshape(-1)]),
                                          max_iter=max_iter, tol=tol, history=history)
            return z[:split].view(M, D, K) * scale, z[split:].view(M, K).clone()


def lbfgs(fun, x0: torch.Tensor, max_iter: int = 300, tol: float = 1e-4, history: int = 20,
          max_step_tries: int = 25):
    """Minimise ``fun(x) -> (value, gradient)`` from the flat tensor ``x0`` with L-BFGS.

    Stops when the largest gradient entry is <= ``tol`` (torch.optim.LBFGS's
    ``tolerance_grad``) or a step changes the value by less than ``tol * 1e-3``. The line
    search brackets a step meeting the weak Wolfe conditions by doubling and bisection (Lewis
    and Overton); in the preconditioned bases above the unit step is nearly always taken.
    Returns ``(x, evaluations)``.

    Written here rather than taken from torch.optim.LBFGS (the same method): its first step
    imports torch._dynamo, 1.3 s of every command's wall time, most of a small fit; and
    scipy's L-BFGS-B does float64 work on the host per step that costs more than the step.
    """
    c1, c2 = 1e-4, 0.9
    x = x0.clone()
    f, g = fun(x)
    evals = 1
    S, Y, rho = [], [], []
    for _ in range(max_iter):
        if float(g.abs().max()) <= tol:
            break
        q = g.neg()
        alphas = []
        for s, y, r in zip(reversed(S), reversed(Y), reversed(rho)):
            a = r * float(s @ q)
            q.add_(y, alpha=-a)
            alphas.append(a)
        if S:
            q.mul_(float(S[-1] @ Y[-1]) / float(Y[-1] @ Y[-1]))
        for (s, y, r), a in zip(zip(S, Y, rho), reversed(alphas)):
            q.add_(s, alpha=a - r * float(y @ q))
        gd = float(g @ q)
        if not gd < 0:  # not a descent direction (rounding): restart from the gradient
            S, Y, rho = [], [], []
            q, gd = -g, -float(g @ g)
        t = 1.0 if S else min(1.0, 1.0 / max(float(g.abs().sum()), 1e-30))
        lo, hi = 0.0, math.inf
        for _ in range(max_step_tries):
            xn = torch.add(x, q, alpha=t)
            fn, gn = fun(xn)
            evals += 1
            if not fn <= f + c1 * t * gd:          # too long (or not finite)
                hi = t
            elif float(gn @ q) < c2 * gd:          # too short
                lo = t
            else:
                break
            t = (lo + hi) / 2 if math.isfinite(hi) else 2 * t
        else:
            if not fn <= f:  # no acceptable step: stay at the best point found
                break
        s, y = xn - x, gn - g
        ys = float(y @ s)
        if ys > 1e-10 * float(y @ y):
            S.append(s)
            Y.append(y)
            rho.append(1.0 / ys)
            if len(S) > history:
                S.pop(0), Y.pop(0), rho.pop(0)
        done = abs(fn - f) < tol * 1e-3
        x, f, g = xn, fn, gn
        if done:
            break
    return x, evals


# --- building the designs -------------------------------------------------------------------

def _moments(X: torch.Tensor, masks: torch.Tensor):
    """Mean and standard deviation of each model's training rows, (M, D) each, accumulated
    over blocks in float64 around the first row (no n x D temporary)."""
    M, D = masks.shape[0], X.shape[1]
    ref = X[0].double()
    s1 = torch.zeros(M, D, dtype=torch.float64, device=X.device)
    s2 = torch.zeros_like(s1)
    for blk in _blocks(X.shape[0], 8 * D):
        Z = X[blk].double() - ref
        m = masks[:, blk].double()
        s1 += m @ Z
        s2 += m @ Z.pow(2)
    n = masks.sum(1, keepdim=True).double()
    mu = s1 / n
    var = torch.clamp(s2 / n - mu.pow(2), min=0)
    sd = torch.sqrt(var)
    sd = torch.where(sd < 10 * torch.finfo(X.dtype).eps * (1 + ref.abs()), torch.ones_like(sd), sd)
    return (mu + ref).to(X.dtype), sd.to(X.dtype)


def _eigenbases(X, masks, center, scale):
    """Per model m: eigenvalues (D,) and vectors (D, D) of the second moment of its training
    rows centred on their mean and divided by ``scale[m]``, estimated on a sample of rows (or
    the diagonal alone for very wide codes). Returns ``(lam (M, D), V (M, D, D) or None)``.

    One pass over the sample: rows are grouped by which models train on them (a K-fold split
    has K groups), each group's sums are taken once, and each model adds up its groups. Each
    model needs its own basis: a feature that is nearly constant in one fold is blown up by
    that fold's standardisation (sparse ReLU codes have many such), which a shared basis
    misses; measured on the digits' 1,280-d codes (1,437 rows), the SVM grid took 740 objective
    evaluations with one shared basis and 124 with one per fold."""
    M, n = masks.shape
    D = X.shape[1]
    rows = np.flatnonzero(masks.any(0).cpu().numpy())
    if len(rows) > PRECONDITION_ROWS:
        rows = np.sort(np.random.default_rng(0).choice(rows, PRECONDITION_ROWS, replace=False))
    rows_t = torch.as_tensor(rows, device=X.device)
    member = masks[:, rows_t].T                                                   # (rows, M)
    patterns, group = torch.unique(member, dim=0, return_inverse=True)
    G = len(patterns)
    wide = D > EIGENBASIS_MAX_DIM
    s1 = torch.zeros(G, D, dtype=torch.float64, device=X.device)
    s2 = torch.zeros(G, D, dtype=X.dtype, device=X.device) if wide else \
        torch.zeros(G, D, D, dtype=X.dtype, device=X.device)
    count = torch.bincount(group, minlength=G).to(torch.float64)
    for blk in _blocks(len(rows), 4 * D):
        Z = X[rows_t[blk]] - center
        gb = group[blk]
        s1.index_add_(0, gb, Z.double())
        for g in torch.unique(gb).tolist():
            Zg = Z[gb == g]
            if wide:
                s2[g] += Zg.pow(2).sum(0)
            else:
                s2[g].addmm_(Zg.T, Zg)
    sel = patterns.T.to(X.dtype)                                                  # (M, G)
    n_m = (patterns.T.double() @ count).clamp(min=1)                              # (M,)
    mean = ((patterns.T.double() @ s1) / n_m[:, None]).to(X.dtype)                # (M, D)
    if wide:
        m2 = (sel @ s2) / n_m[:, None].to(X.dtype) - mean.pow(2)
        return (m2 / scale.pow(2)).clamp(min=0), None
    C = (torch.einsum("mg,gij->mij", sel, s2) / n_m[:, None, None].to(X.dtype)
         - mean[:, :, None] * mean[:, None, :])
    C = C / (scale[:, :, None] * scale[:, None, :])
    lam, V = torch.linalg.eigh(C)
    # The preconditioner needs only rough eigenvalues, and V is orthogonal to float32
    # precision, so the rotated problem is the original one: no float64 needed.
    return lam.clamp(min=0), V


def shared_design(X: torch.Tensor, masks: torch.Tensor, standardise: bool) -> SharedRows:
    """Primal design: per-model standardisation (or none) and eigenbasis, one pass over the rows
    for every model."""
    anyrow = masks.any(0)
    mu, sd = _moments(X, torch.cat([masks, anyrow[None]]))
    if standardise:
        offset, scale, shift = mu[:-1], sd[:-1], None
    else:  # centre on the mean for conditioning; the true intercept is b - mean . W
        offset, scale = mu[:-1], torch.ones_like(sd[:-1])
        shift = mu[:-1]
    # the sample may include rows a model does not train on only through its own mask: each
    # model's basis is of its training rows
    lam, V = _eigenbases(X, masks, mu[-1], scale)
    return SharedRows(X, offset, scale, V, lam, shift, center=mu[-1])


def _column_blocks(D: int, n: int):
    step = max(64, BLOCK_BYTES // max(1, 4 * n))
    return [slice(lo, min(D, lo + step)) for lo in range(0, D, step)]


class _RowSpan:
    """An orthonormal basis of the span of one model's training rows ``Z = (x - offset) /
    scale`` (with a constant 1 appended when ``augment``: the penalised intercept as one more
    weight), kept as ``Q = Z_train^T U / sqrt(Lambda)`` without forming Z (n x D) or Q (D x r).
    """

    def __init__(self, X, train: torch.Tensor, offset, scale, augment: bool):
        self.X, self.train, self.offset, self.scale, self.augment = X, train, offset, scale, augment
        n, D = X.shape
        K = torch.full((n, len(train)), float(augment), dtype=X.dtype, device=X.device)  # Z . Z_train^T
        for cols in _column_blocks(D, n):
            Z = (X[:, cols] - offset[cols]) / scale[cols]
            K.addmm_(Z, Z[train].T)
        # float64 for the SVM's uncentred rows, whose mean swamps the smallest directions in
        # float32; centred rows (softmax) are well within float32's reach, and 3x faster
        G = K[train].double() if augment else K[train]
        lam, U = torch.linalg.eigh((G + G.T) / 2)
        keep = lam > lam.max().clamp(min=1e-30) * (len(train) * torch.finfo(X.dtype).eps)
        self.U = (U[:, keep] / lam[keep].sqrt()).to(X.dtype)               # (n_train, r)
        self.Phi = K @ self.U                                               # (n, r)
        self.lam = (lam[keep] / len(train)).to(X.dtype)                     # (r,) second moments

    def coordinates(self, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Coordinates (r, K) in this basis of weights ``W`` (D, K) on ``(x - offset) / scale``
        with the constant feature's weight ``b`` (K,) (used with ``augment``): the projection
        of the weights on the span (exact for weights inside it)."""
        D = self.X.shape[1]
        ZW = torch.zeros(len(self.train), W.shape[1], dtype=W.dtype, device=W.device)
        for cols in _column_blocks(D, len(self.train)):
            ZW += ((self.X[self.train, cols] - self.offset[cols]) / self.scale[cols]) @ W[cols]
        if self.augment:
            ZW += b
        return self.U.T @ ZW

    def weights(self, omega: torch.Tensor):
        """Weights (D, K) on ``(x - offset) / scale`` of coordinates ``omega`` (r, K), and the
        intercept carried by the constant feature (K,) (zeros without ``augment``)."""
        coef = self.U @ omega                                               # (n_train, K)
        D = self.X.shape[1]
        W = torch.empty(D, omega.shape[1], dtype=omega.dtype, device=omega.device)
        for cols in _column_blocks(D, len(self.train)):
            Z = (self.X[self.train, cols] - self.offset[cols]) / self.scale[cols]
            W[cols] = Z.T @ coef
        return W, coef.sum(0) if self.augment else torch.zeros_like(coef[0])


def dual_design(X: torch.Tensor, masks: torch.Tensor, standardise: bool, loss: str):
    """Dual design: each model in the span of its own training rows. Returns the design and
    the spans (to map a solution back to weights).

    Softmax's free intercept lets the rows be centred (the optimum's weights lie in the span
    of the centred rows, and centring conditions the problem); the SVM's penalised intercept
    cannot move, so its rows stay as the classifier sees them, with a constant 1 appended."""
    mu, sd = _moments(X, masks)
    svm = loss == "squared_hinge"
    spans = []
    for m in range(masks.shape[0]):
        off = torch.zeros_like(mu[m]) if svm and not standardise else mu[m]
        sc = sd[m] if standardise else torch.ones_like(sd[m])
        span = _RowSpan(X, torch.nonzero(masks[m])[:, 0], off, sc, augment=svm)
        span.shift = None if standardise or svm else mu[m]   # true intercept = b - shift . W
        spans.append(span)
    r = max(s.Phi.shape[1] for s in spans)
    Phi = torch.zeros(len(spans), X.shape[0], r, dtype=X.dtype, device=X.device)
    lam = torch.ones(len(spans), r, dtype=X.dtype, device=X.device)  # padding: inert coordinates
    for m, s in enumerate(spans):
        Phi[m, :, :s.Phi.shape[1]] = s.Phi
        lam[m, :s.Phi.shape[1]] = s.lam
        s.Phi = None
    return FoldBases(Phi, lam, intercept_in_basis=svm), spans


# The dual features of all models may take this much memory even where it exceeds the codes'.
DUAL_BYTES = 512 << 20


def make_design(X: torch.Tensor, masks: torch.Tensor, standardise: bool, loss: str):
    """The dual design when every model has fewer training rows than dimensions and the dual
    features (M x n x n_train) fit in the larger of the codes' size and ``DUAL_BYTES``, else
    the primal one. Returns (design, spans or None).

    Where both apply the dual is the cheaper: measured on the Caltech codes (1,515 x 1,280,
    102 classes, about 1,212 training rows per fold), the softmax grid took 8 s in the dual form
    and 14 s in the primal one, whose every step adds a D x D rotation per model."""
    n_train = int(masks.sum(1).max())
    dual_bytes = 4 * masks.shape[0] * X.shape[0] * n_train
    if n_train < X.shape[1] and dual_bytes <= max(X.numel() * X.element_size(), DUAL_BYTES):
        return dual_design(X, masks, standardise, loss)
    return shared_design(X, masks, standardise), None


def model_weights(design, spans, omega: torch.Tensor, b: torch.Tensor, m: int):
    """(W (D, K), intercept (K,)) of model m on its input (standardised, or as normalised)."""
    if spans is not None:
        span = spans[m]
        W, b_basis = span.weights(omega[m, :span.U.shape[1]])
        intercept = b[m] + b_basis
        return W, intercept if span.shift is None else intercept - span.shift @ W
    W = design.weights(omega[m:m + 1])[0]
    shift = design.intercept_shift(omega[m:m + 1])
    return W, b[m] if shift is None else b[m] - shift[0]


# --- the cross-validated path ------------------------------------------------------------------

def _running_elsewhere() -> int | None:
    """Threads of other processes running or ready to run now (Linux: /proc/loadavg's
    instantaneous count, less this process's own running threads), or None where unknown."""
    try:
        with open("/proc/loadavg") as f:
            running = int(f.read().split()[3].split("/")[0])
        ours = 0
        for task in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{task}/stat") as f:
                    ours += f.read().rsplit(")", 1)[1].split()[0] == "R"
            except OSError:  # the thread ended meanwhile
                pass
        return max(0, running - ours)
    except (OSError, ValueError, IndexError):
        return None


def threads_for_solver() -> int:
    """Intra-op threads for the solver: the cores this process may use, less those other
    programs keep busy right now (the median of three looks a few milliseconds apart).

    Why: a parallel step waits for its slowest thread, and a thread that shares a core with
    another program waits for the scheduler's time slice at every step. Measured on 2 cores
    with two busy processes beside it, the softmax grid on Caltech codes (1,515 x 1,280, 102
    classes) took 63 s with 2 threads and 19 s with 1 (7 s on the quiet machine)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    looks = []
    for i in range(3):
        if i:
            time.sleep(0.003)
        looks.append(_running_elsewhere())
    if None in looks:
        return max(1, min(cores, torch.get_num_threads()))
    # /proc/loadavg counts the whole machine: where this process may use only some of its cores
    # (affinity, a container's cpuset), expect its share of the others' running threads there
    share = cores / max(cores, os.cpu_count() or cores)
    return max(1, cores - round(sorted(looks)[1] * share))


class _Threads:
    """Run a block with ``threads_for_solver()`` intra-op threads, then restore the setting."""

    def __enter__(self):
        self.before = torch.get_num_threads()
        self.now = min(self.before, threads_for_solver())
        if self.now != self.before:  # setting it, even to the same number, restarts the pool
            torch.set_num_threads(self.now)
        return self

    def __exit__(self, *exc):
        if self.now != self.before:
            torch.set_num_threads(self.before)


def normalise_rows(X: np.ndarray, norm: str) -> np.ndarray:
    """``l2`` or ``power`` normalisation into a new float32 array, a block of rows at a time."""
    from cnncodes.pipelines.probes.classifiers import signed_sqrt
    out = np.empty(X.shape, dtype=np.float32)
    step = max(1, (16 << 20) // max(1, 4 * X.shape[1]))
    for lo in range(0, len(X), step):
        Z = np.asarray(X[lo:lo + step], dtype=np.float32)
        if norm == "power":
            Z = signed_sqrt(Z)
        out[lo:lo + step] = Z / np.maximum(np.linalg.norm(Z, axis=1, keepdims=True),
                                           np.finfo(np.float32).tiny)
    return out


class CVPath:
    """Cross-validation of a C grid with the batched solver, then the refit at a chosen C.

    Normalisation is fitted per fold on that fold's training rows only: ``standard`` uses each
    fold's own mean and standard deviation (as StandardScaler would); ``l2`` and ``power``
    are per-row and need no fitting.

    Examples
    --------
    >>> path = CVPath(X, y, splits, "softmax", "standard")              # doctest: +SKIP
    >>> scores, oof = path.run((0.01, 0.1, 1.0))                        # doctest: +SKIP
    >>> pipeline = path.refit(0.1)                                      # doctest: +SKIP
    """

    def __init__(self, X: np.ndarray, y: np.ndarray, splits, classifier: str, norm: str,
                 device: str = "auto"):
        self.dev = _device(device)
        self.classifier, self.norm = classifier, norm
        self.loss = "squared_hinge" if classifier == "svm" else "log_loss"
        self.classes, idx = np.unique(y, return_inverse=True)
        self.y_np, self.splits = y, splits
        if norm in ("l2", "power"):
            X = normalise_rows(X, norm)
        X = np.asarray(X, dtype=np.float32)
        self.X = torch.as_tensor(X if X.flags.c_contiguous else np.ascontiguousarray(X), device=self.dev)
        self.y = torch.as_tensor(idx, dtype=torch.long, device=self.dev)
        self.masks = torch.zeros(len(splits), len(y), dtype=torch.bool, device=self.dev)
        for f, (train, _) in enumerate(splits):
            self.masks[f, torch.as_tensor(train, device=self.dev)] = True
        self.mean_state = {}

    def run(self, grid):
        """Accuracy per C (list of arrays, one per fold) and out-of-fold predictions per C."""
        with _Threads():  # the setup too (moments, eigendecompositions), not only the solves
            return self._run(grid)

    def _run(self, grid):
        F, K = len(self.splits), len(self.classes)
        with torch.no_grad():
            self.design, self.spans = make_design(self.X, self.masks, self.norm == "standard", self.loss)
        problem = BatchedProblem(self.design, self.y, self.masks, K, self.loss)
        scores = np.zeros((len(grid), F))
        oof = np.empty((len(grid), len(self.y_np)), dtype=self.y_np.dtype)
        # All folds at once, one C at a time from strong to weak regularisation, each C starting
        # from the previous solution: batching the C values too makes every model wait for the
        # slowest (weakest-regularised) one; measured 2x slower than this on the Caltech codes.
        state = None
        for g in sorted(range(len(grid)), key=lambda g: grid[g]):
            state = problem.solve(grid[g], state, tol=CV_TOL)
            if self.spans is None:  # the folds' mean weights, a start for the refit at this C
                self.mean_state[grid[g]] = (self.design.weights(state[0]).mean(0), state[1].mean(0))
            else:                   # the same, from each fold's own basis
                fits = [model_weights(self.design, self.spans, *state, m) for m in range(F)]
                self.mean_state[grid[g]] = (torch.stack([w for w, _ in fits]).mean(0),
                                            torch.stack([c for _, c in fits]).mean(0))
            with torch.no_grad():
                pred = self.design.predict(*state).cpu().numpy()                 # (n, F)
            for f, (_, held) in enumerate(self.splits):
                oof[g, held] = self.classes[pred[held, f]]
                scores[g, f] = float((oof[g, held] == self.y_np[held]).mean())
        return [scores[g] for g in range(len(grid))], oof

    def refit(self, C: float, tol: float = 1e-4, max_iter: int = 300):
        """The fitted Pipeline (normalisation -> TorchLinearClassifier) on all rows at ``C``,
        started from the folds' average solution at that C."""
        from sklearn.pipeline import Pipeline
        if not hasattr(self, "design"):
            raise RuntimeError("CVPath.refit needs run() first (it reuses the path's basis and solutions).")
        with torch.no_grad(), _Threads():
            everything = torch.ones(1, len(self.y), dtype=torch.bool, device=self.dev)
            standard = self.norm == "standard"
            if self.spans is None:  # started from the folds' mean weights, in its own basis
                design, spans = shared_design(self.X, everything, standard), None
                init = self.mean_state.get(C)
                if init is not None:
                    V = design.V
                    W0 = init[0][None] if V is None else torch.matmul(V.transpose(1, 2), init[0])
                    init = (W0, init[1][None])
            else:
                design, spans = dual_design(self.X, everything, standard, self.loss)
                init = self.mean_state.get(C)
                if init is not None:  # (weights, true intercept) -> this basis' coordinates
                    span, (W0, c0) = spans[0], init
                    omega0 = torch.zeros(1, design.D, W0.shape[1], dtype=W0.dtype, device=W0.device)
                    omega0[0, :span.U.shape[1]] = span.coordinates(W0, c0)
                    b0 = torch.zeros_like(c0) if design.intercept_in_basis else \
                        (c0 if span.shift is None else c0 + span.shift @ W0)
                    init = (omega0, b0[None])
            problem = BatchedProblem(design, self.y, everything, len(self.classes), self.loss)
            omega, b = problem.solve(C, init, max_iter=max_iter, tol=tol)
            W, intercept = model_weights(design, spans, omega, b, 0)
            # the refit's standardisation, as its design computed it (no second pass over X)
            if spans is None:
                mu, sd = design.offset, design.scale
            else:
                mu, sd = spans[0].offset[None], spans[0].scale[None]
        clf = TorchLinearClassifier.from_weights(self.loss, C, self.classes, W.cpu().numpy(),
                                                 intercept.cpu().numpy(), max_iter=max_iter, tol=tol)
        return Pipeline(_norm_steps(self.norm, self.X.shape[1], mu, sd, len(self.y)) + [("clf", clf)])


def _norm_steps(norm: str, D: int, mu, sd, n: int) -> list:
    """``classifiers.normalisation_steps``, fitted: the scaler takes the moments the solver used
    (fitting it again would be another pass over the codes); the rest are stateless."""
    from cnncodes.pipelines.probes.classifiers import normalisation_steps
    steps = normalisation_steps(norm)
    for _, step in steps:
        if norm == "standard":
            step.mean_ = mu[0].double().cpu().numpy()
            step.scale_ = sd[0].double().cpu().numpy()
            step.var_ = step.scale_ ** 2
            step.n_samples_seen_, step.n_features_in_ = n, D
        else:
            step.fit(np.zeros((1, D)))
    return steps


class TorchLinearClassifier(ClassifierMixin, BaseEstimator):
    """A linear SVM (squared hinge, one-vs-rest) or softmax classifier fitted with torch L-BFGS.

    A scikit-learn estimator (it passes ``parametrize_with_checks``); the grid search of
    :func:`pipelines.classifiers.fit_linear_probe` uses :class:`CVPath` directly.

    Examples
    --------
    >>> clf = TorchLinearClassifier(loss="log_loss", C=0.1).fit(X, y)  # doctest: +SKIP
    """

    def __init__(self, loss: str = "squared_hinge", C: float = 1.0, max_iter: int = 300,
                 tol: float = 1e-4, device: str = "cpu"):
        self.loss = loss
        self.C = C
        self.max_iter = max_iter
        self.tol = tol
        self.device = device

    @classmethod
    def from_weights(cls, loss, C, classes, W: np.ndarray, intercept: np.ndarray, **params):
        """A fitted estimator of weights ``W`` (D, K) and ``intercept`` (K,) over ``classes``."""
        self = cls(loss=loss, C=C, **params)
        self.classes_ = np.asarray(classes)
        coef, intercept = np.asarray(W).T, np.asarray(intercept)
        if len(self.classes_) == 2:  # scikit-learn's binary convention: one row, positive class
            if loss == "squared_hinge":  # one-vs-rest of two classes: w0 = -w1, the positive one
                coef, intercept = coef[1:], intercept[1:]
            else:                        # the logit of class 1 against class 0
                coef, intercept = coef[1:] - coef[:1], intercept[1:] - intercept[:1]
        self.coef_, self.intercept_ = coef.astype(np.float64), intercept.astype(np.float64)
        self.n_features_in_ = coef.shape[1]
        self.n_iter_ = self.max_iter
        return self

    def fit(self, X, y):
        X, y = validate_data(self, X, y, dtype=[np.float32, np.float64])
        check_classification_targets(y)
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}.")
        if not self.C > 0:
            raise ValueError(f"C must be > 0, got {self.C!r}.")
        classes, idx = np.unique(y, return_inverse=True)
        if len(classes) < 2:
            raise ValueError(f"needs samples of at least 2 classes, got {len(classes)} class.")
        dev = _device(self.device)
        with torch.no_grad():
            Xt = torch.as_tensor(np.ascontiguousarray(X, dtype=np.float32), device=dev)
            yt = torch.as_tensor(idx, dtype=torch.long, device=dev)
            masks = torch.ones(1, len(yt), dtype=torch.bool, device=dev)
            design, spans = make_design(Xt, masks, standardise=False, loss=self.loss)
            problem = BatchedProblem(design, yt, masks, len(classes), self.loss)
            omega, b = problem.solve(float(self.C), max_iter=self.max_iter, tol=self.tol)
            W, intercept = model_weights(design, spans, omega, b, 0)
            evaluations = problem.n_evaluations
        fitted = self.from_weights(self.loss, self.C, classes, W.cpu().numpy(), intercept.cpu().numpy(),
                                   max_iter=self.max_iter, tol=self.tol, device=self.device)
        self.classes_, self.coef_, self.intercept_ = fitted.classes_, fitted.coef_, fitted.intercept_
        self.n_iter_ = evaluations  # objective evaluations of L-BFGS
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

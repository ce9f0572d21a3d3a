"""The dual design: each model in an orthonormal basis of its own training rows' span.

Fewer training rows than dimensions: the weights of an L2-regularised linear model lie in the
span of its training rows (representer theorem), so each fold works in an orthonormal basis of
its own rows' span, from the eigendecomposition of its n x n Gram matrix. The problem is then
exactly the primal one on n_train-dimensional features: 36 images of 31,360-d codes take
megabytes, not a 31,360^2 eigendecomposition.
"""
from __future__ import annotations

import numpy as np

from cnncodes.pipelines.probes.solver.backends import Ops
from cnncodes.pipelines.probes.solver.losses import loss_and_grad
from cnncodes.pipelines.probes.solver.rows import BLOCK_BYTES, moments, row_blocks


class FoldBases:
    """M models, each on features ``Phi[m]`` (n, r): the codes expressed in an orthonormal
    basis of model m's centred training rows (dual form); ``lam`` (M, r) their second moments.

    For the SVM (see :class:`_RowSpan`) the penalised part of the intercept is ``(b - shift .
    omega)`` with weight ``intercept_weight`` (M,), and a held-out row's score has one more
    term, that part times ``outside`` (M, n) (zero on the model's training rows)."""

    def __init__(self, ops: Ops, Phi, lam, shift=None, intercept_weight=None, outside=None):
        self.ops, self.Phi, self.lam = ops, Phi, lam
        self.M, self.n, self.D = Phi.shape
        self.V = None
        self.shift, self.intercept_weight, self.outside = shift, intercept_weight, outside

    def scores(self, omegaT, b, rows: slice):
        """(M, K, B) scores of the rows ``rows``; ``omegaT`` is omega (M, r, K) transposed."""
        return omegaT @ self.Phi[:, rows].swapaxes(1, 2) + b[:, :, None]

    def block_scores(self, omega, b):
        """``(rows, scores)`` over blocks of rows: the (M, K, B) scores of every model."""
        omegaT = self.ops.copy(omega.swapaxes(1, 2))
        part = None if self.outside is None else b - self.intercept_shift(omega)
        for blk in row_blocks(self.n, 4 * self.M * 2 * omega.shape[2]):  # Phi's rows are views
            S = self.scores(omegaT, b, blk)
            if part is not None:
                S += part[:, :, None] * self.outside[:, None, blk]
            yield blk, S

    def value_and_grad(self, omega, b, y, w, loss):
        ops = self.ops
        omegaT = ops.copy(omega.swapaxes(1, 2))
        gomega = ops.zeros(omega.shape, omega.dtype)
        gb = ops.zeros(b.shape, b.dtype)
        total = 0.0
        # a block's memory is its scores and the loss's temporaries (Phi's rows are views), and
        # fewer, larger products run faster (1,515 rows in one block against two: 8% here)
        for blk in row_blocks(self.n, 4 * self.M * 4 * omega.shape[2]):
            v, dS = loss_and_grad(ops, loss, self.scores(omegaT, b, blk), y[blk], w[:, blk])
            total += v
            gomega += self.Phi[:, blk].swapaxes(1, 2) @ dS.swapaxes(1, 2)
            gb += dS.sum(-1)
        return total, gomega, gb

    def intercept_shift(self, omega):
        """shift . omega per model (M, K), or None."""
        if self.shift is None:
            return None
        return (self.shift[:, None, :] @ omega)[:, 0, :]


def _column_blocks(D: int, n: int):
    step = max(64, BLOCK_BYTES // max(1, 4 * n))
    return [slice(lo, min(D, lo + step)) for lo in range(0, D, step)]


class _RowSpan:
    """An orthonormal basis of the span of one model's training rows, centred: ``Z = (x -
    offset) / scale`` with ``offset`` their mean, kept as ``Q = Z_train^T U / sqrt(Lambda)``
    without forming Z (n x D) or Q (D x r); every row's coordinates ``Z Q`` are written into
    ``into`` (n, >= r).

    The model's weights on its input are ``W = Q omega`` with a free intercept, except for the
    SVM, whose penalised intercept ``c`` makes the weights ``[W, c]`` lie in the span of the
    input rows with a constant 1 appended. With ``mean`` (the training rows' mean in the
    model's input, which is then ``Z + mean``), that span is parametrised so that the
    training rows' scores are ``Phi omega + b`` again, centred features and one offset:

        W = Q (omega - c p) + mean c,   c = (b - p . omega) / gap,   p = Q^T mean,
        gap = |mean|^2 - |p|^2 + 1,     penalty |W|^2 + c^2 = |omega|^2 + (b - p . omega)^2 / gap

    and a held-out row's score has the one more term ``c (Z . mean - Phi . p)``
    (``outside``), zero on the training rows. Why not the uncentred rows' own Gram matrix:
    where their mean dwarfs their spread, float32 keeps too few digits of it to see the
    spread's directions (measured: 300 x 600 rows of offset 100, the SVM objective came out
    960 against scikit-learn's 0.8), and its eigenbasis is badly conditioned. With ``exact``
    everything here is float64 (rows taken as given).
    """

    def __init__(self, ops: Ops, X, train, offset, scale, into, mean=None, exact: bool = False):
        self.ops, self.X, self.train = ops, X, train
        self.offset, self.scale, self.mean = offset, scale, mean
        self.shift = None    # softmax on uncentred input: true intercept = b - shift . W
        n, D = X.shape
        # ``exact``: the Gram matrix and its eigendecomposition in float64, for rows taken as
        # given (``--norm none``): one direction (the rows' common scale, say) may then dwarf
        # the others so far that float32 cannot see them (measured: rows a_i m + noise,
        # m ~ 1e4, a_i = 1 +- 10%, kept 25 of 39 directions and came 7.6% off the optimum; in
        # float64 all, 0.2%). Standardised or unit rows keep their spread within float32's
        # reach, and float64 costs them time (the 102-class SVM on unit rows: 11.9 -> 16.9 s).
        self.dt = dt = ops.f64 if exact else X.dtype
        inside = ops.zeros((n,), ops.bool_)
        inside[train] = True
        out = ops.flatnonzero(~inside)                                           # held-out rows
        nt, no = len(train), len(out)
        la = ops.linalg(nt, dt)           # the products in the library of the eigendecomposition
        G, K = la.zeros((nt, nt), dt), la.zeros((no, nt), dt)       # Z_train Z_train^T, Z_out Z_train^T
        if mean is not None:
            m64 = ops.astype(mean, ops.f64)
            zm = ops.zeros((n,), dt)                                             # Z . mean
        for cols in _column_blocks(D, n):
            Zt = self._z(train, cols)
            G = la.add_gram(G, Zt)
            if no:
                Zo = self._z(out, cols)
                K = la.add_cross(K, Zo, Zt)
            if mean is not None:
                mc = ops.astype(m64[cols], dt)[:, None]
                zm[train] += la.matmul(Zt, mc)[:, 0]
                if no:
                    zm[out] += la.matmul(Zo, mc)[:, 0]
        lam, U = la.eigh(G)
        keep = lam > max(float(lam.max()), 1e-30) * (nt * ops.eps(dt))
        lam, U = lam[keep], U[:, keep]
        self.U = U / lam ** 0.5                                                  # (n_train, r), in dt
        self.r = r = self.U.shape[1]
        # every row's Z Q, written into ``into`` (n, >= r, the codes' dtype): straight there, or
        # first in float64 (``exact``) for the mean's terms below
        direct = dt == X.dtype
        Phi = into[:, :r] if direct else ops.zeros((n, r), dt)
        Phi[train] = U * lam ** 0.5       # = G U / sqrt(lam): no product for the training rows
        if no:
            Phi[out] = la.matmul(K, self.U)
        self.lam = ops.astype(lam / nt, X.dtype)                                 # (r,) second moments
        if mean is not None:
            # the mean's terms cancel down to the rows' spread (Z . mean against Phi . p on the
            # training rows), in the span's precision: float64 for rows as given (``exact``)
            p = la.matmul(zm[train][None], self.U)[0]                            # Q^T mean
            p64 = ops.astype(p, ops.f64)
            self.gap = max(float(m64 @ m64) - float(p64 @ p64), 0.0) + 1.0
            self.p = p
            self.outside = ops.astype((zm - la.matmul(Phi, p[:, None])[:, 0]) / self.gap, X.dtype)
        if not direct:
            into[:, :r] = ops.astype(Phi, X.dtype)

    def _z(self, rows, cols):
        """The standardised rows ``rows`` (an index array: a copy) at columns ``cols``, in the
        span's precision: one new array, standardised in place."""
        ops, dt = self.ops, self.dt
        Z = ops.astype(self.X[rows, cols], dt)
        Z -= ops.astype(self.offset[cols], dt)
        Z /= ops.astype(self.scale[cols], dt)
        return Z

    def coordinates(self, W, c):
        """``(omega (r, K), b (K,))`` of weights ``W`` (D, K) on the model's input and its true
        intercept ``c`` (K,): the projection of the weights on the span (exact inside it)."""
        ops, out = self.ops, W.dtype
        W, c = ops.astype(W, self.dt), ops.astype(c, self.dt)
        ZW = ops.zeros((len(self.train), W.shape[1]), self.dt)
        for cols in _column_blocks(self.X.shape[1], len(self.train)):
            ZW += self._z(self.train, cols) @ W[cols]
        omega = self.U.T @ ZW                                                   # Q^T W
        if self.mean is not None:
            b = self.p @ omega + c * self.gap
        else:
            b = c if self.shift is None else c + ops.astype(self.shift, self.dt) @ W
        return ops.astype(omega, out), ops.astype(b, out)

    def weights(self, omega, b):
        """Weights (D, K) on the model's input and its true intercept (K,) of coordinates
        ``omega`` (r, K) and offset ``b`` (K,)."""
        ops = self.ops
        omega, b = ops.astype(omega, self.dt), ops.astype(b, self.dt)
        if self.mean is not None:
            c = (b - self.p @ omega) / self.gap
            omega = omega - self.p[:, None] * c[None]
        coef = self.U @ omega                                                   # (n_train, K)
        W = ops.zeros((self.X.shape[1], omega.shape[1]), self.dt)
        for cols in _column_blocks(self.X.shape[1], len(self.train)):
            W[cols] = self._z(self.train, cols).T @ coef
        if self.mean is not None:
            W += ops.astype(self.mean, self.dt)[:, None] * c[None]
            return W, c
        return W, b if self.shift is None else b - ops.astype(self.shift, self.dt) @ W


def dual_design(ops: Ops, X, masks, standardise: bool, loss: str, exact: bool = False):
    """Dual design: each model in the span of its own training rows. Returns the design and
    the spans (to map a solution back to weights).

    Softmax's free intercept lets the rows be centred (the optimum's weights lie in the span
    of the centred rows, and centring conditions the problem); the SVM's penalised intercept
    cannot move, so its span is of the rows as the classifier sees them, with a constant 1
    appended (see :class:`_RowSpan`)."""
    mu, sd = moments(ops, X, masks)
    svm = loss == "squared_hinge"
    M = masks.shape[0]
    # every model's coordinates, written in place by its span; columns past a model's rank
    # stay zero (inert, their second moment set to 1 below)
    Phi = ops.zeros((M, X.shape[0], int(masks.sum(1).max())), X.dtype)
    spans = []
    for m in range(M):
        sc = sd[m] if standardise else sd[m] * 0 + 1
        mean = None if not svm else (mu[m] * 0 if standardise else mu[m])    # input = Z + mean
        span = _RowSpan(ops, X, ops.flatnonzero(masks[m]), mu[m], sc, Phi[m], mean=mean, exact=exact)
        if not (standardise or svm):
            span.shift = mu[m]
        spans.append(span)
    r = max(s.r for s in spans)
    Phi = Phi[:, :, :r]   # a view: BLAS reads its rows with their stride
    lam = ops.full((M, r), 1.0, X.dtype)
    shift = ops.zeros((M, r), X.dtype) if svm else None
    for m, s in enumerate(spans):
        lam[m, :s.r] = s.lam
        if svm:
            shift[m, :s.r] = ops.astype(s.p, X.dtype)
    if not svm:
        return FoldBases(ops, Phi, lam), spans
    weight = ops.asarray(np.array([1.0 / s.gap for s in spans]), X.dtype)
    outside = ops.cat([s.outside[None] for s in spans])
    return FoldBases(ops, Phi, lam, shift=shift, intercept_weight=weight, outside=outside), spans

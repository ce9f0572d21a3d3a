"""The primal design: M models reading the same rows, each through its own standardisation.

More rows than dimensions: weights ``W = V (s * u)`` in the eigenbasis ``V`` of the
standardised codes' second-moment matrix (estimated once, on a sample of rows) with
``s_i = (h lambda_i + 1 / (C n))^-1/2``. CNN codes are badly conditioned (eigenvalues spread
over decades, repeated features), which makes L-BFGS crawl; in this basis the Hessian is
close to the identity, while the L2 penalty stays the same (V is orthogonal).
"""
from __future__ import annotations

import numpy as np

from cnncodes.pipelines.probes.solver.backends import Ops
from cnncodes.pipelines.probes.solver.losses import loss_and_grad
from cnncodes.pipelines.probes.solver.rows import moments, row_blocks

# Rows sampled for the preconditioner's eigenbasis: it needs rough eigenvalues only, and the
# d x d second-moment matrix of 20,000 rows is as good as that of 500,000 for that.
PRECONDITION_ROWS = 20_000
# Above this width the eigenbasis (d^2 memory, d^3 time) costs more than it saves: the
# preconditioner is then the per-feature second moment alone.
EIGENBASIS_MAX_DIM = 4096
# Blocks of rows are centred before the products where a feature's mean exceeds this many
# standard deviations (float32 keeps about 7 digits of x . w, whose terms grow with the mean).
CENTRE_ABOVE = 8.0


class SharedRows:
    """M models reading the same rows ``X`` (n, D), model m through ``(x - offset_m) / scale_m``,
    with weights in one orthonormal basis ``V`` per model (primal form).

    ``shift`` (M, D) is where the model's true input is centred off the offset, only needed
    for the SVM's penalised intercept: intercept = b - shift . W.
    """

    intercept_weight = None   # the penalised intercept's penalty weighs as the weights'

    def __init__(self, ops: Ops, X, offset, scale, V, lam, shift=None, center=None):
        self.ops, self.X, self.offset, self.scale, self.V, self.lam = ops, X, offset, scale, V, lam
        self.shift = shift
        self.M, self.D = offset.shape
        self.n = X.shape[0]
        # Blocks of rows are centred on ``center`` (the rows' mean) before the product where a
        # feature's mean is large against its spread, so that it keeps its float32 precision.
        self.center = center
        self._offset = offset if center is None else offset - center

    def _rows(self, blk: slice):
        return self.X[blk] if self.center is None else self.X[blk] - self.center

    def weights(self, omega):
        """(M, D, K) weights in the models' (standardised) input basis."""
        return self.rotate(omega)

    def rotate(self, x, back: bool = False):
        """``V_m x_m`` (``V_m^T x_m`` with ``back``) of every model's (D, K) block of ``x``.
        With one basis for all models (V of shape (D, D)) that is one product for all of them:
        V is read once, not M times (measured 0.46 of 2.8 s on Caltech's 1,280-d codes)."""
        V = self.V
        if V is None:
            return x
        if V.ndim == 3:
            return (V.swapaxes(1, 2) if back else V) @ x
        M, D, K = x.shape
        flat = self.ops.permute(x, (1, 0, 2)).reshape(D, M * K)
        return self.ops.permute(((V.T if back else V) @ flat).reshape(D, M, K), (1, 0, 2))

    def block_scores(self, omega, b):
        """``(rows, scores)`` over blocks of rows: the (M, K, B) scores of every model."""
        A, beff = self._effective(omega, b)
        for blk in row_blocks(self.n, 4 * (self.D + 2 * self.M * omega.shape[2])):
            yield blk, self._block_scores(self._rows(blk), A, beff)

    def _effective(self, omega, b):
        """The weights on the raw rows, laid out (M * K, D) for one product, and the intercepts."""
        A = self.weights(omega) / self.scale[:, :, None]
        M, D, K = A.shape
        beff = b - (self._offset[:, None, :] @ A)[:, 0, :]
        return self.ops.permute(A, (0, 2, 1)).reshape(M * K, D), beff[:, :, None]

    def _block_scores(self, X, A, beff):
        return (A @ X.T).reshape(self.M, -1, len(X)) + beff                 # (M, K, B)

    def value_and_grad(self, omega, b, y, w, loss):
        """Data term summed over all rows and its gradient in (omega, b)."""
        ops = self.ops
        M, D, K = omega.shape
        A, beff = self._effective(omega, b)
        gA = ops.zeros((M * K, D), A.dtype)
        gbeff = ops.zeros((M, K), A.dtype)
        total = 0.0
        for blk in row_blocks(self.n, 4 * (D + 4 * M * K)):
            X = self._rows(blk)
            v, dS = loss_and_grad(ops, loss, self._block_scores(X, A, beff), y[blk], w[:, blk])
            total += v
            gA += dS.reshape(M * K, len(X)) @ X
            gbeff += dS.sum(-1)
        gA = ops.permute(gA.reshape(M, K, D), (0, 2, 1)) - self._offset[:, :, None] * gbeff[:, None, :]
        gW = gA / self.scale[:, :, None]
        gomega = self.rotate(gW, back=True)
        return total, gomega, gbeff

    def intercept_shift(self, omega):
        """shift . W per model (M, K), or None."""
        if self.shift is None:
            return None
        return (self.shift[:, None, :] @ self.weights(omega))[:, 0, :]


def _eigenbases(ops: Ops, X, masks, center, scale, shared: bool = False):
    """Per model m: eigenvalues (D,) and vectors (D, D) of the second moment of its training
    rows centred on their mean and divided by ``scale[m]``, estimated on a sample of rows (or
    the diagonal alone for very wide codes). Returns ``(lam (M, D), V (M, D, D) or None)``.

    One pass over the sample: rows are grouped by which models train on them (a K-fold split
    has K groups), each group's sums are taken once, and each model adds up its groups. Each
    model needs its own basis: a feature that is nearly constant in one fold is blown up by
    that fold's standardisation (sparse ReLU codes have many such), which a shared basis
    misses; measured on the digits' 1,280-d codes (1,437 rows), the SVM grid took 740 objective
    evaluations with one shared basis and 124 with one per fold.

    ``shared``: one basis and its eigenvalues for all models, of the second moment of all the
    sampled rows in the models' mean scale (one eigendecomposition instead of M). Good enough
    for softmax, whose curvature is spread over all rows: measured on Caltech's 1,280-d codes
    with 10 merged classes, the same evaluations (126 against 125) in 1.7 s against 2.5 s, and
    on the digits' 1,280-d codes 143 against 142; not for the SVM, whose curvature is on the
    rows inside the margin (digits 1,280-d: 278 evaluations against 155)."""
    D = X.shape[1]
    rows = np.flatnonzero(ops.to_numpy(masks.any(0)))
    if len(rows) > PRECONDITION_ROWS:
        rows = np.sort(np.random.default_rng(0).choice(rows, PRECONDITION_ROWS, replace=False))
    rows_t = ops.asarray(rows)
    patterns, group = ops.unique_rows(masks[:, rows_t].T)                       # (G, M), (rows,)
    G = len(patterns)
    wide = D > EIGENBASIS_MAX_DIM
    s1 = ops.zeros((G, D), ops.f64)
    s2 = ops.zeros((G, D) if wide else (G, D, D), X.dtype)
    count = ops.astype(ops.bincount(group, G), ops.f64)
    for blk in row_blocks(len(rows), 4 * D):
        Z = X[rows_t[blk]] - center
        gb = group[blk]
        for g in range(G):
            Zg = Z[gb == g]
            if len(Zg):
                s1[g] += ops.astype(Zg, ops.f64).sum(0)
                s2[g] += (Zg * Zg).sum(0) if wide else Zg.T @ Zg
    if shared and not wide and masks.shape[0] > 1:  # the second moment of all rows, in the mean scale
        n_all = float(count.sum())
        mean = ops.astype(s1.sum(0) / n_all, X.dtype)
        sc = scale.mean(0)
        C = (s2.sum(0) / n_all - mean[:, None] * mean[None, :]) / (sc[:, None] * sc[None, :])
        lam, V = ops.eigh(C)
        return ops.expand(ops.maximum(lam, 0.0), (masks.shape[0], D)), V                  # V: (D, D)
    member = ops.astype(patterns.T, ops.f64)                                      # (M, G)
    n_m = ops.maximum(member @ count, 1.0)                                        # (M,)
    mean = ops.astype((member @ s1) / n_m[:, None], X.dtype)                      # (M, D)
    sel, n_m = ops.astype(member, X.dtype), ops.astype(n_m, X.dtype)
    if wide:
        m2 = (sel @ s2) / n_m[:, None] - mean * mean
        return ops.maximum(m2 / (scale * scale), 0.0), None
    C = ((sel @ s2.reshape(G, D * D)).reshape(-1, D, D) / n_m[:, None, None]
         - mean[:, :, None] * mean[:, None, :])
    C = C / (scale[:, :, None] * scale[:, None, :])
    lam, V = ops.eigh(C)
    # The preconditioner needs only rough eigenvalues, and V is orthogonal to float32
    # precision, so the rotated problem is the original one: no float64 needed.
    return ops.maximum(lam, 0.0), V


def shared_design(ops: Ops, X, masks, standardise: bool, shared_basis: bool = False) -> SharedRows:
    """Primal design: per-model standardisation (or none) and eigenbasis (one for all models
    with ``shared_basis``), one pass over the rows for every model."""
    mu, sd = moments(ops, X, ops.cat([masks, masks.any(0)[None]]))
    if standardise:
        offset, scale, shift = mu[:-1], sd[:-1], None
    else:  # centre on the mean for conditioning; the true intercept is b - mean . W
        offset, scale = mu[:-1], sd[:-1] * 0 + 1
        shift = mu[:-1]
    lam, V = _eigenbases(ops, X, masks, mu[-1], scale, shared=shared_basis)
    # centring every block of rows costs a copy of it: only where some feature's mean is large
    # against its spread does float32 need it (measured: features of mean 1e4 and spread 1)
    far = float(abs(mu[-1] / sd[-1]).max()) > CENTRE_ABOVE
    return SharedRows(ops, X, offset, scale, V, lam, shift, center=mu[-1] if far else None)

"""Narrow codes' SVMs by Newton's method: every fold and class of one C in a few steps.

The squared-hinge SVM's objective is piecewise quadratic, so Newton's method (with the
Hessian of the rows inside the margin, Mangasarian 2002's generalised Newton, which is
liblinear's primal solver too) reaches its optimum in a handful of steps, where L-BFGS takes
hundreds at weak regularisation on narrow codes: measured on Caltech's 16-d codes with 102
classes (1,515 rows, five folds, C up to 100), the L-BFGS grid took 5.5 s. The Hessians of
all M x K one-vs-rest problems are one matrix product, the rows' weights inside each margin
times the rows' outer products (n x (D+1)^2), so this pays only for narrow codes: its cost
per step grows as D^2 where an L-BFGS step's grows as D (``NEWTON_MAX_DIM``).

Each (fold, class) problem takes its own step length (a backtracking line search per
problem), so no problem waits for the slowest one as in the summed L-BFGS objective.

Parameters are the weights on the raw rows centred on ``center`` (the mean of the rows any
model sees) with the intercept last: ``theta`` (M, K, D + 1). The penalty is the model's own,
``|W|^2 + b^2`` of its weights ``W`` on its input (standardised or not) and its intercept,
a quadratic form ``theta^T P theta`` per model. numpy only (the CPU path; CUDA keeps L-BFGS).
"""
from __future__ import annotations

import numpy as np

from cnncodes.pipelines.probes.solver.rows import row_blocks

# Widest codes solved by Newton's method; wider ones go to L-BFGS. Measured on this 2-core
# machine (Lite0 codes, five folds, C grid 1e-4 .. 1e2, grid and refit), Newton against L-BFGS:
# Caltech 16-d, 102 classes: 0.81 s against 2.3 s; 40-d, 10 merged classes: 0.17 against
# 0.11 s; digits 40-d, 10 classes: 0.30 against 0.40 s; 112-d, 10 classes: 2.0 against 0.21 s;
# 112-d, 102 classes: 19.8 against 2.2 s.
NEWTON_MAX_DIM = 48
# The rows' outer products are kept between steps when they take no more than this.
XX_KEEP_BYTES = 64 << 20


class NewtonSVM:
    """M models' one-vs-rest squared-hinge SVMs (liblinear's penalised intercept) on the rows
    ``X`` (n, D), model m training on the rows of ``masks[m]``; ``mu``, ``sd`` (M, D) the
    models' training means and deviations, used when ``standardise``; ``row_weights`` (M, n)
    multiply each row's loss (class weights), as they do in :class:`~.problem.BatchedProblem`."""

    def __init__(self, X: np.ndarray, y: np.ndarray, masks: np.ndarray, n_classes: int,
                 mu: np.ndarray, sd: np.ndarray, standardise: bool, row_weights: np.ndarray | None = None):
        self.X, self.y, self.K = X, np.asarray(y), n_classes
        masks = np.asarray(masks)
        self.M, self.n = masks.shape
        self.D = D = X.shape[1]
        self.n_m = masks.sum(1).astype(np.float64)
        self.w = masks / self.n_m[:, None]                                      # (M, n) mean weights
        if row_weights is not None:                                             # class weights
            self.w = self.w * row_weights
        mu, sd = np.asarray(mu, np.float64), np.asarray(sd, np.float64)
        # any centre is exact; one near every model's mean keeps the float32 Hessian accurate
        self.center = (mu * self.n_m[:, None]).sum(0) / self.n_m.sum()
        # the model's input is (x - mu0) / sigma: weights W = a sigma, intercept b = theta_D - a . e
        self.mu0 = mu if standardise else np.zeros_like(mu)
        self.sigma = sd if standardise else np.ones_like(sd)
        self.e = self.center - self.mu0                                         # (M, D)
        P = np.zeros((self.M, D + 1, D + 1))
        P[:, :D, :D] = self.e[:, :, None] * self.e[:, None, :]
        P[:, np.arange(D), np.arange(D)] += self.sigma ** 2
        P[:, :D, D] = P[:, D, :D] = -self.e
        P[:, D, D] = 1.0
        self.P = P
        # blocks of rows as the other designs'
        self.blocks = row_blocks(self.n, 8 * 4 * self.M * n_classes + 4 * (D + 1) ** 2 + 16 * (D + 1))
        # the Hessians are symmetric: only the upper triangle's (D+1)(D+2)/2 entries of each
        # row's outer product are multiplied (measured: the 40-d digits SVM grid and refit,
        # 0.24-0.29 -> 0.20 s)
        self._upper = np.triu_indices(D + 1)
        self._xx = [] if self.n * 4 * len(self._upper[0]) <= XX_KEEP_BYTES else None

    def _rows(self, blk: slice) -> np.ndarray:
        """The block's rows centred, with a constant 1 appended, in float64 (B, D + 1)."""
        Z = np.empty((blk.stop - blk.start, self.D + 1))
        Z[:, :self.D] = self.X[blk]
        Z[:, :self.D] -= self.center
        Z[:, self.D] = 1.0
        return Z

    def _outer(self, i: int, Z: np.ndarray) -> np.ndarray:
        """The upper triangles of the block's rows' outer products (B, (D+1)(D+2)/2) in float32,
        kept where small."""
        if self._xx is not None and i < len(self._xx):
            return self._xx[i]
        Zf = Z.astype(np.float32)
        r, c = self._upper
        XX = Zf[:, r] * Zf[:, c]
        if self._xx is not None:
            self._xx.append(XX)
        return XX

    def _margins(self, Theta: np.ndarray, Z: np.ndarray, blk: slice):
        """Signs (K, B) and hinge values ``max(0, 1 - t s)`` (M, K, B) of a block."""
        t = np.where(self.y[blk][None, :] == np.arange(self.K)[:, None], 1.0, -1.0)
        S = (Theta.reshape(-1, self.D + 1) @ Z.T).reshape(self.M, self.K, -1)
        S *= -t
        S += 1.0
        return t, np.maximum(S, 0.0, out=S)

    def _penalty(self, theta: np.ndarray, reg: np.ndarray):
        Ptheta = np.einsum("mde,mke->mkd", self.P, theta)
        return reg[:, None] * (theta * Ptheta).sum(-1), 2 * reg[:, None, None] * Ptheta

    def value(self, theta: np.ndarray, reg: np.ndarray) -> np.ndarray:
        """Every problem's objective (M, K)."""
        F = self._penalty(theta, reg)[0]
        for blk in self.blocks:
            _, h = self._margins(theta, self._rows(blk), blk)
            F += np.einsum("mkb,mb->mk", h * h, self.w[:, blk])
        return F

    def _derivatives(self, theta: np.ndarray, reg: np.ndarray):
        M, K, D1 = self.M, self.K, self.D + 1
        F, G = self._penalty(theta, reg)
        G = G.reshape(M * K, D1)
        H = np.zeros((M * K, len(self._upper[0])), dtype=np.float32)
        for i, blk in enumerate(self.blocks):
            Z = self._rows(blk)
            t, h = self._margins(theta, Z, blk)
            wb = self.w[:, None, blk]                                          # (M, 1, B)
            F += np.einsum("mkb,mkb->mk", h * h, np.broadcast_to(wb, h.shape))
            G += ((-2.0 * wb) * t * h).reshape(M * K, -1) @ Z
            A = ((2.0 * wb) * (h > 0)).astype(np.float32).reshape(M * K, -1)  # curvature per row
            H += A @ self._outer(i, Z)
        r, c = self._upper
        full = np.empty((M * K, D1, D1))
        full[:, r, c] = H
        full[:, c, r] = H
        H = full.reshape(M, K, D1, D1) + 2 * reg[:, None, None, None] * self.P[:, None]
        return F, G.reshape(M, K, D1), H

    def solve(self, C: float, init=None, tol: float = 1e-4, max_iter: int = 100) -> np.ndarray:
        """``theta`` (M, K, D + 1) minimising every problem at this C (from ``init``, a warm start).

        A problem is done when its Newton decrement ``g^T H^-1 g`` is at most ``tol^2``: its
        gradient's size in the Hessian's own metric, where L-BFGS's ``tol`` bounds the
        gradient's largest entry in a basis whose Hessian is about the identity."""
        reg = 1.0 / (2.0 * float(C) * self.n_m)
        theta = np.zeros((self.M, self.K, self.D + 1)) if init is None else np.array(init, np.float64)
        self.n_steps = 0
        for _ in range(max_iter):
            F, G, H = self._derivatives(theta, reg)
            delta = -np.linalg.solve(H, G[..., None])[..., 0]
            dec = -(G * delta).sum(-1)                                          # (M, K)
            todo = dec > tol * tol
            if not todo.any():
                break
            self.n_steps += 1
            step = np.where(todo, 1.0, 0.0)
            for _ in range(40):  # backtracking (Armijo) per problem
                Ft = self.value(theta + step[..., None] * delta, reg)
                bad = todo & ~(Ft <= F - 1e-4 * step * dec)
                if not bad.any():
                    break
                step = np.where(bad, step / 2, step)
            else:
                step = np.where(bad, 0.0, step)
            if not step.any():
                break
            theta = theta + step[..., None] * delta
        return theta

    def block_scores(self, theta: np.ndarray):
        """``(rows, scores)`` over blocks of rows: the (M, K, B) scores of every model."""
        for blk in self.blocks:
            yield blk, (theta.reshape(-1, self.D + 1) @ self._rows(blk).T).reshape(self.M, self.K, -1)

    def weights(self, theta: np.ndarray, m: int):
        """(W (D, K), intercept (K,)) of model m on its input (standardised, or as given)."""
        a = theta[m, :, :self.D].T                                              # (D, K) on raw rows
        return a * self.sigma[m][:, None], theta[m, :, self.D] - self.e[m] @ a

    def start(self, W: np.ndarray, intercept: np.ndarray, m: int = 0) -> np.ndarray:
        """``theta`` (1, K, D + 1) of model m from its weights on its input and its intercept."""
        a = np.asarray(W, np.float64) / self.sigma[m][:, None]
        theta = np.empty((1, self.K, self.D + 1))
        theta[0, :, :self.D] = a.T
        theta[0, :, self.D] = np.asarray(intercept, np.float64) + self.e[m] @ a
        return theta

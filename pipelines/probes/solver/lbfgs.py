"""L-BFGS on flat arrays of either backend (numpy or torch), written for the batched problems."""
from __future__ import annotations

import math

import numpy as np


def lbfgs(fun, x0, max_iter: int = 300, tol: float = 1e-4, history: int = 20, max_step_tries: int = 25,
          first=None, first_step: float | None = None):
    """Minimise ``fun(x) -> (value, gradient)`` from the flat array ``x0`` (numpy or torch) with
    L-BFGS.

    Stops when the largest gradient entry is <= ``tol`` (torch.optim.LBFGS's
    ``tolerance_grad``) or a step changes the value by less than ``tol * 1e-3``. The line
    search brackets a step meeting the weak Wolfe conditions by doubling and bisection (Lewis
    and Overton); in the preconditioned bases of the designs the unit step is nearly always taken.
    ``first`` is ``fun(x0)`` where already known. The first step is along the gradient, of
    length ``first_step`` or, by default, ``min(1, 1 / |g|_1)`` (scipy's and torch's guess for
    a problem of unknown scale). Returns ``(x, evaluations)``.

    The direction is the compact form of the L-BFGS matrix (Byrd, Nocedal and Schnabel 1994),
    the same direction as the two-loop recursion: the pairs live as rows of two matrices, so a
    direction costs four matrix-vector products (BLAS, on every core) instead of 4 x history
    passes over vectors in Python; measured on 618,000 weights, 2.5 s of a 12 s fit before.

    Written here rather than taken from a library: scipy's L-BFGS-B works in float64 on the
    host, which costs more than the step here, and torch.optim.LBFGS needs torch (and imports
    torch._dynamo on its first step, 1.3 s); this one runs on either backend's arrays.
    """
    c1, c2 = 1e-4, 0.9
    x = x0 + 0
    f, g = fun(x) if first is None else first
    evals = 0 if first is not None else 1
    h, N = history, x.shape[0]
    # the pairs as rows of one matrix, s_i in [:h] and y_i in [h:], so that the products of
    # all of them with a vector are one pass over the history (the step is memory-bound:
    # measured 2.8 s of a 14 s fit with 618,000 weights when it took seven passes)
    SYb = np.zeros((2 * h, N), x0.dtype) if isinstance(x0, np.ndarray) else x0.new_zeros((2 * h, N))
    # s_i . y_j for i older than j (the upper triangle in the pairs' order) and y_i . y_j, by slot
    SY, YY = np.zeros((h, h)), np.zeros((h, h))
    ug, wg = np.zeros(h), np.zeros(h)     # S g and Y g at the current point
    order: list[int] = []                 # slots, oldest pair first
    host = (lambda v: np.asarray(v, dtype=np.float64)) if isinstance(x0, np.ndarray) else \
        (lambda v: v.double().cpu().numpy())
    for _ in range(max_iter):
        if float(abs(g).max()) <= tol:
            break
        if order:
            o = np.array(order)
            cs, cy = np.zeros(h), np.zeros(h)
            sy = SY[np.ix_(o, o)]
            R, last = np.triu(sy), order[-1]
            gamma = float(SY[last, last] / YY[last, last])
            Ru = _solve_upper(R, ug[o])
            middle = np.diag(np.diag(sy)) + gamma * YY[np.ix_(o, o)]
            cs[o] = _solve_upper(R.T, middle @ Ru - gamma * wg[o], lower=True)
            cy[o] = -gamma * Ru
            q = -(gamma * g + _as(np.concatenate([cs, cy]), SYb) @ SYb)
        else:
            q = -g
        gd = float(g @ q)
        if not gd < 0:  # not a descent direction (rounding): restart from the gradient
            order = []
            q, gd = -g, -float(g @ g)
        t = 1.0 if order else first_step or min(1.0, 1.0 / max(float(abs(g).sum()), 1e-30))
        lo, hi = 0.0, math.inf
        for _ in range(max_step_tries):
            xn = x + t * q
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
        both = host(SYb @ gn)                      # S gn and Y gn: the next direction needs them
        ugn, wgn = both[:h], both[h:]
        s, y = xn - x, gn - g
        ys, yy = float(y @ s), float(y @ y)
        if ys > 1e-10 * yy:
            k = order.pop(0) if len(order) == h else next(i for i in range(h) if i not in order)
            # the new pair's products with the others from vectors already known: S y = S gn - S g
            SY[:, k] = ugn - ug                    # s_i . y_k
            YY[k, :] = YY[:, k] = wgn - wg
            SY[k, k], YY[k, k] = ys, yy
            SYb[k], SYb[h + k] = s, y
            ugn[k], wgn[k] = float(s @ gn), float(y @ gn)
            order.append(k)
        done = abs(fn - f) < tol * 1e-3
        x, f, g, ug, wg = xn, fn, gn, ugn, wgn
        if done:
            break
    return x, evals


def _solve_upper(R: np.ndarray, b: np.ndarray, lower: bool = False) -> np.ndarray:
    """x with R x = b for a small triangular R (back or forward substitution)."""
    n = len(b)
    x = np.zeros(n)
    for i in (range(n) if lower else range(n - 1, -1, -1)):
        rest = R[i, :i] @ x[:i] if lower else R[i, i + 1:] @ x[i + 1:]
        x[i] = (b[i] - rest) / R[i, i]
    return x


def _as(v: np.ndarray, like):
    """A small float64 host vector as an array of ``like``'s kind, dtype and device."""
    if isinstance(like, np.ndarray):
        return v.astype(like.dtype)
    import torch
    return torch.as_tensor(v, dtype=like.dtype, device=like.device)

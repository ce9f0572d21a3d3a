"""The two losses (``LOSSES``: LinearSVC's one-vs-rest squared hinge, multinomial
LogisticRegression's cross-entropy) as the data term of a block of rows' scores, with its
gradient; the penalty is the problem's (:mod:`.problem`).
"""
from __future__ import annotations

from cnncodes.pipelines.probes.solver.backends import Ops

LOSSES = ("squared_hinge", "log_loss")


def loss_and_grad(ops: Ops, loss: str, S, y, w):
    """Weighted data term of scores ``S`` (M, K, B) with labels ``y`` (B,) and row weights
    ``w`` (M, B); returns (value, dS), dS in the memory of ``S``.

    The classes are the middle axis and the rows the last, so that every reduction over the
    classes is an elementwise operation between contiguous slices (a reduction along a short
    last axis is several times slower in numpy); the steps are in place where they can be."""
    onehot = ops.astype(y[None, :] == ops.arange(S.shape[1])[:, None], S.dtype)[None]   # (1, K, B)
    w = w[:, None, :]
    if loss == "squared_hinge":
        T = 2 * onehot - 1
        S *= T
        h = ops.clamp_min_(1 - S, 0.0)
        hw = h * w
        value = ops.vdot(hw, h)
        hw *= T
        hw *= -2.0
        return value, hw
    top = ops.amax(S, 1)                                                     # (M, 1, B)
    picked = (S * onehot).sum(1)                                             # (M, B)
    S -= top
    P = ops.exp_(S)
    total = ops.sum_keep(P, 1)
    value = ops.vdot((top + ops.log(total))[:, 0] - picked, w[:, 0])
    P /= total
    P -= onehot
    P *= w
    return value, P

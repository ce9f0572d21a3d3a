"""Which design solves a grid: Newton's method for narrow codes' SVMs, otherwise the cheaper
of the primal and the dual form by an estimate of their costs (not by thresholds tuned on one
data set); and every model's weights on its input from a solution in either form.
"""
from __future__ import annotations

from cnncodes.pipelines.probes.solver.backends import Ops
from cnncodes.pipelines.probes.solver.dual import dual_design
from cnncodes.pipelines.probes.solver.newton import NEWTON_MAX_DIM, NewtonSVM
from cnncodes.pipelines.probes.solver.primal import EIGENBASIS_MAX_DIM, shared_design
from cnncodes.pipelines.probes.solver.rows import moments

# The dual features of all models may take this much memory even where it exceeds the codes'.
DUAL_BYTES = 512 << 20


def newton_design(ops: Ops, X, y, masks, n_classes: int, loss: str, standardise: bool,
                  row_weights=None) -> NewtonSVM | None:
    """Narrow codes' SVMs are solved by Newton's method on the CPU (see :mod:`.newton`); None
    where L-BFGS solves the problem instead."""
    if loss != "squared_hinge" or ops.name != "numpy" or X.shape[1] > NEWTON_MAX_DIM:
        return None
    mu, sd = moments(ops, X, masks)
    return NewtonSVM(X, y, masks, n_classes, mu, sd, standardise, row_weights)


# The cost model that picks the primal or the dual form (multiply-adds): an eigendecomposition
# of a k x k matrix counts EIGH_COST * k^3 (scipy's float32 divide-and-conquer took 0.13 to
# 0.15 s for 1,212 rows, where products run at about 100 GFLOPS: a generous count, but 5
# instead of 10 changes no choice on the benchmark's codes), and a grid EVALUATIONS
# evaluations (50 to 170 on the Caltech and digits codes, about the same in both forms).
EIGH_COST = 10.0
EVALUATIONS = 150


def form_costs(M: int, K: int, n: int, n_train: int, D: int, shared_basis: bool) -> tuple[float, float]:
    """Estimated (primal, dual) cost of a grid: M models, K classes, n rows (n_train per model)
    of D dimensions. The primal's every evaluation rotates the weights (D^2 per class); the
    dual's setup is a Gram matrix, its eigendecomposition and the rows' coordinates per model."""
    primal = (n * D * D + (1 if shared_basis else M) * EIGH_COST * D ** 3
              + EVALUATIONS * M * K * (n * D + D * D))
    dual = (M * (n * n_train * D + EIGH_COST * n_train ** 3 + n * n_train ** 2)
            + EVALUATIONS * M * K * n * n_train)
    return primal, dual


def make_design(ops: Ops, X, masks, standardise: bool, loss: str, n_classes: int, exact: bool = False):
    """The cheaper of the primal and the dual design by :func:`form_costs` (softmax's primal
    with one eigenbasis for all models), the dual only where every model has fewer training
    rows than dimensions and its features (M x n x n_train) fit in the larger of the codes'
    size and ``DUAL_BYTES``. Returns (design, spans or None).

    Measured on this 2-core machine (five folds, the grid and the refit): Caltech's 1,280-d
    codes with 102 classes, softmax 5.4 to 6.5 s in the dual form against 6.4 to 7.1 s in the
    primal; with 10 merged classes, 2.5 to 2.7 s against 1.5 s (the primal with one basis)."""
    M, (n, D) = masks.shape[0], X.shape
    n_train = int(masks.sum(1).max())
    shared = loss == "log_loss"
    dual_bytes = 4 * M * n * n_train
    if n_train < D and dual_bytes <= max(4 * n * D, DUAL_BYTES):
        primal, dual = form_costs(M, n_classes, n, n_train, D, shared)
        if D > EIGENBASIS_MAX_DIM or dual < primal:
            return dual_design(ops, X, masks, standardise, loss, exact)
    return shared_design(ops, X, masks, standardise, shared_basis=shared), None


def model_weights(design, spans, omega, b, m: int):
    """(W (D, K), intercept (K,)) of model m on its input (standardised, or as normalised)."""
    if spans is not None:
        span = spans[m]
        return span.weights(omega[m, :span.r], b[m])
    W = design.weights(omega)[m]   # each model through its own basis (V[m], or the shared one)
    return W, b[m] if design.shift is None else b[m] - design.shift[m] @ W

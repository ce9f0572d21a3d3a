"""The batched problem: the M models' objectives at one C, summed and minimised by L-BFGS.

Objectives match scikit-learn's up to a positive factor 1/(C n): the data term (:mod:`.losses`)
plus ``||W||^2 / (2 C n)``, the intercept penalised for the SVM (liblinear's convention) and not
for softmax (LogisticRegression's), in the design's preconditioned basis.
"""
from __future__ import annotations

from cnncodes.pipelines.probes.solver.lbfgs import lbfgs
from cnncodes.pipelines.probes.solver.losses import LOSSES

# Curvature of the data term per unit of feature variance, used only to scale the
# preconditioner (a wrong guess costs a constant factor in conditioning, not correctness).
_CURVATURE = {"squared_hinge": 1.0, "log_loss": 0.1}


class BatchedProblem:
    """Minimise M independent objectives (one per model) of one loss at one C at a time.

    ``design`` is a :class:`~.primal.SharedRows` or :class:`~.dual.FoldBases`; ``y`` (n,)
    class indices of every row; ``masks`` (M, n) which rows each model trains on;
    ``row_weights`` (M, n), optional, multiply each row's loss (class weights).
    """

    def __init__(self, design, y, masks, n_classes: int, loss: str = "squared_hinge", row_weights=None):
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}.")
        ops = design.ops
        self.design, self.y, self.K, self.loss = design, y, n_classes, loss
        dt = design.lam.dtype
        self.n = ops.astype(masks.sum(1), dt)                              # (M,) training rows per model
        self.w = ops.astype(masks, dt) / self.n[:, None]                   # (M, n) mean weights
        if row_weights is not None:  # class weights: scikit-learn's sample_weight, C sum_i w_i loss_i
            self.w = self.w * ops.astype(ops.asarray(row_weights), dt)

    def solve(self, C: float, init=None, max_iter: int = 300, tol: float = 1e-4, guess=None):
        """Minimise every model's objective at this C; ``init`` is a previous solution (warm
        start), ``guess`` another start (the one of lower objective is taken). Returns
        ``(omega, b)``: weights in the design's basis (M, D, K), intercepts (M, K)."""
        d = self.design
        ops = d.ops
        M, D, K = d.M, d.D, self.K
        dt = d.lam.dtype
        reg = 1.0 / (2.0 * float(C) * self.n)                                      # (M,)
        if self.loss == "log_loss" and K == 2:
            # Two softmax columns split one logit's weights in halves (w1 = -w0 = w / 2 at the
            # optimum), so their penalty is half the binomial one: double it to solve
            # LogisticRegression's binary problem at this C.
            reg = 2 * reg
        scale = ((_CURVATURE[self.loss] * d.lam + 2 * reg[:, None]) ** -0.5)[:, :, None]  # (M, D, 1)
        def start(state):
            u0, b0 = ops.zeros((M, D, K), dt), ops.zeros((M, K), dt)
            if state is not None:
                u0[...] = state[0] / scale
                b0[...] = state[1]
            return ops.cat([u0.reshape(-1), b0.reshape(-1)])

        penalise_b = self.loss == "squared_hinge"  # liblinear's convention
        split = M * D * K

        def objective(z):
            u, b = z[:split].reshape(M, D, K), z[split:].reshape(M, K)
            omega = u * scale
            value, gomega, gb = d.value_and_grad(omega, b, self.y, self.w, self.loss)
            value += float((reg * (omega * omega).sum((1, 2))).sum())
            gomega = gomega + 2 * reg[:, None, None] * omega
            if penalise_b:
                shift = d.intercept_shift(omega)
                bt = b if shift is None else b - shift
                rb = reg if d.intercept_weight is None else reg * d.intercept_weight
                value += float((rb * (bt * bt).sum(1)).sum())
                gb = gb + 2 * rb[:, None] * bt
                if shift is not None:  # d(bt)/d(omega) through shift . V omega
                    g = -2 * rb[:, None, None] * d.shift[:, :, None] * bt[:, None, :]
                    gomega = gomega + (g if d.V is None else d.rotate(g, back=True))
            return value, ops.cat([(gomega * scale).reshape(-1), gb.reshape(-1)])

        # Softmax's first step is the unit one, which the preconditioner makes about right (its
        # curvature guess is that of the loss at zero weights): measured on Caltech's codes, the
        # grids took 65 -> 51 (2,560-d, 10 classes), 93 -> 66 (1,280-d, 10) and 122 -> 94
        # evaluations (1,280-d, 102 classes). Not the SVM's: its 102-class grid took 146 -> 189
        # (172 with a half step), the first C alone 39 -> 66.
        first_step = 1.0 if self.loss == "log_loss" else None
        # the history holds 2 x 20 vectors of every model's weights: fewer for very large models
        history = 20 if split <= 4_000_000 else 8
        with ops.threads():
            x0, first = start(init), None
            if guess is not None:
                x1 = start(guess)
                first, other = objective(x0), objective(x1)
                if other[0] < first[0]:
                    x0, first = x1, other
            z, self.n_evaluations = lbfgs(objective, x0, max_iter=max_iter, tol=tol, history=history,
                                          first=first, first_step=first_step)
            self.n_evaluations += 2 if guess is not None else 0
        return z[:split].reshape(M, D, K) * scale, ops.copy(z[split:].reshape(M, K))

"""The cross-validated path of a C grid with the batched solver, its refit at the chosen C,
and one model fitted on all rows (:func:`fit_one`, for the scikit-learn estimator)."""
from __future__ import annotations

import numpy as np

from cnncodes.pipelines.probes.linear_model import LinearProbe
from cnncodes.pipelines.probes.normalise import normalise_rows
from cnncodes.pipelines.probes.solver.backends import backend
from cnncodes.pipelines.probes.solver.dual import dual_design
from cnncodes.pipelines.probes.solver.forms import make_design, model_weights, newton_design
from cnncodes.pipelines.probes.solver.newton import NewtonSVM
from cnncodes.pipelines.probes.solver.primal import shared_design
from cnncodes.pipelines.probes.solver.problem import BatchedProblem

# Gradient tolerance of the cross-validation solves (the final refit uses the estimator's tol,
# 1e-4 by default, scikit-learn's). CV only ranks the C values; measured on the Caltech codes
# (1,515 x 1,280, 102 classes), 3e-4 instead of 1e-4 moves the CV accuracy of the chosen C by
# <= 0.07 points and any C by <= 0.3 points, and takes the softmax grid from 11.2 s to 6.0 s.
CV_TOL = 3e-4


class CVPath:
    """Cross-validation of a C grid with the batched solver, then the refit at a chosen C.

    Normalisation is fitted per fold on that fold's training rows only: ``standard`` uses each
    fold's own mean and standard deviation (as StandardScaler would); ``l2`` and ``power``
    are per-row and need no fitting.

    Examples
    --------
    >>> path = CVPath(X, y, splits, "softmax", "standard")              # doctest: +SKIP
    >>> scores, oof = path.run((0.01, 0.1, 1.0))                        # doctest: +SKIP
    >>> model = path.refit(0.1)                                         # doctest: +SKIP
    """

    def __init__(self, X: np.ndarray, y: np.ndarray, splits, classifier: str, norm: str,
                 device: str = "auto"):
        self.ops = ops = backend(device)
        self.classifier, self.norm = classifier, norm
        self.loss = "squared_hinge" if classifier == "svm" else "log_loss"
        self.classes, idx = np.unique(y, return_inverse=True)
        self.y_np, self.splits = y, splits
        if norm in ("l2", "power"):
            X = normalise_rows(X, norm)
        self.X = ops.asarray(X, ops.f32)   # numpy: the codes themselves when already float32
        self.y = ops.asarray(idx, ops.int64)
        masks = np.zeros((len(splits), len(y)), dtype=bool)
        for f, (train, _) in enumerate(splits):
            masks[f, train] = True
        self.masks = ops.asarray(masks)
        self._best = None   # (C, the folds' solutions there): the refit's start, see _best_so_far

    def run(self, grid):
        """Accuracy per C (list of arrays, one per fold) and out-of-fold predictions per C."""
        with self.ops.threads():  # the setup too (moments, eigendecompositions), not only the solves
            return self._run(grid)

    def _newton(self, masks) -> NewtonSVM | None:
        return newton_design(self.ops, self.X, self.y, masks, len(self.classes), self.loss,
                             self.norm == "standard")

    def _run(self, grid):
        ops = self.ops
        F, K = len(self.splits), len(self.classes)
        self._best = None
        newton = self._newton(self.masks)
        if newton is not None:
            return self._run_newton(newton, grid)
        self.design, self.spans = make_design(ops, self.X, self.masks, self.norm == "standard", self.loss, K,
                                              exact=self.norm == "none")
        problem = BatchedProblem(self.design, self.y, self.masks, K, self.loss)
        scores = np.zeros((len(grid), F))
        oof = np.empty((len(grid), len(self.y_np)), dtype=self.y_np.dtype)
        # All folds at once, one C at a time from strong to weak regularisation, each C starting
        # from the previous solution: batching the C values too makes every model wait for the
        # slowest (weakest-regularised) one; measured 2x slower than this on the Caltech codes.
        # Softmax's solutions move steadily with log C (the grid's steps are even in log C), so
        # the line through the last two is also tried as a start: measured on Caltech's 1,280-d
        # codes with 102 classes, 165 evaluations in 10.2 s became 127 in 7.6 s. Not for the
        # SVM, whose path bends: there it took more evaluations (14.6 s against 9.8 s).
        state = prev = None
        for g in sorted(range(len(grid)), key=lambda g: grid[g]):
            guess = None
            if self.loss == "log_loss" and prev is not None:
                guess = (2 * state[0] - prev[0], 2 * state[1] - prev[1])
            prev, state = state, problem.solve(grid[g], state, tol=CV_TOL, guess=guess)
            self._score(ops.to_numpy(self.design.predict(*state)), g, scores, oof)
            self._best_so_far(grid[g], scores[g], state)
        return [scores[g] for g in range(len(grid))], oof

    def _best_so_far(self, C: float, scores, state) -> None:
        """Keeps the folds' solutions at C where C's mean accuracy beats every smaller C's (the
        refit's C is the best, the smallest of ties): the refit starts from their mean, mapped
        back to weights only then (mapping at every C took 0.4 s of a 5 s grid on 2,560-d
        codes; a refit at another C starts from zero)."""
        mean = round(float(np.mean(scores)), 10)
        if self._best is None or mean > self._best[1]:
            self._best = (C, mean, state)

    def _start(self, C: float):
        """The folds' mean (weights, intercept) at C on the models' input, or None where C's
        solutions were not kept."""
        if self._best is None or self._best[0] != C:
            return None
        state, F = self._best[2], len(self.splits)
        if isinstance(self.design, NewtonSVM):
            return _mean_fit([self.design.weights(state, m) for m in range(F)])
        if self.spans is None:
            return self.design.weights(state[0]).mean(0), state[1].mean(0)
        return _mean_fit([model_weights(self.design, self.spans, *state, m) for m in range(F)])

    def _score(self, pred, g: int, scores, oof) -> None:
        """Out-of-fold predictions and accuracies at the grid's ``g``-th C from ``pred`` (F, n)."""
        for f, (_, held) in enumerate(self.splits):
            oof[g, held] = self.classes[pred[f, held]]
            scores[g, f] = float((oof[g, held] == self.y_np[held]).mean())

    def _run_newton(self, newton: NewtonSVM, grid):
        self.design, self.spans = newton, None
        F = len(self.splits)
        scores = np.zeros((len(grid), F))
        oof = np.empty((len(grid), len(self.y_np)), dtype=self.y_np.dtype)
        theta = None
        for g in sorted(range(len(grid)), key=lambda g: grid[g]):   # warm starts, as above
            theta = newton.solve(grid[g], theta, tol=CV_TOL)
            self._score(newton.predict(theta), g, scores, oof)
            self._best_so_far(grid[g], scores[g], theta)
        return [scores[g] for g in range(len(grid))], oof

    def refit(self, C: float, tol: float = 1e-4, max_iter: int = 300) -> LinearProbe:
        """The model on all rows at ``C``, started from the folds' average solution at that C."""
        if not hasattr(self, "design"):
            raise RuntimeError("CVPath.refit needs run() first (it reuses the path's basis and solutions).")
        ops = self.ops
        with ops.threads():
            everything = ops.asarray(np.ones((1, len(self.y_np)), dtype=bool))
            standard = self.norm == "standard"
            init = self._start(C)
            if isinstance(self.design, NewtonSVM):
                return self._refit_newton(C, everything, init, tol, max_iter)
            if self.spans is None:  # started from the folds' mean weights, in its own basis
                design, spans = shared_design(ops, self.X, everything, standard), None
                if init is not None:
                    init = (design.rotate(init[0][None], back=True), init[1][None])
            else:
                design, spans = dual_design(ops, self.X, everything, standard, self.loss,
                                            exact=self.norm == "none")
                if init is not None:  # (weights, true intercept) -> this basis' coordinates
                    span, (W0, c0) = spans[0], init
                    omega0 = ops.zeros((1, design.D, W0.shape[1]), W0.dtype)
                    omega0[0, :span.r], b0 = span.coordinates(W0, c0)
                    init = (omega0, b0[None])
            problem = BatchedProblem(design, self.y, everything, len(self.classes), self.loss)
            omega, b = problem.solve(C, init, max_iter=max_iter, tol=tol)
            self.n_evaluations = problem.n_evaluations
            W, intercept = model_weights(design, spans, omega, b, 0)
            # the refit's standardisation, as its design computed it (no second pass over X)
            if spans is None:
                mu, sd = design.offset[0], design.scale[0]
            else:
                mu, sd = spans[0].offset, spans[0].scale
        moments = {"mean": ops.to_numpy(mu), "scale": ops.to_numpy(sd)} if standard else {}
        return LinearProbe.from_weights(self.loss, C, self.norm, self.classes, ops.to_numpy(W),
                                        ops.to_numpy(intercept), n_samples=len(self.y_np), **moments)

    def _refit_newton(self, C, everything, init, tol, max_iter) -> LinearProbe:
        newton = self._newton(everything)
        theta = newton.solve(C, None if init is None else newton.start(*init), tol=tol, max_iter=max_iter)
        self.n_evaluations = newton.n_steps
        W, intercept = newton.weights(theta, 0)
        moments = {"mean": newton.mu0[0], "scale": newton.sigma[0]} if self.norm == "standard" else {}
        return LinearProbe.from_weights(self.loss, C, self.norm, self.classes, W, intercept,
                                        n_samples=len(self.y_np), **moments)


def _mean_fit(fits):
    """The mean (weights, intercept) of the folds' ``fits``: the refit's start."""
    return sum(w for w, _ in fits) / len(fits), sum(c for _, c in fits) / len(fits)


def fit_one(X: np.ndarray, y: np.ndarray, loss: str, C: float, max_iter: int = 300, tol: float = 1e-4,
            device: str = "auto") -> tuple[LinearProbe, int]:
    """One model on all rows of ``X`` as given (no normalisation): ``(model, evaluations)``."""
    ops = backend(device)
    classes, idx = np.unique(y, return_inverse=True)
    Xt, yt = ops.asarray(X, ops.f32), ops.asarray(idx, ops.int64)
    masks = ops.asarray(np.ones((1, len(y)), dtype=bool))
    with ops.threads():
        newton = newton_design(ops, Xt, yt, masks, len(classes), loss, standardise=False)
        if newton is not None:
            W, intercept = newton.weights(newton.solve(float(C), tol=tol, max_iter=max_iter), 0)
            return LinearProbe.from_weights(loss, C, "none", classes, W, intercept), newton.n_steps
        design, spans = make_design(ops, Xt, masks, standardise=False, loss=loss, n_classes=len(classes),
                                    exact=True)
        problem = BatchedProblem(design, yt, masks, len(classes), loss)
        omega, b = problem.solve(float(C), max_iter=max_iter, tol=tol)
        W, intercept = model_weights(design, spans, omega, b, 0)
    return LinearProbe.from_weights(loss, C, "none", classes, ops.to_numpy(W), ops.to_numpy(intercept)), \
        problem.n_evaluations

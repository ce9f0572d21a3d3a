"""The cross-validated path of a C grid with the batched solver, its refit at the chosen C,
and one model fitted on all rows (:func:`fit_one`, for the scikit-learn estimator)."""
from __future__ import annotations

import numpy as np

from cnncodes.pipelines.probes.linear_model import LinearProbe
from cnncodes.pipelines.probes.metrics import SELECT, balanced_weights, fold_scores
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
    are per-row and need no fitting. ``class_weight="balanced"`` weighs each training row's loss
    by n / (K n_class), counted on that model's own training rows (scikit-learn's
    ``sample_weight`` of those weights). ``select`` (:data:`~..metrics.SELECT`) ranks the C
    values; the out-of-fold decision scores of the best one are kept (``held_scores``).
    ``cv_tol`` is the folds' gradient tolerance (:data:`CV_TOL`).
    Without ``splits``, :meth:`refit` fits one C on all rows, with no cross-validation.

    Examples
    --------
    >>> path = CVPath(X, y, splits, "softmax", "standard")              # doctest: +SKIP
    >>> scores, oof = path.run((0.01, 0.1, 1.0))                        # doctest: +SKIP
    >>> model = path.refit(0.1)                                         # doctest: +SKIP
    """

    def __init__(self, X: np.ndarray, y: np.ndarray, splits, classifier: str, norm: str,
                 device: str = "auto", class_weight: str | None = None, select: str = "accuracy",
                 cv_tol: float = CV_TOL):
        self.ops = ops = backend(device)
        self.cv_tol = cv_tol
        self.classifier, self.norm = classifier, norm
        if select not in SELECT:
            raise ValueError(f"select must be one of {', '.join(SELECT)}, got {select!r}.")
        self.select, self.class_weight = SELECT.index(select), class_weight
        self.loss = "squared_hinge" if classifier == "svm" else "log_loss"
        self.classes, idx = np.unique(y, return_inverse=True)
        self.y_np, self.splits = y, splits
        if norm in ("l2", "power"):
            X = normalise_rows(X, norm)
        self.X = ops.asarray(X, ops.f32)   # numpy: the codes themselves when already float32
        self.y = ops.asarray(idx, ops.int64)
        masks = np.zeros((len(splits), len(y)), dtype=bool)
        self.fold_of_row = np.zeros(len(y), dtype=np.int64)
        for f, (train, held) in enumerate(splits):
            masks[f, train] = True
            self.fold_of_row[held] = f
        self.masks = ops.asarray(masks)
        self.row_weights = self._row_weights(masks)
        self._best = None   # (C, the folds' solutions there): the refit's start, see _best_so_far
        self.held_scores = None   # (C, (n, K) out-of-fold decision scores) of the best C so far
        self.fold_metrics = None  # (C values, folds, 3): accuracy, balanced accuracy, macro-F1

    def _row_weights(self, masks: np.ndarray):
        """(M, n) class weights of the models of ``masks``, or None (every row weighs 1)."""
        if self.class_weight is None or not len(masks):
            return None
        if self.class_weight != "balanced":
            raise ValueError(f"class_weight must be None or 'balanced', got {self.class_weight!r}.")
        return self.ops.asarray(np.stack([balanced_weights(self.y_np, m) for m in masks]).astype(np.float32))

    def run(self, grid):
        """Accuracy per C (list of arrays, one per fold) and out-of-fold predictions per C."""
        with self.ops.threads():  # the setup too (moments, eigendecompositions), not only the solves
            return self._run(grid)

    def _newton(self, masks, row_weights) -> NewtonSVM | None:
        return newton_design(self.ops, self.X, self.y, masks, len(self.classes), self.loss,
                             self.norm == "standard",
                             None if row_weights is None else self.ops.to_numpy(row_weights))

    def _run(self, grid):
        ops = self.ops
        F, K = len(self.splits), len(self.classes)
        self._best = self.held_scores = None
        self.fold_metrics = np.zeros((len(grid), F, 3))
        newton = self._newton(self.masks, self.row_weights)
        if newton is not None:
            return self._run_newton(newton, grid)
        self.design, self.spans = make_design(ops, self.X, self.masks, self.norm == "standard", self.loss, K,
                                              exact=self.norm == "none")
        problem = BatchedProblem(self.design, self.y, self.masks, K, self.loss, self.row_weights)
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
            prev, state = state, problem.solve(grid[g], state, tol=self.cv_tol, guess=guess)
            held = self._score(self.design.block_scores(*state), g, scores, oof)
            self._best_so_far(grid[g], g, state, held)
        return [scores[g] for g in range(len(grid))], oof

    def _best_so_far(self, C: float, g: int, state, held) -> None:
        """Keeps the folds' solutions at C where C's mean score (of ``select``) beats every
        smaller C's (the refit's C is the best, the smallest of ties): the refit starts from
        their mean, mapped back to weights only then (mapping at every C took 0.4 s of a 5 s
        grid on 2,560-d codes; a refit at another C starts from zero). Its out-of-fold scores
        ``held`` are kept too."""
        mean = round(float(self.fold_metrics[g, :, self.select].mean()), 10)
        if self._best is None or mean > self._best[1]:
            self._best = (C, mean, state)
            self.held_scores = (C, held)

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

    def _score(self, blocks, g: int, scores, oof) -> np.ndarray:
        """Out-of-fold predictions, accuracies and :attr:`fold_metrics` at the grid's ``g``-th C
        from the models' ``blocks`` of scores; returns the out-of-fold scores (n, K), each row's
        from the model of the fold that held it out."""
        held_scores = np.empty((len(self.y_np), len(self.classes)), dtype=np.float32)
        for blk, S in blocks:   # each row's scores picked where they are (on the GPU: 1/F copied)
            f = self.fold_of_row[blk]
            picked = S[self.ops.asarray(f), :, self.ops.asarray(np.arange(len(f)))]
            held_scores[blk] = self.ops.to_numpy(picked)
        oof[g] = self.classes[held_scores.argmax(1)]
        self.fold_metrics[g] = fold_scores(self.y_np, oof[g], self.splits)
        scores[g] = self.fold_metrics[g, :, 0]
        return held_scores

    def _run_newton(self, newton: NewtonSVM, grid):
        self.design, self.spans = newton, None
        F = len(self.splits)
        scores = np.zeros((len(grid), F))
        oof = np.empty((len(grid), len(self.y_np)), dtype=self.y_np.dtype)
        theta = None
        for g in sorted(range(len(grid)), key=lambda g: grid[g]):   # warm starts, as above
            theta = newton.solve(grid[g], theta, tol=self.cv_tol)
            held = self._score(newton.block_scores(theta), g, scores, oof)
            self._best_so_far(grid[g], g, theta, held)
        return [scores[g] for g in range(len(grid))], oof

    def refit(self, C: float, tol: float = 1e-4, max_iter: int = 300) -> LinearProbe:
        """The model on all rows at ``C``, started from the folds' average solution at that C
        (from zero without a :meth:`run` before it)."""
        ops = self.ops
        with ops.threads():
            everything = np.ones((1, len(self.y_np)), dtype=bool)
            weights = self._row_weights(everything)
            everything = ops.asarray(everything)
            standard = self.norm == "standard"
            if not hasattr(self, "design"):  # no run: the form the models of all rows would take
                return self._fit_at(C, everything, weights, tol, max_iter)
            init = self._start(C)
            if isinstance(self.design, NewtonSVM):
                return self._refit_newton(C, everything, weights, init, tol, max_iter)
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
            return self._solve_all(C, design, spans, everything, weights, init, tol, max_iter)

    def _fit_at(self, C, everything, weights, tol, max_iter) -> LinearProbe:
        if self._newton(everything, weights) is not None:
            return self._refit_newton(C, everything, weights, None, tol, max_iter)
        design, spans = make_design(self.ops, self.X, everything, self.norm == "standard", self.loss,
                                    len(self.classes), exact=self.norm == "none")
        return self._solve_all(C, design, spans, everything, weights, None, tol, max_iter)

    def _solve_all(self, C, design, spans, everything, weights, init, tol, max_iter) -> LinearProbe:
        """The one model of all rows in ``design`` (its ``spans`` for the dual form)."""
        ops, standard = self.ops, self.norm == "standard"
        with ops.threads():
            problem = BatchedProblem(design, self.y, everything, len(self.classes), self.loss, weights)
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

    def _refit_newton(self, C, everything, weights, init, tol, max_iter) -> LinearProbe:
        newton = self._newton(everything, weights)
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

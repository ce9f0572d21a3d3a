"""Linear classifiers fitted as batched problems: every fold of the C grid in one solve.

scikit-learn fits one (fold, C) model at a time, in float64, on a copy of each fold's rows.
Here the M models of one C (the folds') are one parameter array and one L-BFGS problem whose
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
Gradients are written out by hand (two matrix products per block).

Two bases, the cheaper by an estimate of their costs (:mod:`.forms`): the *primal*
(:mod:`.primal`) and, where every model has fewer training rows than dimensions, the *dual*
(:mod:`.dual`); narrow codes' SVMs are solved by Newton's method instead (:mod:`.newton`).

Nothing here imports scikit-learn or, on a CPU, torch: the fitted model is a
:class:`~cnncodes.pipelines.probes.linear_model.LinearProbe`. The modules, from the floor up:

- :mod:`.linalg`: which library decomposes a matrix (numpy or scipy, torch on CUDA) and builds it;
- :mod:`.backends`: the numpy and torch array operations (:class:`~.backends.Ops`), BLAS threads;
- :mod:`.rows`, :mod:`.losses`: blocks of rows, the models' moments, the two losses;
- :mod:`.primal`, :mod:`.dual`, :mod:`.newton`: the problem designs;
  :mod:`.forms` chooses one by its estimated cost;
- :mod:`.lbfgs`, :mod:`.problem`: the optimiser, and the M models' objective it minimises;
- :mod:`.cv_path`: the cross-validated C grid and its refit (:class:`~.cv_path.CVPath`), and
  :func:`~.cv_path.fit_one`.
"""
from cnncodes._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    **dict.fromkeys(["CVPath", "fit_one"], ".cv_path"),
    "prefetch_linalg": ".linalg",
    "LOSSES": ".losses",
})

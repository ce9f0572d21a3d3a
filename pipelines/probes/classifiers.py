"""Linear classifiers on cached CNN codes: cross-validated C, honest test scores.

A classifier is normalise -> optional PCA -> LinearSVC or multinomial LogisticRegression: a
scikit-learn ``Pipeline`` with ``--solver sklearn``, or the batched solver's
:class:`~.linear_model.LinearProbe` (the same formulas, saved as that Pipeline).
Cross-validation fits the normalisation (and PCA) in every fold, so they never see held-out
rows. With the batched solver (the default) nothing here imports scikit-learn or torch: the
folds and scores are :mod:`.metrics`' copies of scikit-learn's.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from cnncodes.extractor.errors import SettingsError
from cnncodes.extractor.recipe import Recipe

from cnncodes.pipelines.probes.codes import Codes, CodesError, load_codes
from cnncodes.pipelines.probes.linear_model import labels_of
from cnncodes.pipelines.probes.metrics import (
    SELECT,
    balanced_weights,
    classification_scores,
    confusion,
    fold_scores,
    stratified_kfold,
)
from cnncodes.pipelines.probes.normalise import signed_sqrt

CLASSIFIERS = ("svm", "softmax", "knn")
CLASS_WEIGHTS = ("none", "balanced")
LINEAR = ("svm", "softmax")
NORMS = ("standard", "l2", "power", "none")
DEFAULT_C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
C_RANGE = (1e-8, 1e8)


def parse_c_grid(text: str | None) -> tuple[float, ...]:
    """``"1e-3,0.1,10"`` -> (0.001, 0.1, 10.0); every value must be > 0."""
    if not text:
        return DEFAULT_C_GRID
    try:
        grid = tuple(sorted({float(t) for t in str(text).split(",") if t.strip()}))
    except ValueError:
        raise SettingsError(f"--c-grid must be comma-separated numbers such as 1e-3,0.1,10, "
                            f"got {text!r}.") from None
    if not grid or not all(np.isfinite(grid)) or min(grid) <= 0:
        raise SettingsError(f"--c-grid values must be finite numbers > 0, got {text!r}.")
    if min(grid) < C_RANGE[0] or max(grid) > C_RANGE[1]:
        raise SettingsError(f"--c-grid values must lie between {C_RANGE[0]:g} and {C_RANGE[1]:g} "
                            f"(beyond them "
                            f"the fit is all regularisation or none, and solvers stall), got {text!r}.")
    return grid


def parse_pca(value) -> int | str | None:
    """``None``, a positive number of components, or ``"whiten"``."""
    if value in (None, "", "none"):
        return None
    if str(value).lower() == "whiten":
        return "whiten"
    try:
        n = int(value)
    except ValueError:
        raise SettingsError(f"--pca takes a number of components or 'whiten', got {value!r}.") from None
    if n < 1:
        raise SettingsError(f"--pca must be >= 1, got {n}.")
    return n


SOLVERS = ("auto", "sklearn", "batched", "torch")  # torch: the batched solver's former name


def solver_name(solver: str) -> str:
    """The solver a ``--solver`` value selects (``torch`` is ``batched``'s former name)."""
    if solver not in SOLVERS:
        raise SettingsError(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}.")
    return "batched" if solver == "torch" else solver


def normalisation_steps(norm: str) -> list:
    """The (unfitted) normalisation steps of every probe's Pipeline, by ``--norm``."""
    from sklearn.preprocessing import FunctionTransformer, Normalizer, StandardScaler
    if norm == "standard":
        return [("scale", StandardScaler())]
    if norm == "l2":
        return [("l2", Normalizer())]
    if norm == "power":
        return [("sqrt", FunctionTransformer(signed_sqrt)), ("l2", Normalizer())]
    return []


def make_pipeline(classifier: str, C: float = 1.0, norm: str = "standard", pca=None, *,
                  n_samples: int | None = None, n_features: int | None = None, seed: int = 0,
                  solver: str = "sklearn"):
    """The estimator fitted in every fold and at the end.

    ``dual`` of LinearSVC is chosen by shape (the dual problem is smaller when there are fewer
    samples than features), as liblinear's documentation advises.
    """
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.svm import LinearSVC
    if classifier not in LINEAR:
        raise SettingsError(f"classifier must be one of {', '.join(LINEAR)}, got {classifier!r}.")
    if norm not in NORMS:
        raise SettingsError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}.")
    steps = normalisation_steps(norm)
    pca = parse_pca(pca)
    if pca is not None:
        steps.append(("pca", PCA(n_components=None if pca == "whiten" else pca,
                                 whiten=pca == "whiten", random_state=seed)))
    if solver_name(solver) == "batched":
        from cnncodes.pipelines.probes.estimator import BatchedLinearClassifier
        clf = BatchedLinearClassifier(loss="squared_hinge" if classifier == "svm" else "log_loss", C=C)
    elif classifier == "svm":
        dual = bool(n_samples is not None and n_features is not None and n_samples < n_features)
        clf = LinearSVC(C=C, dual=dual, max_iter=5000, random_state=seed)
    else:
        clf = LogisticRegression(C=C, max_iter=1000)
    return Pipeline(steps + [("clf", clf)])


@dataclass
class FitResult:
    """Everything a fit measured; ``pipeline`` is the refitted estimator (on all training rows)."""

    layer: str
    classifier: str
    C: float
    cv_accuracy: float
    cv_std: float
    grid: list[dict]                # per C: mean, std, per-fold accuracies
    test_accuracy: float | None
    balanced_accuracy: float | None
    macro_f1: float | None
    n_train: int
    n_test: int
    seconds: float
    seed: int
    folds: int
    norm: str
    pca: int | str | None
    classes: list[str]
    pipeline: object = field(repr=False)              # LinearProbe, or a scikit-learn Pipeline
    fold_of_row: np.ndarray = field(repr=False)      # fold index of each training row
    train_rows: np.ndarray = field(repr=False)       # cache rows used for training
    test_rows: np.ndarray = field(repr=False)
    y_test: np.ndarray | None = field(default=None, repr=False)
    y_pred: np.ndarray | None = field(default=None, repr=False)
    excluded: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)        # path, fingerprint and the extraction recipe
    solver: str = "sklearn"
    y_train: np.ndarray | None = field(default=None, repr=False)
    cv_pred: np.ndarray | None = field(default=None, repr=False)  # out-of-fold, best C
    temperature: float | None = None                                 # k-NN only
    select: str = "accuracy"                                         # what chose C
    class_weight: str | None = None
    cv_balanced_accuracy: float | None = None                        # at the chosen C
    cv_macro_f1: float | None = None
    # out-of-fold decision scores of the chosen C (linear probes; a binary probe's one column),
    # the test rows' scores, and the temperature that calibrates both (see .calibration)
    cv_scores: np.ndarray | None = field(default=None, repr=False)
    test_scores: np.ndarray | None = field(default=None, repr=False)
    calibration: object = None
    train_paths: list = field(default_factory=list, repr=False)     # image path of each training row

    @property
    def hyper(self) -> str:
        """The name of the cross-validated hyper-parameter: ``C``, or ``k`` for the k-NN probe
        (whose value ``C`` then holds)."""
        return "k" if self.classifier == "knn" else "C"

    def chosen(self) -> str:
        """``C=0.1`` or ``k=20``."""
        return f"{self.hyper}={self.C:g}"

    def as_dict(self) -> dict:
        """The summary as plain JSON-ready values (for k-NN, ``k`` and ``grid[].k`` instead of C)."""
        r = lambda v: None if v is None else round(float(v), 6)
        out = self._as_dict(r)
        if self.classifier == "knn":
            out["k"] = int(out.pop("C"))
            out["grid"] = [{"k": int(g.pop("C")), **g} for g in out["grid"]]
            out["temperature"] = self.temperature
        return out

    def _as_dict(self, r) -> dict:
        return {"layer": self.layer, "classifier": self.classifier, "C": self.C,
                "cv_accuracy": r(self.cv_accuracy), "cv_std": r(self.cv_std),
                "cv_balanced_accuracy": r(self.cv_balanced_accuracy), "cv_macro_f1": r(self.cv_macro_f1),
                "select": self.select, "class_weight": self.class_weight or "none",
                "calibration": None if self.calibration is None else self.calibration.as_dict(),
                "test_accuracy": r(self.test_accuracy), "balanced_accuracy": r(self.balanced_accuracy),
                "macro_f1": r(self.macro_f1), "n_train": self.n_train, "n_test": self.n_test,
                "seconds": round(self.seconds, 3), "seed": self.seed, "folds": self.folds,
                "norm": self.norm, "pca": self.pca, "solver": self.solver,
                "grid": [{**g, **{k: r(g[k]) for k in ("mean", "std", "balanced_accuracy", "macro_f1")
                                  if k in g}} for g in self.grid],
                "excluded": self.excluded, "classes": len(self.classes), "cache": self.cache.get("path")}

    def evaluated(self) -> tuple[str, np.ndarray, np.ndarray]:
        """(what, truth, predictions): the test rows, or out-of-fold predictions without them."""
        if self.y_test is not None and len(self.y_test):
            return "test", self.y_test, self.y_pred
        return "cross-validation (out-of-fold, best C)", self.y_train, self.cv_pred

    def confusion(self) -> np.ndarray:
        _, truth, pred = self.evaluated()
        return confusion(truth, pred, len(self.classes))

    def cv_proba(self) -> np.ndarray | None:
        """Out-of-fold class probabilities of the training rows (calibrated where the fit was;
        columns: the model's ``classes_``), or None (k-NN)."""
        if self.cv_scores is None:
            return None
        from cnncodes.pipelines.probes.linear_model import probabilities
        return self.calibration.proba(self.cv_scores) if self.calibration else probabilities(self.cv_scores)

    def suspects(self):
        """The training rows ranked by how unlikely their given label is (:mod:`.suspects`), or
        None without out-of-fold scores (k-NN)."""
        proba = self.cv_proba()
        if proba is None:
            return None
        from cnncodes.pipelines.probes.suspects import rank_suspects
        return rank_suspects(proba, np.searchsorted(self.pipeline.classes_, self.y_train))


def _check_classes(y: np.ndarray, classes: list[str], folds: int) -> None:
    present, counts = np.unique(y, return_counts=True)
    if len(present) < 2:
        raise CodesError(f"a classifier needs at least 2 classes with images, found {len(present)}.")
    small = [(classes[c], n) for c, n in zip(present, counts) if n < folds]
    if small:
        names = ", ".join(f"{name} ({n})" for name, n in small[:5])
        fix = f"Use --folds {int(counts.min())} or fewer." if counts.min() >= 2 else \
            "Cross-validation needs 2 training images per class at least: merge those classes, add images, " \
            "or leave them out of the data."
        raise CodesError(f"{len(small)} classes have fewer training images than --folds {folds}: {names}. "
                         f"{fix}")


def split_rows(codes: Codes, holdout: float | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (into ``codes``) of training and test rows.

    With splits in the cache: train (+ val) vs test. Without: everything is training data, or
    a stratified ``holdout`` share is kept aside for the test.
    """
    idx = np.arange(len(codes.y))
    if codes.has_test_split:
        return idx[codes.splits != "test"], idx[codes.splits == "test"]
    if holdout:
        from sklearn.model_selection import train_test_split
        if not 0 < holdout < 1:
            raise SettingsError(f"--holdout must be between 0 and 1, got {holdout}.")
        return tuple(np.sort(a) for a in train_test_split(idx, test_size=holdout, stratify=codes.y,
                                                          random_state=seed))
    return idx, idx[:0]


def fit_linear_probe(cache, layer: str | None = None, classifier: str = "svm", *, c_grid=None,
                     folds: int = 5, seed: int = 0, norm: str = "standard", pca=None,
                     holdout: float | None = None, allow_incomplete: bool = False,
                     n_jobs: int = 1, solver: str = "auto", k_grid=None,
                     temperature: float | None = None, class_weight: str | None = None,
                     select: str = "accuracy", calibrate: bool = True,
                     cv_tol: float | None = None) -> FitResult:
    """Cross-validate C (k for ``knn``) on the training rows, refit with the best value, score
    once on the test rows.

    Parameters
    ----------
    cache : path or Codes
        An HDF5 cache (or codes already loaded with :func:`pipelines.codes.load_codes`).
    classifier : {'svm', 'softmax', 'knn'}
        LinearSVC, multinomial logistic regression, or the cosine k-NN probe
        (:mod:`.knn`: ``norm`` l2 or power, ``k_grid`` instead of ``c_grid``, votes weighted
        by exp(similarity / ``temperature``)).
    c_grid : sequence of float or str, optional
        Default: 1e-4 .. 1e2, one value per decade.
    folds, seed : int
        Stratified, shuffled K-fold with this seed.
    norm : {'standard', 'l2', 'power', 'none'}
        Fitted inside each fold (a Pipeline step), never on held-out rows.
    pca : int or 'whiten', optional
    holdout : float, optional
        Without test split in the cache, keep this stratified share aside as the test.
    solver : {'auto', 'sklearn', 'batched'}
        ``batched`` fits every fold of a C at once as one batched problem (float32; numpy on the
        CPU, torch on CUDA when present); ``auto`` uses it unless PCA is asked for. ``torch`` is
        its former name.
    class_weight : {None, 'none', 'balanced'}
        ``balanced`` weighs every training row's loss by n / (K n_class), counted on the rows
        each model trains on (every fold's own): scikit-learn's ``sample_weight`` of those
        weights, in both solvers.
    select : {'accuracy', 'balanced_accuracy', 'macro_f1'}
        The mean out-of-fold score that chooses C (ties: the smaller C).
    calibrate : bool
        Fit a temperature on the chosen C's out-of-fold scores (linear probes; see
        :mod:`.calibration`) and measure the calibration error before and after it.
    cv_tol : float, optional
        The batched solver's gradient tolerance in the folds (default
        :data:`~.solver.cv_path.CV_TOL`); the refit keeps its own.

    Examples
    --------
    >>> r = fit_linear_probe("cache/digits-efficientnet_lite0.h5", "penultimate", "softmax")  # doctest: +SKIP
    >>> r.C, round(r.cv_accuracy, 3), round(r.test_accuracy, 3)                               # doctest: +SKIP
    (0.1, 0.921, 0.931)
    """
    t0 = time.perf_counter()
    knn = classifier == "knn"
    if classifier not in CLASSIFIERS:
        raise SettingsError(f"classifier must be one of {', '.join(CLASSIFIERS)}, got {classifier!r}.")
    class_weight = None if class_weight in (None, "none") else class_weight
    if class_weight not in (None, "balanced"):
        raise SettingsError(f"--class-weight must be one of {', '.join(CLASS_WEIGHTS)}, "
                            f"got {class_weight!r}.")
    if select not in SELECT:
        raise SettingsError(f"--select must be one of {', '.join(SELECT)}, got {select!r}.")
    if knn and class_weight:
        raise SettingsError("the k-NN probe has no class weights (its votes are its neighbours'); "
                            "--class-weight is for fit-svm and fit-softmax.")
    if knn:
        from cnncodes.pipelines.probes import knn as knn_probe
        grid = knn_probe.parse_k_grid(k_grid)
        temperature = knn_probe.DEFAULT_TEMPERATURE if temperature is None else float(temperature)
        if not temperature > 0:
            raise SettingsError(f"--temperature must be > 0, got {temperature}.")
        if norm == "standard":  # the linear probes' default: k-NN compares directions
            norm = "l2"
        if norm not in knn_probe.KNN_NORMS or parse_pca(pca) is not None:
            raise SettingsError(f"the k-NN probe takes --norm {' or '.join(knn_probe.KNN_NORMS)} (cosine "
                                f"similarity of unit rows) and no --pca, got --norm {norm}.")
        solver = "batched"
    else:
        grid = parse_c_grid(c_grid if not isinstance(c_grid, (list, tuple))
                            else ",".join(str(float(c)) for c in c_grid))
    if folds < 2:
        raise SettingsError(f"--folds must be >= 2, got {folds}.")
    solver = solver_name(solver)
    if solver == "batched" and parse_pca(pca) is not None:
        raise SettingsError("--solver batched does not do PCA; use --solver sklearn with --pca.")
    if solver == "auto":
        # Measured (benchmarks/classify.py, docs/benchmarks.md): the batched solver is faster than
        # scikit-learn on every width from 16 to 21,952 dimensions and every case tried, at the
        # same CV accuracy; PCA is a scikit-learn pipeline step, so it keeps that solver.
        solver = "batched" if parse_pca(pca) is None else "sklearn"
    prefetch = None
    if solver == "batched" and not knn:  # its linear algebra's import overlaps the reading
        from cnncodes.pipelines.probes.solver.linalg import prefetch_linalg as prefetch
    codes = cache if isinstance(cache, Codes) else load_codes(cache, layer, allow_incomplete, prefetch)
    train, test = split_rows(codes, holdout, seed)
    # every row trains (no test split): the codes themselves, not a copy
    X = codes.X if len(train) == len(codes.y) else codes.X[train]
    y = codes.y[train]
    _check_classes(y, codes.classes, folds)
    fold_of_row = np.empty(len(y), dtype=np.int64)
    splits = stratified_kfold(y, folds, seed)
    for k, (_, held) in enumerate(splits):
        fold_of_row[held] = k
    held = None   # out-of-fold decision scores per C (None: not kept)
    if knn:
        scores, oof = knn_probe.cv_knn(X, y, fold_of_row, grid, temperature, norm)
    elif solver == "batched":
        from cnncodes.pipelines.probes.solver.cv_path import CVPath
        path = CVPath(X, y, splits, classifier, norm, class_weight=class_weight, select=select,
                      **({} if cv_tol is None else {"cv_tol": cv_tol}))
        scores, oof = path.run(grid)
        held = dict([path.held_scores])
    else:
        scores, oof, _ = _cv_scores(X, y, splits, grid, classifier, norm, pca, seed, n_jobs, class_weight)
    # (C, folds, 3): accuracy, balanced accuracy, macro-F1; the batched path scored them already
    metrics = path.fold_metrics if solver == "batched" and not knn else \
        np.stack([fold_scores(y, oof[g], splits) for g in range(len(grid))])
    table = [{"C": c, "mean": float(s.mean()), "std": float(s.std()),
              "folds": [round(float(v), 6) for v in s],
              "balanced_accuracy": float(m[:, 1].mean()), "macro_f1": float(m[:, 2].mean())}
             for c, s, m in zip(grid, scores, metrics)]
    key = "mean" if select == "accuracy" else select
    # ties: the stronger regularisation (the smaller C, the larger k)
    best = max(table, key=lambda g: (round(g[key], 10), g["C"] if knn else -g["C"]))
    if solver == "sklearn":  # the chosen C's folds once more, for their decision scores
        held = {best["C"]: _cv_scores(X, y, splits, [best["C"]], classifier, norm, pca, seed, n_jobs,
                                      class_weight, decisions=True)[2]}
    if knn:
        from sklearn.pipeline import Pipeline
        final = Pipeline(normalisation_steps(norm) +
                          [("clf", knn_probe.CosineKNNClassifier(int(best["C"]), temperature))]).fit(X, y)
    elif solver == "batched":  # the same rows, no copy; starts from the folds' solution at that C
        final = path.refit(best["C"])
        del path
    else:
        final = make_pipeline(classifier, best["C"], norm, pca, n_samples=len(y), n_features=X.shape[1],
                              seed=seed, solver=solver)
        from sklearn.exceptions import ConvergenceWarning
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            final.fit(X, y, **_sample_weight(y, class_weight))
    y_test = y_pred = test_scores = None
    acc = bal = f1 = None
    if len(test):
        y_test = codes.y[test]
        if knn:
            y_pred = final.predict(codes.X[test])
        else:
            test_scores = final.decision_function(codes.X[test])
            y_pred = labels_of(test_scores, final.classes_)
        acc, bal, f1 = classification_scores(y_test, y_pred)
    g = grid.index(best["C"])
    result = FitResult(codes.layer, classifier, best["C"], best["mean"], best["std"], table, acc, bal, f1,
                       len(train), len(test), time.perf_counter() - t0, seed, folds, norm, parse_pca(pca),
                       codes.classes, final, fold_of_row, codes.rows[train], codes.rows[test], y_test,
                       y_pred, codes.excluded, cache_summary(codes), solver="knn" if knn else solver,
                       y_train=y,
                       cv_pred=oof[g], temperature=temperature if knn else None, select=select,
                       class_weight=class_weight, cv_balanced_accuracy=best["balanced_accuracy"],
                       cv_macro_f1=best["macro_f1"], test_scores=test_scores,
                       train_paths=[codes.paths[i] for i in train])
    if held is not None and best["C"] in held:
        result.cv_scores = decision_columns(held[best["C"]], result.classifier)
        if calibrate:
            result.calibration = calibrate_result(result)
    result.seconds = time.perf_counter() - t0
    return result


def decision_columns(scores: np.ndarray, classifier: str) -> np.ndarray:
    """Out-of-fold scores with a column per class, as the refitted model's decision function
    gives them: a binary probe's one column (the SVM's positive class; softmax's logit of the
    second class against the first)."""
    if scores.ndim == 1 or scores.shape[1] != 2:
        return scores
    return scores[:, 1] if classifier == "svm" else scores[:, 1] - scores[:, 0]


def calibrate_result(r: FitResult):
    """The temperature of ``r``'s out-of-fold scores and the calibration error before and after
    it (test rows of classes the model never trained on left out of the test's)."""
    from cnncodes.pipelines.probes.calibration import calibrate
    classes_ = r.pipeline.classes_
    y_cv = np.searchsorted(classes_, r.y_train)
    test_scores = y_test = None
    if r.test_scores is not None:
        known = np.isin(r.y_test, classes_)
        test_scores, y_test = r.test_scores[known], np.searchsorted(classes_, r.y_test[known])
    return calibrate(r.cv_scores, y_cv, test_scores, y_test)


def _sample_weight(y: np.ndarray, class_weight: str | None) -> dict:
    """The fit's keyword for a Pipeline's classifier step: ``clf__sample_weight`` of the
    balanced class weights of ``y``, or nothing."""
    return {"clf__sample_weight": balanced_weights(y)} if class_weight == "balanced" else {}


def cache_summary(codes: Codes) -> dict:
    """What a saved model needs to know of the cache it was trained on."""
    return {"path": str(codes.path), "layer": codes.layer, "layer_attrs": codes.layer_attrs,
            **Recipe.from_attrs(codes.attrs).to_attrs(), "data_root": codes.attrs.get("data_root")}


def _cv_scores(X, y, splits, grid, classifier, norm, pca, seed, n_jobs, class_weight=None, decisions=False):
    """Accuracy per C (rows) and fold (columns) and out-of-fold predictions per C; with
    ``decisions`` also the out-of-fold decision scores of the last C (n, or n x K), not kept
    for every C (n x K x C values would be the memory of the codes many times over).

    Folds run in parallel on threads (liblinear and lbfgs spend their time outside the GIL),
    which share the codes instead of copying them into worker processes. Within a fold the C
    values run from strong to weak regularisation; logistic regression starts each one from the
    previous solution (warm start), which liblinear cannot do.
    """
    from joblib import Parallel, delayed
    from sklearn.exceptions import ConvergenceWarning

    preds = np.empty((len(grid), len(y)), dtype=y.dtype)
    n_classes = len(np.unique(y))
    held_scores = np.zeros((len(y),) if n_classes == 2 else (len(y), n_classes), np.float32) \
        if decisions else None

    def one_fold(train, held):
        pipe = make_pipeline(classifier, grid[0], norm, pca, n_samples=len(train), n_features=X.shape[1],
                             seed=seed)
        if classifier == "softmax":
            pipe.set_params(clf__warm_start=True)
        out = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            for c in grid:
                pipe.set_params(clf__C=c)
                pipe.fit(X[train], y[train], **_sample_weight(y[train], class_weight))
                d = pipe.decision_function(X[held])
                p = labels_of(d, pipe.classes_)
                preds[grid.index(c), held] = p
                if held_scores is not None and len(pipe.classes_) == n_classes:  # else other columns
                    held_scores[held] = d
                out.append(float((p == y[held]).mean()))
        return out

    per_fold = Parallel(n_jobs=n_jobs, prefer="threads")(delayed(one_fold)(tr, te) for tr, te in splits)
    return [np.array(col) for col in zip(*per_fold)], preds, held_scores

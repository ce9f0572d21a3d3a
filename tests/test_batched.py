import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.svm import LinearSVC
from sklearn.utils.estimator_checks import parametrize_with_checks

from cnncodes.pipelines.probes.estimator import BatchedLinearClassifier
from cnncodes.pipelines.probes.metrics import stratified_kfold


@parametrize_with_checks([BatchedLinearClassifier(), BatchedLinearClassifier(loss="log_loss", C=10.0)])
def test_sklearn_compatible(estimator, check):
    check(estimator)


@pytest.mark.parametrize("loss,ref", [("squared_hinge", LinearSVC(C=0.05, dual=False, max_iter=5000)),
                                      ("log_loss", LogisticRegression(C=0.05, max_iter=5000))])
def test_same_solution_as_scikit_learn(loss, ref):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 300)
    X = (rng.normal(0, 1, (4, 20))[y] + rng.normal(0, 1.5, (300, 20))).astype(np.float32)
    mine = BatchedLinearClassifier(loss=loss, C=0.05).fit(X, y)
    ref.fit(X, y)
    agree = (mine.predict(X) == ref.predict(X)).mean()
    assert agree >= 0.97
    if loss == "log_loss":  # unpenalised intercepts in both: the same optimum
        np.testing.assert_allclose(mine.coef_, ref.coef_, atol=2e-3)


def _problem(n, d, k=3, seed=0, offset=0.0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    X = rng.normal(0, 1, (k, d))[y] * 0.7 + rng.normal(0, 1, (n, d)) + offset
    return X.astype(np.float32), y


@pytest.mark.parametrize("loss,ref", [
    ("squared_hinge", lambda C: LinearSVC(C=C, dual=True, max_iter=200000, tol=1e-10)),
    ("log_loss", lambda C: LogisticRegression(C=C, max_iter=20000, tol=1e-12))])
@pytest.mark.parametrize("n,d", [(36, 400), (200, 30)])  # the dual (n < d) and the primal form
def test_both_forms_reach_scikit_learns_optimum(loss, ref, n, d):
    X, y = _problem(n, d, offset=2.0)
    mine = BatchedLinearClassifier(loss=loss, C=0.3, tol=1e-7, max_iter=3000).fit(X, y)
    theirs = ref(0.3).fit(X.astype(np.float64), y)
    scale = np.abs(theirs.coef_).max()
    np.testing.assert_allclose(mine.coef_, theirs.coef_, atol=3e-3 * scale)
    if loss == "log_loss":  # softmax intercepts are defined up to a common constant
        mine.intercept_, theirs.intercept_ = (a.intercept_ - a.intercept_.mean() for a in (mine, theirs))
    np.testing.assert_allclose(mine.intercept_, theirs.intercept_, atol=3e-3 * max(1, scale))


@pytest.mark.parametrize("classifier", ["svm", "softmax"])
@pytest.mark.parametrize("norm", ["standard", "l2"])
@pytest.mark.parametrize("n,d", [(48, 300), (240, 24)])
def test_cv_path_fits_each_fold_as_scikit_learn_would(classifier, norm, n, d):
    """Every fold's model of the batched path is the model scikit-learn fits on that fold's
    rows alone (normalisation fitted on them too), and the refit is the model on all rows."""
    from sklearn.model_selection import StratifiedKFold

    from cnncodes.pipelines.probes.classifiers import make_pipeline
    from cnncodes.pipelines.probes.solver.cv_path import CV_TOL, CVPath
    from cnncodes.pipelines.probes.solver.forms import model_weights
    X, y = _problem(n, d, seed=1, offset=1.0)
    splits = list(StratifiedKFold(3, shuffle=True, random_state=0).split(X, y))
    path = CVPath(X, y, splits, classifier, norm)
    grid = (0.01, 1.0)
    scores, oof = path.run(grid)
    for g, C in enumerate(grid):
        for f, (train, held) in enumerate(splits):
            ref = make_pipeline(classifier, C, norm, n_samples=len(train), n_features=d)
            if classifier == "svm":
                ref.set_params(clf__dual=True, clf__max_iter=100000, clf__tol=1e-8)
            else:
                ref.set_params(clf__max_iter=10000, clf__tol=1e-10)
            ref.fit(X[train], y[train])
            agree = (ref.predict(X[held]) == oof[g, held]).mean()
            assert agree >= 0.9, (C, f, agree)
            assert abs(scores[g][f] - (ref.predict(X[held]) == y[held]).mean()) <= 0.1
    final = path.refit(1.0, tol=1e-6, max_iter=2000)
    ref = make_pipeline(classifier, 1.0, norm, n_samples=n, n_features=d)
    ref.set_params(**({"clf__dual": True, "clf__max_iter": 100000, "clf__tol": 1e-8} if classifier == "svm"
                      else {"clf__max_iter": 10000, "clf__tol": 1e-10}))
    ref.fit(X, y)
    assert (final.predict(X) == ref.predict(X)).mean() >= 0.97
    np.testing.assert_allclose(final.decision_function(X), ref.decision_function(X), atol=0.05, rtol=0.05)
    assert CV_TOL > 0 and model_weights  # the names the docs refer to exist


@pytest.mark.parametrize("classifier", ["svm", "softmax"])
def test_the_primal_form_on_fewer_rows_than_dimensions_fits_each_fold(classifier, monkeypatch):
    """The primal form where the cost model picks it over the dual (few classes): a
    rank-deficient second moment, softmax's one basis for all folds; each fold's model is
    scikit-learn's on that fold's rows."""
    from cnncodes.pipelines.probes.classifiers import make_pipeline
    from cnncodes.pipelines.probes.solver import cv_path, forms, primal
    monkeypatch.setattr(forms, "form_costs", lambda *a, **k: (0.0, 1.0))
    X, y = _problem(60, 90, seed=2, offset=1.0)
    splits = stratified_kfold(y, 3, 0)
    path = cv_path.CVPath(X, y, splits, classifier, "standard")
    _, oof = path.run((0.05,))
    assert isinstance(path.design, primal.SharedRows)
    assert (path.design.V.ndim == 2) == (classifier == "softmax")   # one basis for all folds
    for train, held in splits:
        ref = make_pipeline(classifier, 0.05, "standard", n_samples=len(train), n_features=90)
        tight = ({"clf__dual": True, "clf__max_iter": 100000, "clf__tol": 1e-8} if classifier == "svm"
                 else {"clf__max_iter": 10000, "clf__tol": 1e-10})
        ref.set_params(**tight).fit(X[train], y[train])
        assert (ref.predict(X[held]) == oof[0, held]).mean() >= 0.9


def test_dual_form_for_few_wide_rows_is_small_and_quick():
    """36 rows of 20,000-d codes: the n x n form, seconds and megabytes (no d x d matrix)."""
    import time

    from sklearn.model_selection import StratifiedKFold

    from cnncodes.pipelines.probes.solver.cv_path import CVPath
    from cnncodes.pipelines.probes.solver.dual import FoldBases
    X, y = _problem(36, 20000, k=3)
    splits = list(StratifiedKFold(2, shuffle=True, random_state=0).split(X, y))
    t0 = time.perf_counter()
    path = CVPath(X, y, splits, "svm", "standard")
    scores, _ = path.run((0.01, 1.0))
    # 18 training rows per fold, centred: 17 directions (the intercept is apart from them)
    assert isinstance(path.design, FoldBases) and path.design.Phi.shape == (2, 36, 17)
    pipe = path.refit(1.0)
    assert pipe.named_steps["clf"].coef_.shape == (3, 20000)
    assert time.perf_counter() - t0 < 60  # a hang guard only; the benchmark measures speed


def test_threads_for_the_solver_are_the_cores_left_free():
    import os

    from cnncodes.pipelines.probes.solver.backends import _running_elsewhere, threads_for_solver
    cores = len(os.sched_getaffinity(0))
    assert 1 <= threads_for_solver() <= cores
    others = _running_elsewhere()
    assert others is None or others >= 0


@pytest.mark.parametrize("xp", ["numpy", "torch"])
def test_lbfgs_minimises_a_badly_scaled_quadratic(xp):
    from cnncodes.pipelines.probes.solver.lbfgs import lbfgs
    h = np.logspace(-2, 2, 50, dtype=np.float32)
    target = np.linspace(-1, 1, 50, dtype=np.float32)
    x0 = np.zeros(50, np.float32)
    if xp == "torch":  # the same code on torch tensors (the CUDA backend's arrays)
        import torch
        h, target, x0 = map(torch.from_numpy, (h, target, x0))

    def fun(x):  # the value summed in float64, as the solver's objectives are
        r = x - target
        v = h * r * r
        return float((v.double() if xp == "torch" else v.astype(np.float64)).sum() / 2), h * r
    x, evals = lbfgs(fun, x0, max_iter=500, tol=1e-7)
    # float32 and 4 decades of curvature: it stops when a step gains < 1e-10, about 1e-3 away
    np.testing.assert_allclose(np.asarray(x), np.asarray(target), atol=5e-3, rtol=0)
    assert evals < 500


@pytest.mark.parametrize("loss,ref", [("squared_hinge",
                                       LinearSVC(C=0.2, dual=True, max_iter=100000, tol=1e-10)),
                                      ("log_loss", LogisticRegression(C=0.2, max_iter=10000, tol=1e-12))])
def test_two_classes_are_scikit_learns_binary_problem(loss, ref):
    """Binary softmax is binomial logistic regression at the same C; a binary SVM's coef_ is
    the positive class's one-vs-rest weights (not twice them)."""
    X, y = _problem(150, 6, k=2, offset=1.0)
    mine = BatchedLinearClassifier(loss=loss, C=0.2, tol=1e-7, max_iter=3000).fit(X, y)
    ref.fit(X.astype(np.float64), y)
    assert mine.coef_.shape == ref.coef_.shape == (1, 6)
    np.testing.assert_allclose(mine.coef_, ref.coef_, atol=2e-3 * np.abs(ref.coef_).max())
    np.testing.assert_allclose(mine.decision_function(X), ref.decision_function(X), atol=5e-3, rtol=5e-3)


def test_large_feature_means_keep_float32_precision():
    """Codes far from zero (mean 1e4, spread 1): the blocks are centred before the product."""
    from cnncodes.pipelines.probes.classifiers import make_pipeline
    from cnncodes.pipelines.probes.solver.cv_path import CVPath
    X, y = _problem(200, 10, offset=0.0)
    X = (X + 1e4).astype(np.float32)
    path = CVPath(X, y, [(np.arange(100, 200), np.arange(100)), (np.arange(100), np.arange(100, 200))],
                  "softmax", "standard")
    path.run((1.0,))
    mine = path.refit(1.0, tol=1e-7, max_iter=3000)
    ref = make_pipeline("softmax", 1.0, "standard").set_params(clf__tol=1e-12, clf__max_iter=10000).fit(X, y)
    np.testing.assert_allclose(mine.decision_function(X) - mine.decision_function(X).mean(1, keepdims=True),
                               ref.decision_function(X) - ref.decision_function(X).mean(1, keepdims=True),
                               atol=5e-3)


def _svm_objective(X, y, W, b, C):
    """liblinear's one-vs-rest squared-hinge objective (penalised intercept) of weights (K, D)."""
    T = np.where(y[:, None] == np.arange(W.shape[0])[None], 1, -1)
    h = np.maximum(0, 1 - T * (X.astype(np.float64) @ W.T + b))
    return 0.5 * (W ** 2).sum() + 0.5 * (b ** 2).sum() + C * (h ** 2).sum()


@pytest.mark.parametrize("offset", [0.0, 100.0])
def test_the_dual_svm_on_rows_far_from_zero_reaches_the_optimum(offset):
    """Fewer rows than dimensions, rows as given (``--norm none``) whose mean dwarfs their
    spread: the dual basis is of the centred rows plus the mean's direction, so no direction of
    the spread is lost to float32 (the uncentred Gram matrix lost them: objective 960 against
    0.8 at offset 100). The reference is liblinear's primal solver, which converges here where
    its dual one does not."""
    from cnncodes.pipelines.probes.solver.backends import backend
    from cnncodes.pipelines.probes.solver.cv_path import fit_one
    from cnncodes.pipelines.probes.solver.forms import make_design
    X, y = _problem(40, 300, offset=offset)
    design, spans = make_design(backend("cpu"), X, np.ones((1, 40), dtype=bool), False, "squared_hinge", 3)
    assert spans is not None  # the dual form
    mine, _ = fit_one(X, y, "squared_hinge", 0.3, tol=1e-7, max_iter=3000)
    ref = LinearSVC(C=0.3, dual=False, max_iter=200000, tol=1e-10).fit(X.astype(np.float64), y)
    assert _svm_objective(X, y, mine.coef, mine.intercept, 0.3) <= \
        _svm_objective(X, y, ref.coef_, ref.intercept_, 0.3) * (1 + 1e-5)
    np.testing.assert_allclose(mine.coef, ref.coef_, atol=3e-3 * np.abs(ref.coef_).max())
    np.testing.assert_allclose(mine.intercept, ref.intercept_, atol=1e-3)
    assert (mine.predict(X) == ref.predict(X)).all()


def test_the_dual_svm_keeps_every_direction_under_a_dominant_one():
    """Rows a_i m + noise with m ~ 1e4 (``--norm none``): centring leaves the common scale's
    direction dwarfing the others by 1e8; the Gram matrix of rows as given is decomposed in
    float64, so none is lost (in float32: 25 of 39 kept, 7.6% off the optimum)."""
    from cnncodes.pipelines.probes.solver.backends import backend
    from cnncodes.pipelines.probes.solver.cv_path import fit_one
    from cnncodes.pipelines.probes.solver.forms import make_design
    rng = np.random.default_rng(1)
    n, D = 40, 120
    y = rng.integers(0, 3, n)
    X = (rng.uniform(0.9, 1.1, n)[:, None] * rng.uniform(50, 150, D)[None] * 10 + rng.normal(size=(n, D))
         + np.eye(3)[y] @ rng.normal(size=(3, D))).astype(np.float32)
    everything = np.ones((1, n), dtype=bool)
    _, spans = make_design(backend("cpu"), X, everything, False, "squared_hinge", 3, exact=True)
    assert spans[0].r >= n - 1  # none lost (the rows centred in float32 may keep one more)
    mine, _ = fit_one(X, y, "squared_hinge", 0.3, tol=1e-7, max_iter=3000)
    ref = LinearSVC(C=0.3, dual=False, max_iter=200000, tol=1e-10).fit(X.astype(np.float64), y)
    assert _svm_objective(X, y, mine.coef, mine.intercept, 0.3) <= \
        _svm_objective(X, y, ref.coef_, ref.intercept_, 0.3) * 1.01


@pytest.mark.parametrize("classifier", ["svm", "softmax"])
@pytest.mark.parametrize("n,d", [(40, 300), (300, 20)])  # the dual and the primal form
def test_the_torch_backend_gives_the_numpy_backends_models(classifier, n, d):
    """The CUDA backend's code (torch tensors), run on the CPU: the same path as numpy's."""
    import torch

    from cnncodes.pipelines.probes.solver.backends import TorchOps
    from cnncodes.pipelines.probes.solver.cv_path import CVPath
    X, y = _problem(n, d, seed=4, offset=0.5)
    splits = stratified_kfold(y, 3, 0)
    a = CVPath(X, y, splits, classifier, "standard")
    b = CVPath(X, y, splits, classifier, "standard", device=TorchOps(torch.device("cpu")))
    (sa, oa), (sb, ob) = a.run((0.05, 1.0)), b.run((0.05, 1.0))
    assert isinstance(a.X, np.ndarray) and isinstance(b.X, torch.Tensor)
    assert (oa == ob).mean() >= 0.97
    np.testing.assert_allclose(np.array(sa), np.array(sb), atol=0.05)
    fa, fb = a.refit(1.0, tol=1e-6, max_iter=2000), b.refit(1.0, tol=1e-6, max_iter=2000)
    np.testing.assert_allclose(fa.decision_function(X), fb.decision_function(X), atol=0.02, rtol=0.02)


@pytest.mark.gpu
@pytest.mark.parametrize("classifier", ["svm", "softmax"])
@pytest.mark.parametrize("n,d", [(40, 300), (300, 20)])
def test_the_cv_path_on_cuda_matches_the_cpu(classifier, n, d):
    from sklearn.model_selection import StratifiedKFold

    from cnncodes.pipelines.probes.solver.cv_path import CVPath
    X, y = _problem(n, d, seed=2)
    splits = list(StratifiedKFold(2, shuffle=True, random_state=0).split(X, y))
    cpu, gpu = (CVPath(X, y, splits, classifier, "standard", device=dev) for dev in ("cpu", "cuda"))
    (s_cpu, _), (s_gpu, _) = cpu.run((0.1, 1.0)), gpu.run((0.1, 1.0))
    assert gpu.X.is_cuda and isinstance(cpu.X, np.ndarray)
    np.testing.assert_allclose(np.array(s_cpu), np.array(s_gpu), atol=0.05)
    np.testing.assert_allclose(cpu.refit(1.0).decision_function(X), gpu.refit(1.0).decision_function(X),
                               atol=0.02, rtol=0.02)


def test_a_numbered_cuda_device_is_understood():
    """``cuda:1`` names one GPU of several; without CUDA it is the one-line settings error."""
    import torch

    from cnncodes.extractor.errors import SettingsError

    from cnncodes.pipelines.probes.solver.backends import backend
    if torch.cuda.is_available():
        assert backend("cuda:0").device.index == 0
        with pytest.raises(SettingsError, match="CUDA device"):
            backend(f"cuda:{torch.cuda.device_count()}")
    else:
        with pytest.raises(SettingsError, match="cuda:0 was requested but CUDA is not available"):
            backend("cuda:0")
    with pytest.raises(SettingsError, match="cpu or cuda"):
        backend("cuda0")


def test_binary_probabilities_of_extreme_logits_do_not_overflow():
    import warnings

    from cnncodes.pipelines.probes.linear_model import probabilities
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = probabilities(np.array([-800.0, -30.0, 0.0, 800.0]))
    np.testing.assert_allclose(p[:, 1], [0.0, 1 / (1 + np.exp(30.0)), 0.5, 1.0], rtol=1e-12)


@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_narrow_svms_are_solved_by_newtons_method_to_liblinears_optimum(offset):
    """Narrow codes (<= NEWTON_MAX_DIM) go to Newton's method, rows far from zero included:
    the same optimum as liblinear's primal solver, per fold and class, and the CV path uses it."""
    from cnncodes.pipelines.probes.solver.cv_path import CVPath, fit_one
    from cnncodes.pipelines.probes.solver.newton import NEWTON_MAX_DIM, NewtonSVM
    X, y = _problem(240, 12, k=4, seed=3, offset=offset)
    assert X.shape[1] <= NEWTON_MAX_DIM
    mine, steps = fit_one(X, y, "squared_hinge", 2.0, tol=1e-8)
    ref = LinearSVC(C=2.0, dual=False, max_iter=200000, tol=1e-12).fit(X.astype(np.float64), y)
    np.testing.assert_allclose(mine.coef, ref.coef_, atol=1e-3 * np.abs(ref.coef_).max())
    np.testing.assert_allclose(mine.intercept, ref.intercept_,
                               atol=1e-3 * max(1.0, np.abs(ref.intercept_).max()))
    assert steps < 60
    splits = stratified_kfold(y, 3, 0)
    path = CVPath(X, y, splits, "svm", "standard")
    path.run((0.1, 10.0))
    assert isinstance(path.design, NewtonSVM)
    refit = path.refit(10.0, tol=1e-8)
    from cnncodes.pipelines.probes.classifiers import make_pipeline
    ref = make_pipeline("svm", 10.0, "standard").set_params(clf__dual=False, clf__tol=1e-12,
                                                             clf__max_iter=200000).fit(X, y)
    np.testing.assert_allclose(refit.decision_function(X), ref.decision_function(X), atol=2e-3)


def test_every_models_weights_give_its_own_scores():
    """``model_weights`` of model m (not only the first) on rows as given: its intercept takes
    its own shift (the rows' mean it was centred on)."""
    from cnncodes.pipelines.probes.solver.backends import backend
    from cnncodes.pipelines.probes.solver.forms import model_weights
    from cnncodes.pipelines.probes.solver.primal import shared_design
    from cnncodes.pipelines.probes.solver.problem import BatchedProblem
    X, y = _problem(120, 8, offset=3.0)
    masks = np.zeros((2, 120), dtype=bool)
    masks[0, :80], masks[1, 40:] = True, True
    design = shared_design(backend("cpu"), X, masks, standardise=False)
    omega, b = BatchedProblem(design, y.astype(np.int64), masks, 3, "squared_hinge").solve(1.0)
    pred = np.concatenate([S.argmax(1) for _, S in design.block_scores(omega, b)], axis=1)
    for m in range(2):
        W, c = model_weights(design, None, omega, b, m)
        np.testing.assert_array_equal(np.argmax(X @ W + c, 1), pred[m])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_scipys_products_and_eigendecomposition_are_numpys(dtype):
    """The dual form's setup runs in one library (scipy's BLAS beside its LAPACK, numpy's for
    small matrices): the same Gram matrices, products and eigenpairs from either, for C-ordered
    blocks and for strided ones (which BLAS gets as copies)."""
    from cnncodes.pipelines.probes.solver.linalg import NumpyLinalg, ScipyLinalg
    rng = np.random.default_rng(0)
    A, B = rng.normal(size=(50, 70)).astype(dtype), rng.normal(size=(30, 70)).astype(dtype)
    tol = 1e-4 if dtype == np.float32 else 1e-10
    for la in (NumpyLinalg(), ScipyLinalg(dtype)):
        G, K = la.zeros((50, 50), dtype), la.zeros((30, 50), dtype)
        for cols in (slice(0, 40), slice(40, 70)):
            a, b = np.ascontiguousarray(A[:, cols]), B[:, cols]          # contiguous / strided
            G, K = la.add_gram(G, a), la.add_cross(K, b, a)
        np.testing.assert_allclose(np.triu(G), np.triu(A @ A.T), rtol=tol, atol=tol * 70)
        np.testing.assert_allclose(K, B @ A.T, rtol=tol, atol=tol * 70)
        np.testing.assert_allclose(la.matmul(A, B.T), A @ B.T, rtol=tol, atol=tol * 70)
        np.testing.assert_allclose(la.matmul(A[:, ::2], B[:, ::2].T), A[:, ::2] @ B[:, ::2].T, rtol=tol,
                                   atol=tol * 70)
        lam, U = la.eigh(G)                                   # reads the upper triangle alone
        np.testing.assert_allclose((U * lam) @ U.T, A @ A.T, rtol=tol, atol=tol * 1e3)


@pytest.mark.parametrize("classifier,norm", [("svm", "standard"), ("softmax", "standard"), ("svm", "none"),
                                             ("softmax", "none")])
def test_the_dual_form_in_scipy_is_the_dual_form_in_numpy(classifier, norm, monkeypatch):
    """Spans from 256 training rows on are built in scipy (``SCIPY_EIGH_FROM``): the same
    folds' models, scores and refit as numpy's path for smaller ones, the SVM's centred span
    with its mean terms and the float64 span of rows as given (``--norm none``) included."""
    from cnncodes.pipelines.probes.solver import cv_path, dual, linalg
    X, y = _problem(45, 200, seed=5, offset=1.5)
    splits = stratified_kfold(y, 3, 0)
    runs = []
    for start in (10_000, 2):
        monkeypatch.setattr(linalg, "SCIPY_EIGH_FROM", start)
        path = cv_path.CVPath(X, y, splits, classifier, norm)
        scores, oof = path.run((0.05, 1.0))
        assert isinstance(path.design, dual.FoldBases)
        runs.append((np.array(scores), oof, path.refit(1.0, tol=1e-6, max_iter=2000).decision_function(X)))
    (sa, oa, da), (sb, ob, db) = runs
    np.testing.assert_allclose(sa, sb, atol=1 / 15)
    assert (oa == ob).mean() >= 0.97
    np.testing.assert_allclose(da, db, atol=0.02 * np.abs(da).max())


def test_scipy_is_imported_while_the_codes_are_read_only_where_it_will_be_used(tmp_path):
    """load_codes tells its caller the codes' shape before reading them; fit_linear_probe
    starts importing scipy.linalg then where the fit will decompose a matrix that large."""
    import subprocess
    import sys

    from cnncodes.pipelines.probes.codes import load_codes

    from tests.test_classifiers import make_cache
    make_cache(tmp_path / "c.h5")
    seen = []
    c = load_codes(tmp_path / "c.h5", "penultimate", before_read=lambda n, d: seen.append((n, d)))
    assert seen == [c.X.shape]
    probe = ("import sys, threading; from cnncodes.pipelines.probes.solver import linalg; "
             "linalg.prefetch_linalg({}, {}); "
             "[t.join() for t in threading.enumerate() if t.name == 'import scipy.linalg']; "
             "print('scipy.linalg' in sys.modules)")
    for (n, d), expected in (((1000, 2000), "True"), ((1000, 40), "False"), ((300, 2000), "False")):
        out = subprocess.run([sys.executable, "-c", probe.format(n, d)], capture_output=True, text=True,
                             check=True)
        assert out.stdout.strip() == expected, (n, d, out.stderr)


def test_scipys_blas_loaded_inside_a_solver_block_gets_the_blocks_thread_limit():
    """scipy's own OpenBLAS loads when the first large decomposition is set up, inside the
    solver's threads() block: it is limited too (a busy machine's one thread), and restored
    with the block."""
    import subprocess
    import sys
    probe = """
import numpy as np
from threadpoolctl import threadpool_info
from cnncodes.pipelines.probes.solver import backends
backends.threads_for_solver = lambda: 1
ops = backends.Ops()
with ops.threads():
    ops.linalg(300, np.float32)
    inside = {i["filepath"]: i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}
after = {i["filepath"]: i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}
print(len(inside), max(inside.values()), min(after.values()))
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    libraries, most_inside, least_after = map(int, out.stdout.split())
    assert libraries >= 2 and most_inside == 1, out.stdout      # numpy's and scipy's, both limited
    import os
    if (os.cpu_count() or 1) > 1:
        assert least_after > 1, out.stdout                       # and restored

"""Linear probes on real HDF5 caches (synthetic codes) with real scikit-learn."""
import json

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.preprocessing import StandardScaler

from cnncodes.extractor.cache import DONE, FAILED, LayerSpec, create_cache
from cnncodes.extractor.writer import CacheWriter

from cnncodes.pipelines.cli import cli
from cnncodes.pipelines.probes.artifacts import ModelFileError, load_model, save_model, sidecar
from cnncodes.pipelines.probes.classifiers import fit_linear_probe, parse_c_grid
from cnncodes.pipelines.probes.codes import CodesError, load_codes
from cnncodes.pipelines.probes.predict import evaluate_model

RECIPE = {"model": "resnet18", "weights": {"name": "none", "file": None, "sha256": None},
          "weights_sha256": "none", "preprocessing": {"crop": 224}, "pooling": "avg",
          "dtype": "float32", "precision": "fp32", "image_fingerprint": "f"}


def make_cache(path, n_per_class=12, classes=3, dim=8, splits=True, seed=0, status=None, recipe=None):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(classes), n_per_class)
    centers = rng.normal(0, 3, size=(classes, dim))
    X = (centers[y] + rng.normal(0, 1, size=(len(y), dim))).astype(np.float32)
    sp = [("test" if i % n_per_class < n_per_class // 4 else "train") if splits else ""
          for i in range(len(y))]
    create_cache(path, paths=[f"c{c}/{i}.png" for i, c in enumerate(y)], labels=y, splits=sp,
                 classes=[f"class{c}" for c in range(classes)],
                 layers=[LayerSpec("penultimate", dim, {"module": "fc", "kind": "input"}),
                         LayerSpec("layer3", 4, {"module": "layer3", "kind": "output"})],
                 attrs=recipe or RECIPE)
    st = np.full(len(y), DONE) if status is None else status
    with CacheWriter(path) as w:
        rows = np.flatnonzero(st != 0)
        w.add(rows, st[rows], ["boom" if s == FAILED else "" for s in st[rows]],
              {"penultimate": X[rows], "layer3": X[rows, :4]})
        w.commit()
    return X, y


@pytest.mark.parametrize("classifier", ["svm", "softmax"])
def test_fit_uses_train_for_cv_and_scores_test_once(tmp_path, classifier):
    make_cache(tmp_path / "c.h5")
    r = fit_linear_probe(tmp_path / "c.h5", classifier=classifier, c_grid="0.01,1", n_jobs=2)
    assert (r.n_train, r.n_test) == (27, 9) and r.layer == "penultimate"
    assert r.test_accuracy >= 0.8 and 0 <= r.cv_std < 0.5 and r.C in (0.01, 1.0)
    d = r.as_dict()
    for key in ("layer", "classifier", "C", "cv_accuracy", "cv_std", "test_accuracy",
                "balanced_accuracy", "macro_f1", "n_train", "n_test", "seconds"):
        assert key in d
    assert sorted(set(r.fold_of_row.tolist())) == [0, 1, 2, 3, 4]


def test_without_splits_holdout_or_cv_only(tmp_path):
    make_cache(tmp_path / "c.h5", splits=False)
    r = fit_linear_probe(tmp_path / "c.h5", c_grid="1", folds=3)
    assert r.n_test == 0 and r.test_accuracy is None and r.evaluated()[0].startswith("cross-validation")
    r = fit_linear_probe(tmp_path / "c.h5", c_grid="1", folds=3, holdout=0.25)
    assert r.n_test == 9 and r.test_accuracy is not None


def test_normalisation_is_fitted_inside_each_fold(tmp_path, monkeypatch):
    X, _ = make_cache(tmp_path / "c.h5", splits=False)
    seen = []
    original = StandardScaler.fit

    def spy(self, data, y=None, **kw):
        seen.append({tuple(np.round(row, 5)) for row in np.asarray(data)})
        return original(self, data, y, **kw)
    monkeypatch.setattr(StandardScaler, "fit", spy)
    # the scikit-learn path's Pipeline (the batched solver's per-fold moments are checked
    # against it in test_batched.py)
    r = fit_linear_probe(tmp_path / "c.h5", c_grid="0.1,1", folds=3, solver="sklearn")
    rows = [tuple(np.round(row, 5)) for row in X]
    for k in range(3):
        held = {rows[i] for i in np.flatnonzero(r.fold_of_row == k)}
        fold_fits = [s for s in seen if len(s) == len(rows) - len(held) and not (s & held)]
        assert len(fold_fits) >= 2  # one scaler fit per C on exactly this fold's training rows
    # only the refit sees all
    assert all(len(s) < len(rows) for s in seen[:-1]) and len(seen[-1]) == len(rows)


def test_bad_inputs_are_explained(tmp_path):
    make_cache(tmp_path / "c.h5")
    with pytest.raises(CodesError, match="holds: penultimate, layer3"):
        load_codes(tmp_path / "c.h5", "layer9")
    with pytest.raises(CodesError, match="fewer training images than --folds 20.*--folds 9"):
        fit_linear_probe(tmp_path / "c.h5", folds=20)
    make_cache(tmp_path / "one.h5", classes=1)
    with pytest.raises(CodesError, match="at least 2 classes"):
        fit_linear_probe(tmp_path / "one.h5")
    with pytest.raises(ValueError, match="> 0"):
        parse_c_grid("0,1")
    status = np.full(36, DONE)
    status[:5] = 0
    status[5] = FAILED
    make_cache(tmp_path / "part.h5", status=status)
    with pytest.raises(CodesError, match="incomplete.*--allow-incomplete"):
        load_codes(tmp_path / "part.h5")
    c = load_codes(tmp_path / "part.h5", allow_incomplete=True)
    assert len(c.y) == 30 and c.excluded == {"failed": 1, "pending": 5}
    with h5py.File(tmp_path / "c.h5", "r+") as f:
        f["codes/penultimate"][3, 0] = np.nan
    with pytest.raises(CodesError, match="NaN or infinite.*c0/3.png"):
        load_codes(tmp_path / "c.h5")


def test_saved_model_round_trip_and_tamper_checks(tmp_path):
    make_cache(tmp_path / "c.h5")
    r = fit_linear_probe(tmp_path / "c.h5", classifier="softmax", c_grid="1")
    path = save_model(r, tmp_path / "m.joblib")
    m = load_model(path)
    assert m.classes == r.classes and m.recipe["model"] == "resnet18" and m.layer == "penultimate"
    assert evaluate_model(m, tmp_path / "c.h5")["accuracy"] >= 0.8
    with pytest.raises(ModelFileError, match="exists"):
        save_model(r, path)
    path.write_bytes(path.read_bytes() + b"x")
    with pytest.raises(ModelFileError, match="changed or damaged after saving"):
        load_model(path)
    sidecar(path).unlink()
    path.write_bytes(path.read_bytes()[:-1])
    assert load_model(path).classes == r.classes  # arrays + JSON run no code: no checksum needed
    import joblib
    joblib.dump({"format": "cnncodes-model"}, tmp_path / "p.joblib")
    with pytest.raises(ModelFileError, match="no p.joblib.sha256 beside it.*refusing to unpickle it"):
        load_model(tmp_path / "p.joblib")  # a pickle is never read without its checksum


def test_evaluate_refuses_another_recipe(tmp_path):
    make_cache(tmp_path / "a.h5")
    make_cache(tmp_path / "b.h5", recipe=dict(RECIPE, pooling="max"))
    m = save_model(fit_linear_probe(tmp_path / "a.h5", c_grid="1"), tmp_path / "m.joblib")
    from cnncodes.extractor.errors import IncompatibleCacheError
    with pytest.raises(IncompatibleCacheError, match="pooling: 'avg' \\(model\\), 'max' \\(cache\\)"):
        evaluate_model(m, tmp_path / "b.h5")


def test_cli_fit_json_report_and_errors(tmp_path):
    make_cache(tmp_path / "c.h5")
    run = lambda *a: CliRunner().invoke(cli, [str(x) for x in a], catch_exceptions=False)
    r = run("fit-svm", "--cache", tmp_path / "c.h5", "--c-grid", "0.1,1", "--json",
            "--report", tmp_path / "rep", "--out", tmp_path / "m.joblib")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["classifier"] == "svm" and d["test_accuracy"] is not None and d["n_test"] == 9
    assert (tmp_path / "rep" / "confusion.png").stat().st_size > 1000
    per_class = (tmp_path / "rep" / "per_class.csv").read_text().splitlines()
    assert per_class[0] == "class,precision,recall,f1,support" and len(per_class) == 4
    fit = json.loads((tmp_path / "rep" / "fit.json").read_text())
    assert fit["seed"] == 0 and fit["c_grid"] == [0.1, 1.0] and "scikit-learn" in fit["versions"]
    assert len(fit["fold_of_train_row"]) == 27
    r = run("fit-svm", "--cache", tmp_path / "c.h5", "--out", tmp_path / "m.joblib")
    assert r.exit_code == 1 and "--overwrite" in r.output
    r = run("fit-softmax", "--cache", tmp_path / "c.h5", "--layer", "nope")
    assert r.exit_code == 1 and "holds: penultimate, layer3" in r.output
    r = run("fit-softmax", "--cache", tmp_path / "c.h5", "--c-grid", "a,b")
    assert r.exit_code == 2 and "Invalid value for '--c-grid'" in r.output and "comma-separated" in r.output
    r = run("fit-softmax", "--cache", tmp_path / "c.h5")
    assert r.exit_code == 0 and "<- chosen" in r.output and "test: accuracy" in r.output


@pytest.mark.parametrize("classifier", ["svm", "softmax"])
@pytest.mark.parametrize("norm", ["standard", "power"])
def test_batched_solver_matches_scikit_learn_on_the_same_grid_and_folds(tmp_path, classifier, norm):
    make_cache(tmp_path / "c.h5", n_per_class=30, classes=4, dim=16, seed=3)
    kw = dict(classifier=classifier, c_grid="0.01,0.1,1", norm=norm, folds=4)
    a = fit_linear_probe(tmp_path / "c.h5", solver="sklearn", **kw)
    b = fit_linear_probe(tmp_path / "c.h5", solver="batched", **kw)
    assert (a.solver, b.solver) == ("sklearn", "batched")
    assert np.array_equal(a.fold_of_row, b.fold_of_row)
    for ga, gb in zip(a.grid, b.grid):
        assert abs(ga["mean"] - gb["mean"]) <= 0.02  # 120 rows: one row is 0.8 points
    assert abs(a.test_accuracy - b.test_accuracy) <= 0.05
    m = save_model(b, tmp_path / "t.joblib")
    # read back as the scikit-learn estimator of the same loss (arrays, no torch): same predictions
    loaded = load_model(m).pipeline
    assert type(loaded[-1]).__name__ == ("LinearSVC" if classifier == "svm" else "LogisticRegression")
    X = np.random.default_rng(0).normal(size=(20, 16)).astype(np.float32)
    np.testing.assert_array_equal(loaded.predict(X), b.pipeline.predict(X))
    np.testing.assert_allclose(loaded.decision_function(X), b.pipeline.decision_function(X), rtol=1e-6,
                               atol=1e-9)
    if classifier == "softmax":
        np.testing.assert_allclose(loaded.predict_proba(X), b.pipeline.predict_proba(X), rtol=1e-6,
                                   atol=1e-12)
    else:
        assert not hasattr(b.pipeline, "predict_proba") and not hasattr(loaded, "predict_proba")
    assert type(b.pipeline.to_pipeline()[-1]) is type(loaded[-1])
    # "torch", the batched solver's former name, still selects it
    assert fit_linear_probe(tmp_path / "c.h5", solver="torch", **kw).solver == "batched"


def test_batched_solver_refuses_pca(tmp_path):
    make_cache(tmp_path / "c.h5")
    with pytest.raises(ValueError, match="does not do PCA"):
        fit_linear_probe(tmp_path / "c.h5", solver="batched", pca=4)
    assert fit_linear_probe(tmp_path / "c.h5", pca=4, c_grid="1").solver == "sklearn"


@pytest.mark.parametrize("classifier,norm,pca,solver", [
    ("svm", "standard", None, "sklearn"), ("softmax", "l2", None, "sklearn"),
    ("svm", "power", "whiten", "sklearn"),
    ("softmax", "none", 3, "sklearn"), ("softmax", "standard", None, "batched"),
    ("svm", "power", None, "batched"), ("softmax", "l2", None, "batched"), ("svm", "none", None, "batched")])
def test_saved_models_are_arrays_that_run_no_code_and_predict_the_same(tmp_path, classifier, norm,
                                                                       pca, solver):
    import zipfile

    from cnncodes.pipelines.probes.artifacts import load_model, save_model
    from cnncodes.pipelines.probes.classifiers import fit_linear_probe

    from .test_house import toy_cache
    cache = toy_cache(tmp_path / "c.h5", n=60, dim=6)
    r = fit_linear_probe(cache, "l1", classifier, folds=2, c_grid="0.1,1", norm=norm, pca=pca, solver=solver)
    path = save_model(r, tmp_path / "m.joblib")
    assert zipfile.is_zipfile(path)  # an .npz of arrays + JSON, whatever the name
    m = load_model(path)
    X = np.random.default_rng(1).normal(size=(25, 6)).astype(np.float32) * 3
    np.testing.assert_array_equal(m.pipeline.predict(X), r.pipeline.predict(X))
    np.testing.assert_allclose(m.pipeline.decision_function(X), r.pipeline.decision_function(X),
                               rtol=1e-5, atol=1e-6)
    if classifier == "softmax":
        np.testing.assert_allclose(m.pipeline.predict_proba(X), r.pipeline.predict_proba(X),
                                   rtol=1e-5, atol=1e-6)
    assert (m.classes, m.layer, m.C) == (list(r.classes), "l1", r.C)


@pytest.mark.parametrize("seed", [0, 1, 7])
@pytest.mark.parametrize("folds", [2, 3, 5])
@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_folds_and_scores_are_scikit_learns(seed, folds):
    """The numpy copies the fit commands use instead of importing scikit-learn give its folds
    exactly and its scores, on labels of uneven classes in a shuffled order."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score
    from sklearn.model_selection import StratifiedKFold

    from cnncodes.pipelines.probes.metrics import classification_scores, confusion, stratified_kfold
    rng = np.random.default_rng(seed)
    for y in (rng.permutation(np.repeat(np.arange(7), [5, 9, 13, 6, 30, 5, 8])), rng.integers(0, 3, 101),
              np.array([3, 3, 1, 1, 1, 2, 2, 2, 2, 3, 1, 2])):
        if np.bincount(y)[np.bincount(y) > 0].min() < folds:
            continue
        theirs = list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(y, y))
        mine = stratified_kfold(y, folds, seed)
        assert len(mine) == len(theirs)
        for (a, b), (c, d) in zip(mine, theirs):
            np.testing.assert_array_equal(a, c)
            np.testing.assert_array_equal(b, d)
        pred = np.where(rng.random(len(y)) < 0.3, rng.integers(0, 9, len(y)), y)  # classes y lacks too
        acc, bal, f1 = classification_scores(y, pred)
        assert acc == pytest.approx(accuracy_score(y, pred))
        assert bal == pytest.approx(balanced_accuracy_score(y, pred))
        assert f1 == pytest.approx(f1_score(y, pred, average="macro"))
        np.testing.assert_array_equal(confusion(y, pred, 9), confusion_matrix(y, pred, labels=np.arange(9)))

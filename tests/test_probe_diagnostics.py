"""Class weights, the selection metric, calibration, suspected label errors and the few-shot
protocol of the linear probes, on real HDF5 caches of synthetic codes with real scikit-learn."""
import csv
import json
from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.linear_model import LogisticRegression
from sklearn.svm import LinearSVC
from sklearn.utils.class_weight import compute_class_weight

from cnncodes.pipelines.cli import cli
from cnncodes.pipelines.cli.options import SELECT_OPTIONS
from cnncodes.pipelines.probes.artifacts import load_model, save_model
from cnncodes.pipelines.probes.calibration import expected_calibration_error, fit_temperature, reliability
from cnncodes.pipelines.probes.classifiers import CLASS_WEIGHTS, fit_linear_probe
from cnncodes.pipelines.probes.codes import load_codes
from cnncodes.pipelines.probes.few_shot import draw, few_shot, parse_shots
from cnncodes.pipelines.probes.linear_model import probabilities
from cnncodes.pipelines.probes.metrics import SELECT, balanced_weights, imbalance, stratified_kfold
from cnncodes.pipelines.probes.solver.cv_path import CVPath
from cnncodes.pipelines.probes.suspects import rank_suspects

from .test_classifiers import make_cache


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_option_choices_are_the_librarys():
    import click
    cmd = cli.get_command(click.Context(cli), "fit-svm")
    assert len(SELECT_OPTIONS) == 2
    params = {p.name: p for p in cmd.params}
    assert tuple(params["select"].type.choices) == SELECT
    assert tuple(params["class_weight"].type.choices) == CLASS_WEIGHTS


@pytest.mark.parametrize("seed", range(4))
def test_balanced_weights_are_scikit_learns(seed):
    rng = np.random.default_rng(seed)
    y = rng.choice([2, 5, 7, 9], size=60, p=[0.6, 0.2, 0.15, 0.05])
    mask = rng.random(60) < 0.7
    classes = np.unique(y[mask])
    ref = compute_class_weight("balanced", classes=classes, y=y[mask])
    w = balanced_weights(y, mask)
    np.testing.assert_allclose(w[mask], ref[np.searchsorted(classes, y[mask])])
    assert w[mask].sum() == pytest.approx(mask.sum())
    assert imbalance(y) == pytest.approx(np.bincount(y).max() / np.bincount(y)[np.bincount(y) > 0].min())


def _imbalanced(n=(120, 60, 12), d=10, seed=0, spread=1.6):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(len(n)), n)
    X = rng.normal(0, 1, (len(n), d))[y] + rng.normal(0, spread, (len(y), d))
    return X.astype(np.float32), y


@pytest.mark.parametrize("loss,ref", [
    ("log_loss", lambda C: LogisticRegression(C=C, max_iter=20000, tol=1e-12)),
    ("squared_hinge", lambda C: LinearSVC(C=C, dual=True, max_iter=200000, tol=1e-10))])
@pytest.mark.parametrize("d", [10, 300])  # the primal (Newton for the narrow SVM) and the dual form
def test_class_weighted_fit_is_scikit_learns_with_those_sample_weights(loss, ref, d):
    X, y = _imbalanced(d=d)
    if d > 100:
        X, y = X[::3], y[::3]   # fewer rows than dimensions: the dual
    w = balanced_weights(y)
    path = CVPath(X, y, [], "svm" if loss == "squared_hinge" else "softmax", "none", class_weight="balanced")
    mine = path.refit(0.5, tol=1e-8, max_iter=3000)
    theirs = ref(0.5).fit(X, y, sample_weight=w)
    np.testing.assert_allclose(mine.decision_function(X), theirs.decision_function(X), atol=5e-3, rtol=1e-3)
    plain = CVPath(X, y, [], "svm" if loss == "squared_hinge" else "softmax", "none").refit(0.5)
    assert not np.allclose(plain.decision_function(X), mine.decision_function(X), atol=1e-2)


def test_class_weight_and_select_in_both_solvers(tmp_path):
    X, y = _imbalanced()
    splits = stratified_kfold(y, 4, 0)
    for classifier in ("svm", "softmax"):
        for solver in ("batched", "sklearn"):
            kw = dict(c_grid=[0.001, 0.01, 0.1, 1.0], folds=4, classifier=classifier, solver=solver)
            codes = _codes(tmp_path, X, y)
            plain = fit_linear_probe(codes, **kw)
            weighted = fit_linear_probe(codes, class_weight="balanced", select="balanced_accuracy", **kw)
            assert weighted.class_weight == "balanced" and weighted.select == "balanced_accuracy"
            # the chosen C is the best by the selection metric, the smallest of ties
            scores = [round(g["balanced_accuracy"], 10) for g in weighted.grid]
            assert weighted.C == weighted.grid[scores.index(max(scores))]["C"]
            assert weighted.cv_balanced_accuracy == pytest.approx(max(scores), abs=1e-9)
            # the per-C balanced accuracy is the mean over the folds of its out-of-fold predictions
            assert plain.cv_balanced_accuracy >= 0 and len(splits) == 4
            assert weighted.cv_balanced_accuracy > plain.cv_balanced_accuracy
    assert fit_linear_probe(codes, c_grid="1", folds=4).as_dict()["class_weight"] == "none"


def _codes(tmp_path, X, y, test_share=0.0, seed=0):
    """A real cache of these codes, read back (``test_share`` of each class as the test split)."""
    from cnncodes.extractor.cache import DONE, LayerSpec, create_cache
    from cnncodes.extractor.writer import CacheWriter

    from .test_classifiers import RECIPE
    rng = np.random.default_rng(seed)
    sp = np.array(["train"] * len(y), dtype=object)
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        sp[rng.permutation(rows)[:int(round(test_share * len(rows)))]] = "test"
    path = tmp_path / f"codes-{len(y)}-{X.shape[1]}-{test_share}-{seed}.h5"
    if not path.exists():
        create_cache(path, paths=[f"c{c}/{i}.png" for i, c in enumerate(y)], labels=y, splits=list(sp),
                     classes=[f"class{c}" for c in range(int(y.max()) + 1)],
                     layers=[LayerSpec("penultimate", X.shape[1], {"module": "fc", "kind": "input"})],
                     attrs=RECIPE)
        with CacheWriter(path) as w:
            w.add(np.arange(len(y)), np.full(len(y), DONE), [""] * len(y), {"penultimate": X})
            w.commit()
    return load_codes(path)


def test_knn_refuses_class_weights(tmp_path):
    make_cache(tmp_path / "c.h5")
    with pytest.raises(ValueError, match="no class weights"):
        fit_linear_probe(tmp_path / "c.h5", classifier="knn", class_weight="balanced")
    r = run("fit-softmax", "--cache", tmp_path / "c.h5", "--select", "f1")
    assert r.exit_code == 2 and "--select" in r.output


def test_temperature_ece_and_reliability():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (4000, 5))
    y = np.array([rng.choice(5, p=p) for p in probabilities(logits / 2.5)])   # true temperature 2.5
    assert fit_temperature(logits, y) == pytest.approx(2.5, rel=0.1)
    p = probabilities(logits)
    rel = reliability(p, y)
    conf, right = p.max(1), (p.argmax(1) == y)
    bins = np.clip(np.ceil(conf * 15).astype(int) - 1, 0, 14)
    direct = sum(abs(right[bins == b].sum() - conf[bins == b].sum()) for b in range(15)) / len(y)
    assert rel["ece"] == pytest.approx(direct) and sum(rel["count"]) == len(y)
    assert expected_calibration_error(probabilities(logits / 2.5), y) < rel["ece"] / 3
    # a binary probe's one column is the logit of the second class
    s = rng.normal(0, 2, 500)
    yb = (rng.random(500) < probabilities(s / 0.5)[:, 1]).astype(int)
    assert fit_temperature(s, yb) == pytest.approx(0.5, rel=0.15)


@pytest.mark.parametrize("classifier", ["svm", "softmax"])
def test_calibration_lowers_the_held_out_error_and_predict_uses_it(tmp_path, classifier):
    X, y = _imbalanced(n=(150, 150, 150, 150), spread=2.2, seed=1)
    codes = _codes(tmp_path, X, y, test_share=0.3)
    r = fit_linear_probe(codes, classifier=classifier, c_grid="0.001,0.01,0.1,1,10,100")
    c = r.calibration
    assert c is not None and r.cv_scores.shape == (r.n_train, 4)
    assert c.ece_test_after < c.ece_test_before and c.ece_cv_after < c.ece_cv_before
    # the out-of-fold scores are each row's score by the model of the fold that held it out
    np.testing.assert_array_equal(r.cv_scores.argmax(1), np.searchsorted(r.pipeline.classes_, r.cv_pred))
    m = load_model(save_model(r, tmp_path / f"{classifier}.npz"))
    assert m.temperature == pytest.approx(c.temperature, rel=1e-5)
    proba = m.proba(X[:20])
    np.testing.assert_allclose(proba, probabilities(r.pipeline.decision_function(X[:20]) / c.temperature),
                               rtol=1e-5)
    np.testing.assert_allclose(proba.sum(1), 1.0)


def test_binary_probes_calibrate_their_one_column(tmp_path):
    X, y = _imbalanced(n=(80, 70), spread=2.0, seed=2)
    codes = _codes(tmp_path, X, y, test_share=0.25)
    for classifier in ("svm", "softmax"):
        r = fit_linear_probe(codes, classifier=classifier, c_grid="0.01,1")
        assert r.cv_scores.ndim == 1
        assert ((r.cv_scores > 0).astype(int) == r.cv_pred).all()
        assert r.calibration.ece_cv_after <= r.calibration.ece_cv_before + 1e-9


def test_suspects_find_swapped_labels_and_flag_them():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(6), 100)
    proba = np.full((600, 6), 0.02)
    proba[np.arange(600), y] = 0.9
    swapped = rng.choice(600, 30, replace=False)
    given = y.copy()
    given[swapped] = (y[swapped] + rng.integers(1, 6, 30)) % 6
    proba += rng.uniform(0, 0.05, proba.shape)
    proba /= proba.sum(1, keepdims=True)
    s = rank_suspects(proba, given)
    assert set(s.top(0.05)) == set(swapped)
    # confident learning is conservative: it flags only rows of the wrong label, most of them
    assert set(np.flatnonzero(s.flagged)) <= set(swapped) and s.flagged.sum() >= 0.8 * len(swapped)
    assert (s.predicted[swapped] == y[swapped]).all()


def test_cli_report_writes_suspects_reliability_and_html(tmp_path):
    X, y = _imbalanced(n=(40, 40, 10), spread=1.0, seed=3)
    codes = _codes(tmp_path, X, y, test_share=0.25)
    r = run("fit-svm", "--cache", codes.path, "--report", tmp_path / "rep", "--c-grid", "0.1,1", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["calibration"]["ece_cv_after"] <= out["calibration"]["ece_cv_before"]
    assert "class-weight balanced" in out["notes"][0]     # 30 vs 7 training images a class
    rows = list(csv.DictReader(open(tmp_path / "rep" / "suspects.csv")))
    assert len(rows) == out["n_train"] and [int(x["rank"]) for x in rows] == list(range(1, len(rows) + 1))
    p = [float(x["p_given"]) for x in rows]
    assert p == sorted(p)
    page = (tmp_path / "rep" / "index.html").read_text()
    assert "Suspected label errors" in page and "reliability diagram" in page
    assert (tmp_path / "rep" / "reliability.png").stat().st_size > 1000
    r = run("fit-svm", "--cache", codes.path, "--class-weight", "balanced", "--select", "balanced_accuracy",
            "--c-grid", "0.1,1")
    assert r.exit_code == 0 and "(by balanced_accuracy)" in r.output and "note:" not in r.output


def test_few_shot_draws_k_per_class_and_never_chooses_c_with_test_rows(tmp_path):
    assert parse_shots("10,1, 5") == (1, 5, 10)
    with pytest.raises(ValueError, match="--shots"):
        parse_shots("0,3")
    X, y = _imbalanced(n=(30, 30, 30, 30), spread=2.0, seed=4)
    codes = _codes(tmp_path, X, y, test_share=0.3)
    train = np.flatnonzero(codes.splits != "test")
    picked = draw(codes.y, train, 5, np.random.default_rng(0))
    assert np.isin(picked, train).all() and (np.bincount(codes.y[picked]) == 5).all()
    grid = "0.001,0.01,0.1,1,10"
    r = few_shot(codes, classifier="svm", shots=(1, 2, 5), episodes=3, c_grid=grid)
    # test rows scrambled (codes and labels): every episode chooses the same C on the same rows
    test = codes.splits == "test"
    rng = np.random.default_rng(9)
    X2 = codes.X.copy()
    X2[test] = rng.normal(0, 50, (test.sum(), X.shape[1]))
    y2 = codes.y.copy()
    y2[test] = rng.permutation(y2[test])
    scrambled = few_shot(replace(codes, X=X2, y=y2), classifier="svm", shots=(1, 2, 5), episodes=3,
                         c_grid=grid)
    for a, b in zip(r.rows, scrambled.rows):
        assert [e["C"] for e in a["episodes"]] == [e["C"] for e in b["episodes"]]
        assert [e["cv_accuracy"] for e in a["episodes"]] == [e["cv_accuracy"] for e in b["episodes"]]
    assert [row["shots"] for row in r.rows] == [1, 2, 5]
    assert all(e["C"] == 0.1 and e["cv_accuracy"] is None for e in r.rows[0]["episodes"])  # 1 shot: no CV
    assert r.rows[2]["mean"] > r.rows[0]["mean"] and r.rows[2]["train_rows"] == 20
    again = few_shot(codes, classifier="svm", shots=(1, 2, 5), episodes=3, c_grid=grid)
    assert again.rows == r.rows   # seeded
    res = run("fit-softmax", "--cache", codes.path, "--shots", "1,5", "--episodes", "2", "--json")
    assert res.exit_code == 0 and [s["shots"] for s in json.loads(res.output)["shots"]] == [1, 5]
    res = run("fit-softmax", "--cache", codes.path, "--shots", "5", "--out", tmp_path / "m.npz")
    assert res.exit_code == 1 and "--shots" in res.output
    make_cache(tmp_path / "nosplit.h5", splits=False)
    res = run("fit-svm", "--cache", tmp_path / "nosplit.h5", "--shots", "2")
    assert res.exit_code == 1 and "--holdout" in res.output


# --- the acceptance checks on the shared Caltech photos, with the real Lite0 weights ---------

@pytest.fixture(scope="module")
def caltech_codes(caltech_cache):
    return load_codes(caltech_cache)


@pytest.mark.slow
@pytest.mark.parametrize("classifier", ["svm", "softmax"])
def test_caltech_suspects_rank_swapped_labels_first_and_calibration_holds(caltech_codes, classifier):
    """5% of the training labels swapped at random (seeded): >= 60% of them are in the top 10%
    of suspects; the temperature lowers the test rows' calibration error."""
    c = caltech_codes
    train = np.flatnonzero(c.splits != "test")
    rng = np.random.default_rng(0)
    swapped = rng.choice(train, int(round(0.05 * len(train))), replace=False)
    y = c.y.copy()
    y[swapped] = (y[swapped] + rng.integers(1, len(c.classes), len(swapped))) % len(c.classes)
    r = fit_linear_probe(replace(c, y=y), classifier=classifier)
    top = train[r.suspects().top(0.10)]
    assert np.isin(swapped, top).mean() >= 0.6
    assert r.calibration.ece_test_after < r.calibration.ece_test_before


@pytest.mark.slow
def test_caltech_balanced_class_weights_raise_balanced_accuracy(caltech_codes):
    """Half the classes keep 2 of their 15 training photos: balanced class weights (and C chosen
    by balanced accuracy) raise the test's balanced accuracy."""
    c = caltech_codes
    rng = np.random.default_rng(0)
    keep = np.ones(len(c.y), bool)
    for k in range(len(c.classes) // 2, len(c.classes)):
        rows = np.flatnonzero((c.splits != "test") & (c.y == k))
        keep[rng.permutation(rows)[2:]] = False
    sub = c.take(keep)
    plain = fit_linear_probe(sub, classifier="svm", folds=2)
    weighted = fit_linear_probe(sub, classifier="svm", folds=2, class_weight="balanced",
                                select="balanced_accuracy")
    assert weighted.balanced_accuracy > plain.balanced_accuracy + 0.02

"""The k-NN probe: the same neighbours and votes as a brute-force reference, leakage-free CV,
saved and used like the linear probes."""
import json

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.utils.estimator_checks import parametrize_with_checks

from cnncodes.pipelines.cli import cli
from cnncodes.pipelines.probes.knn import CosineKNNClassifier, cv_knn, parse_k_grid, top_k, vote


def _data(n=120, d=12, k=4, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    X = rng.normal(0, 1, (k, d))[y] + rng.normal(0, 1.2, (n, d))
    return X.astype(np.float32), y


def _brute(Q, K, y_keys, k, T, n_classes, allowed=None):
    """Reference: every similarity, sort, weighted vote (no blocks, no top-k merging)."""
    Qn = Q / np.linalg.norm(Q, axis=1, keepdims=True)
    Kn = K / np.linalg.norm(K, axis=1, keepdims=True)
    S = Qn.astype(np.float64) @ Kn.T.astype(np.float64)
    if allowed is not None:
        S = np.where(allowed, S, -np.inf)
    out = np.zeros((len(Q), n_classes))
    for i in range(len(Q)):
        order = np.argsort(-S[i], kind="stable")[:k]
        order = order[np.isfinite(S[i, order])]
        for j in order:
            out[i, y_keys[j]] += np.exp(S[i, j] / T)
    return out / out.sum(1, keepdims=True)


@parametrize_with_checks([CosineKNNClassifier(k=3)], expected_failed_checks=lambda est: {
    name: "float32 similarities of a subset round a unit in the last place differently (another "
          "matrix-product blocking), so probabilities agree to 1e-6, not sklearn's 1e-7"
    for name in ("check_methods_subset_invariance",)})
def test_sklearn_compatible(estimator, check):
    check(estimator)


@pytest.mark.parametrize("k", [1, 7, 30])
def test_probabilities_match_brute_force(k, monkeypatch):
    import cnncodes.pipelines.probes.knn as knn
    monkeypatch.setattr(knn, "BLOCK_BYTES", 4096)  # many key blocks: the running top-k is exercised
    X, y = _data()
    clf = CosineKNNClassifier(k=k, temperature=0.1).fit(X[:90], y[:90])
    np.testing.assert_allclose(clf.predict_proba(X[90:]), _brute(X[90:], X[:90], y[:90], k, 0.1, 4),
                               atol=1e-5)


def test_cross_validation_never_looks_inside_the_fold():
    X, y = _data(n=60)
    fold = np.arange(60) % 3
    sims, idx = top_k(X / np.linalg.norm(X, axis=1, keepdims=True),
                      X / np.linalg.norm(X, axis=1, keepdims=True),
                      10, fold, fold)
    assert (fold[idx] != fold[:, None]).all()
    scores, oof = cv_knn(X, y, fold, (1, 5, 10), 0.07)
    for g, k in enumerate((1, 5, 10)):
        for f in range(3):
            held, train = fold == f, fold != f
            ref = _brute(X[held], X[train], y[train], k, 0.07, 4).argmax(1)
            assert (oof[g, held] == ref).mean() >= 0.98  # float32 vs float64 ties at most
            assert abs(scores[g][f] - (ref == y[held]).mean()) < 0.05


def test_a_query_with_fewer_keys_than_k_votes_with_what_there_is():
    X, y = _data(n=8)
    p = CosineKNNClassifier(k=50).fit(X, y).predict_proba(X)
    np.testing.assert_allclose(p.sum(1), 1)
    assert vote(np.full((1, 3), -np.inf), np.full((1, 3), -1), 3, 2, 0.1).tolist() == [[0.5, 0.5]]


def test_k_grid_parsing():
    assert parse_k_grid("20,1,5") == (1, 5, 20)
    for bad in ("0,5", "a", "1.5"):
        with pytest.raises(Exception, match="k-grid"):
            parse_k_grid(bad)


def test_fit_knn_command_saves_a_model_that_evaluate_uses(tmp_path):
    from tests.test_classifiers import make_cache
    demo_cache = tmp_path / "c.h5"
    make_cache(demo_cache, n_per_class=20)
    out = tmp_path / "knn.joblib"
    r = CliRunner().invoke(cli, ["fit-knn", "--cache", str(demo_cache), "--layer", "penultimate",
                                 "--k-grid", "1,5,20",
                                 "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output[r.output.find("{"):])
    assert summary["classifier"] == "knn" and summary["k"] in (1, 5, 20) and "C" not in summary
    assert [g["k"] for g in summary["grid"]] == [1, 5, 20]
    e = CliRunner().invoke(cli, ["evaluate", "--model", str(out), "--cache", str(demo_cache), "--json"])
    assert e.exit_code == 0, e.output
    assert json.loads(e.output[e.output.find("{"):])["accuracy"] > 0.8
    from cnncodes.pipelines.probes.artifacts import load_model
    m = load_model(out)
    assert m.has_proba and type(m.pipeline.steps[-1][1]).__name__ == "CosineKNNClassifier"
    bad = CliRunner().invoke(cli, ["fit-knn", "--cache", str(demo_cache), "--k-grid", "0"])
    assert bad.exit_code == 2 and "k-grid" in bad.output


def test_power_norm_is_what_cross_validation_and_the_model_use():
    from cnncodes.pipelines.probes.classifiers import signed_sqrt
    X, y = _data(n=60)
    X = np.abs(X) ** 3  # a power makes the signed square root matter
    fold = np.arange(60) % 3
    power, _ = cv_knn(X, y, fold, (5,), 0.07, norm="power")
    by_hand, _ = cv_knn(signed_sqrt(X), y, fold, (5,), 0.07, norm="l2")
    np.testing.assert_allclose(power, by_hand)


@pytest.mark.gpu
def test_the_search_on_cuda_finds_the_same_neighbours():
    X, y = _data(n=300)
    U = X / np.linalg.norm(X, axis=1, keepdims=True)
    fold = np.arange(300) % 3
    s_cpu, i_cpu = top_k(U, U, 10, fold, fold, device="cpu")
    s_gpu, i_gpu = top_k(U, U, 10, fold, fold, device="cuda")
    np.testing.assert_allclose(s_cpu, s_gpu, atol=1e-5)
    assert (i_cpu == i_gpu).mean() > 0.99

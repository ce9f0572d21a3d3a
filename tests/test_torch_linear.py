import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.svm import LinearSVC
from sklearn.utils.estimator_checks import parametrize_with_checks

from cnncodes.pipelines.probes.torch_linear import TorchLinearClassifier


@parametrize_with_checks([TorchLinearClassifier(), TorchLinearClassifier(loss="log_loss", C=10.0)])
def test_sklearn_compatible(estimator, check):
    check(estimator)


@pytest.mark.parametrize("loss,ref", [("squared_hinge", LinearSVC(C=0.05, dual=False, max_iter=5000)),
                                      ("log_loss", LogisticRegression(C=0.05, max_iter=5000))])
def test_same_solution_as_scikit_learn(loss, ref):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 300)
    X = (rng.normal(0, 1, (4, 20))[y] + rng.normal(0, 1.5, (300, 20))).astype(np.float32)
    mine = TorchLinearClassifier(loss=loss, C=0.05).fit(X, y)
    ref.fit(X, y)
    agree = (mine.predict(X) == ref.predict(X)).mean()
    assert agree >= 0.97
    if loss == "log_loss":  # unpenalised intercepts in both: the same optimum
        np.testing.assert_allclose(mine.coef_, ref.coef_, atol=2e-3)

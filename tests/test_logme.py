"""LogME against a direct computation of the evidence on small data."""
import numpy as np
import pytest
from scipy.stats import multivariate_normal

from cnncodes.pipelines.probes.logme import _spectrum, log_evidence, logme, maximise_evidence


def _direct(F, y, alpha, beta):
    """log N(y; 0, I/beta + F F^T / alpha): the evidence with w integrated out by brute force."""
    n = len(y)
    return multivariate_normal(np.zeros(n), np.eye(n) / beta + F @ F.T / alpha).logpdf(y)


@pytest.mark.parametrize("n,d", [(40, 6), (12, 30)])  # more samples than features, and fewer
def test_closed_form_evidence_matches_the_gaussian_marginal(n, d):
    rng = np.random.default_rng(n)
    F = rng.normal(size=(n, d))
    y = (rng.random(n) > 0.5).astype(float)
    for alpha, beta in [(1.0, 1.0), (0.3, 7.0), (20.0, 0.5)]:
        assert log_evidence(F, y, alpha, beta) == pytest.approx(_direct(F, y, alpha, beta), rel=1e-9)


@pytest.mark.parametrize("n,d", [(60, 5), (15, 40)])
def test_fixed_point_is_the_maximum_of_the_evidence(n, d):
    rng = np.random.default_rng(d)
    F = rng.normal(size=(n, d))
    y = F[:, 0] * 0.7 + 0.3 * rng.normal(size=n)
    sigma, U = _spectrum(F)
    alpha, beta, L = maximise_evidence(n, d, sigma, U.T @ y, float(y @ y))
    assert L == pytest.approx(_direct(F, y, alpha, beta), rel=1e-9)
    for fa in (0.5, 0.9, 1.1, 2.0):           # a grid around the optimum is never higher
        for fb in (0.5, 0.9, 1.1, 2.0):
            assert _direct(F, y, alpha * fa, beta * fb) < L + 1e-9


def test_logme_ranks_informative_codes_above_noise_and_is_per_sample():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 300)
    informative = np.eye(4)[y] @ rng.normal(size=(4, 16)) + 0.3 * rng.normal(size=(300, 16))
    noise = rng.normal(size=(300, 16))
    assert logme(informative, y) > logme(noise, y)
    # One score per class, averaged, and divided by n: doubling the data keeps the scale.
    twice = logme(np.vstack([informative, informative]), np.concatenate([y, y]))
    assert twice == pytest.approx(logme(informative, y), abs=0.1)
    with pytest.raises(ValueError, match="300 rows but y has 299"):
        logme(noise, y[:-1])

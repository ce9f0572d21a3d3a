"""LogME: a training-free transferability score of CNN codes for a labelled data set.

You, Liu, Wang and Long, "LogME: Practical Assessment of Pre-trained Models for Transfer
Learning", ICML 2021. Each class is a regression target ``y_k`` (its one-hot column) of a
Bayesian linear model ``y_k = F w + noise`` with prior ``w ~ N(0, I / alpha)`` and noise
``N(0, 1 / beta)``. The score is the log of the model evidence ``p(y_k | F)`` at the
``alpha, beta`` that maximise it, divided by the number of samples and averaged over classes.
Higher is better; only the ranking of layers or models on the same data means something.

Written from the paper rather than taken from its reference code, to keep numpy the only
dependency: the fixed-point updates (MacKay's evidence framework) run on the eigenvalues of
``F^T F`` (or of ``F F^T`` when there are fewer samples than features), so each iteration
costs O(rank) and all classes share one decomposition.
"""
from __future__ import annotations

import numpy as np


def _spectrum(F: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Squared singular values ``sigma`` of F and the projections basis ``U`` (n x r), from
    the eigendecomposition of the smaller Gram matrix."""
    n, d = F.shape
    if n > d:
        sigma, V = np.linalg.eigh(F.T @ F)
        keep = sigma > sigma.max() * 1e-12 if sigma.size else sigma > 0
        sigma, V = sigma[keep], V[:, keep]
        U = (F @ V) / np.sqrt(sigma)
    else:
        sigma, U = np.linalg.eigh(F @ F.T)
        keep = sigma > sigma.max() * 1e-12 if sigma.size else sigma > 0
        sigma, U = sigma[keep], U[:, keep]
    return sigma, U


def log_evidence(F: np.ndarray, y: np.ndarray, alpha: float, beta: float) -> float:
    """log p(y | F, alpha, beta) of the Bayesian linear model, by its closed form.

    ``L = n/2 log beta + d/2 log alpha - n/2 log 2 pi - beta/2 |y - F m|^2 - alpha/2 |m|^2
    - 1/2 log det(alpha I + beta F^T F)`` with ``m = beta A^-1 F^T y`` the posterior mean.
    """
    F = np.asarray(F, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n, d = F.shape
    sigma, U = _spectrum(F)
    z = U.T @ y
    return _evidence(n, d, sigma, z, float(y @ y), alpha, beta)


def _evidence(n, d, sigma, z, yy, alpha, beta) -> float:
    shrink = alpha / (alpha + beta * sigma)
    residual = yy - z @ z + np.sum((shrink * z) ** 2)          # |y - F m|^2
    mm = np.sum(beta ** 2 * sigma * z ** 2 / (alpha + beta * sigma) ** 2)  # |m|^2
    logdet = np.sum(np.log(alpha + beta * sigma)) + (d - len(sigma)) * np.log(alpha)
    return float(n / 2 * np.log(beta) + d / 2 * np.log(alpha) - n / 2 * np.log(2 * np.pi)
                 - beta / 2 * residual - alpha / 2 * mm - logdet / 2)


def maximise_evidence(n, d, sigma, z, yy, max_iter: int = 100, tol: float = 1e-5):
    """Fixed-point iteration for the evidence-maximising (alpha, beta); returns (alpha, beta, L)."""
    alpha, beta = 1.0, 1.0
    for _ in range(max_iter):
        gamma = np.sum(beta * sigma / (alpha + beta * sigma))  # effective number of parameters
        mm = np.sum(beta ** 2 * sigma * z ** 2 / (alpha + beta * sigma) ** 2)
        residual = yy - z @ z + np.sum((alpha / (alpha + beta * sigma) * z) ** 2)
        new_alpha = gamma / max(mm, 1e-300)
        new_beta = (n - gamma) / max(residual, 1e-300)
        done = abs(new_alpha - alpha) / alpha < tol and abs(new_beta - beta) / beta < tol
        alpha, beta = new_alpha, new_beta
        if done:
            break
    return alpha, beta, _evidence(n, d, sigma, z, yy, alpha, beta)


def logme(F: np.ndarray, y: np.ndarray) -> float:
    """LogME score of codes ``F`` (n x d) for integer labels ``y``.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> y = rng.integers(0, 3, 200)
    >>> good = np.eye(3)[y] + 0.1 * rng.normal(size=(200, 3))
    >>> bad = rng.normal(size=(200, 3))
    >>> logme(good, y) > logme(bad, y)
    True
    """
    F = np.asarray(F, dtype=np.float64)
    y = np.asarray(y)
    n, d = F.shape
    if n != len(y):
        raise ValueError(f"F has {n} rows but y has {len(y)} labels.")
    sigma, U = _spectrum(F)
    scores = []
    for k in np.unique(y):
        target = (y == k).astype(np.float64)
        _, _, L = maximise_evidence(n, d, sigma, U.T @ target, float(target @ target))
        scores.append(L / n)
    return float(np.mean(scores))

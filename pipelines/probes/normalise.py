"""Row normalisations of the probes' codes: ``power`` (signed square root, then unit rows)
and ``l2`` (unit rows), in numpy alone."""
from __future__ import annotations

import numpy as np


def signed_sqrt(X):
    """Power normalisation's first half (Perronnin et al. 2010): sign(x) * sqrt(|x|)."""
    return np.sign(X) * np.sqrt(np.abs(X))


def normalise_rows(X: np.ndarray, norm: str) -> np.ndarray:
    """``l2`` or ``power`` normalisation into a new float32 array, a block of rows at a time."""
    out = np.empty(X.shape, dtype=np.float32)
    step = max(1, (16 << 20) // max(1, 4 * X.shape[1]))
    for lo in range(0, len(X), step):
        Z = np.asarray(X[lo:lo + step], dtype=np.float32)
        if norm == "power":
            Z = signed_sqrt(Z)
        out[lo:lo + step] = Z / np.maximum(np.linalg.norm(Z, axis=1, keepdims=True),
                                           np.finfo(np.float32).tiny)
    return out

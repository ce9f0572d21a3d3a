"""A k-nearest-neighbour probe on CNN codes: cosine similarity, votes weighted by similarity.

The third classical classifier on CNN codes, and DINO's standard evaluation (Wu et al. 2018,
Caron et al. 2021): codes are L2-normalised, the k most similar training codes vote, each with
weight ``exp(similarity / T)``. Nothing is trained, so cross-validating k costs one search: every
row is a query against every row outside its own fold (the training rows of the fold that holds
it out), and the top ``max(k grid)`` neighbours serve every k. The search runs over blocks of
queries and of keys with a running top-k, so memory is bounded by the codes plus one block of
similarities, on the CPU or on CUDA.
"""
from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data


def normalise_rows(X, norm: str = "l2") -> np.ndarray:
    """Unit rows (after the signed square root for ``power``), as a new float32 array."""
    from cnncodes.pipelines.probes.normalise import normalise_rows as blockwise
    return blockwise(X, norm)

DEFAULT_K_GRID = (1, 5, 10, 20, 50, 100, 200)
DEFAULT_TEMPERATURE = 0.07   # DINO's k-NN evaluation
KNN_NORMS = ("l2", "power")
BLOCK_BYTES = 64 << 20


def parse_k_grid(text) -> tuple[int, ...]:
    """``"1,10,20"`` -> (1, 10, 20); every value an integer >= 1."""
    from cnncodes.pipelines.probes.grids import parse_whole_numbers
    if text is None or text == "":
        return DEFAULT_K_GRID
    return parse_whole_numbers(text, "--k-grid", "1,10,20")


def top_k(queries, keys, k: int, query_groups=None, key_groups=None, device: str = "auto"):
    """The ``k`` most similar keys of every query (dot products of unit rows).

    Where ``query_groups`` and ``key_groups`` are given, a key never answers a query of the same
    group (the rows of a query's own fold are not its neighbours). Returns (similarities,
    key indices), each (n_queries, k), most similar first; missing neighbours (fewer than k
    keys allowed) have similarity -inf and index -1.
    """
    import torch

    from cnncodes.extractor.devices import resolve_device
    dev = resolve_device(device, accelerators=("cuda",))  # CUDA or the CPU
    Q = torch.as_tensor(np.ascontiguousarray(queries, dtype=np.float32), device=dev)
    K = torch.as_tensor(np.ascontiguousarray(keys, dtype=np.float32), device=dev)
    nq, nk = len(Q), len(K)
    k_eff = min(k, nk)
    qg = None if query_groups is None else torch.as_tensor(np.asarray(query_groups), device=dev)
    kg = None if key_groups is None else torch.as_tensor(np.asarray(key_groups), device=dev)
    sims = torch.full((nq, k), -torch.inf, device=dev)
    idx = torch.full((nq, k), -1, dtype=torch.long, device=dev)
    q_step = max(1, min(nq, 4096))
    k_step = max(k_eff, BLOCK_BYTES // (12 * q_step))  # similarities and the merged candidates
    with torch.no_grad():
        for qlo in range(0, nq, q_step):
            qs = slice(qlo, min(nq, qlo + q_step))
            best_s = torch.full((qs.stop - qs.start, k_eff), -torch.inf, device=dev)
            best_i = torch.full_like(best_s, -1, dtype=torch.long)
            for klo in range(0, nk, k_step):
                ks = slice(klo, min(nk, klo + k_step))
                S = Q[qs] @ K[ks].T
                if qg is not None:
                    S.masked_fill_(qg[qs, None] == kg[None, ks], -torch.inf)
                cand_s = torch.cat([best_s, S], 1)
                cand_i = torch.cat([best_i, torch.arange(ks.start, ks.stop, device=dev).expand(len(S), -1)],
                                   1)
                best_s, pos = cand_s.topk(k_eff, dim=1)
                best_i = cand_i.gather(1, pos)
            sims[qs, :k_eff], idx[qs, :k_eff] = best_s, torch.where(torch.isfinite(best_s), best_i, -1)
    return sims.cpu().numpy(), idx.cpu().numpy()


def vote(sims: np.ndarray, labels: np.ndarray, k: int, n_classes: int, temperature: float) -> np.ndarray:
    """Class scores (n, n_classes) from the first ``k`` neighbours: sum of exp(sim / T) per
    class, normalised to sum to one (a row without neighbours scores uniformly)."""
    s, lab = sims[:, :k], labels[:, :k]
    ok = np.isfinite(s) & (lab >= 0)
    top = np.where(ok, s, -np.inf).max(1, keepdims=True)
    w = np.where(ok, np.exp((s - np.where(np.isfinite(top), top, 0)) / temperature), 0.0)  # stable
    cell = (np.arange(len(s))[:, None] * n_classes + np.where(ok, lab, 0)).ravel()
    out = np.bincount(cell, weights=w.ravel(), minlength=len(s) * n_classes).reshape(len(s), n_classes)
    total = out.sum(1, keepdims=True)
    return np.where(total > 0, out / np.where(total > 0, total, 1), 1.0 / n_classes)


class CosineKNNClassifier(ClassifierMixin, BaseEstimator):
    """k-NN on cosine similarity with votes weighted by ``exp(similarity / temperature)``.

    A scikit-learn estimator; put it after a ``Normalizer`` (cnncodes' pipelines do) or give it
    unit rows: it normalises its input rows again either way, so any rows work.

    Examples
    --------
    >>> clf = CosineKNNClassifier(k=20).fit(X_train, y_train)       # doctest: +SKIP
    >>> clf.predict_proba(X_test).shape                              # doctest: +SKIP
    (505, 102)
    """

    def __init__(self, k: int = 20, temperature: float = DEFAULT_TEMPERATURE, device: str = "auto"):
        self.k = k
        self.temperature = temperature
        self.device = device

    def fit(self, X, y):
        X, y = validate_data(self, X, y, dtype=[np.float32, np.float64])
        check_classification_targets(y)
        if isinstance(self.k, bool) or not (isinstance(self.k, (int, np.integer)) and self.k >= 1):
            raise ValueError(f"k must be a whole number >= 1, got {self.k!r}.")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}.")
        self.classes_, self.train_labels_ = np.unique(y, return_inverse=True)
        self.train_codes_ = normalise_rows(X)
        return self

    def predict_proba(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=[np.float32, np.float64])
        sims, idx = top_k(normalise_rows(X), self.train_codes_, self.k, device=self.device)
        labels = np.where(idx >= 0, self.train_labels_[np.maximum(idx, 0)], -1)
        return vote(sims, labels, self.k, len(self.classes_), self.temperature)

    def predict(self, X):
        best = self.predict_proba(X).argmax(1)
        return self.classes_[best]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = True
        return tags


def cv_knn(X: np.ndarray, y: np.ndarray, fold_of_row: np.ndarray, k_grid, temperature: float,
           norm: str = "l2", device: str = "auto"):
    """Cross-validated accuracy of every k (list of per-fold arrays) and the out-of-fold
    predictions per k, from one leakage-free search (a row's neighbours are the training rows
    of the fold that holds it out: every row outside its own fold)."""
    classes, idx = np.unique(y, return_inverse=True)
    U = normalise_rows(X, norm)
    sims, nn = top_k(U, U, max(k_grid), fold_of_row, fold_of_row, device=device)
    labels = np.where(nn >= 0, idx[np.maximum(nn, 0)], -1)
    folds = int(fold_of_row.max()) + 1
    scores, oof = [], np.empty((len(k_grid), len(y)), dtype=y.dtype)
    for g, k in enumerate(k_grid):
        pred = classes[vote(sims, labels, k, len(classes), temperature).argmax(1)]
        oof[g] = pred
        scores.append(np.array([(pred[fold_of_row == f] == y[fold_of_row == f]).mean()
                                for f in range(folds)]))
    return scores, oof

"""The few-shot protocol: K training images per class, drawn N times, each scored on the test rows.

Each episode draws K training rows of every class (seeded by the seed, K and the episode, so a
rerun draws the same rows), chooses C by stratified cross-validation on those K-shot rows
alone (as many folds as ``folds`` and the episode's smallest class allow: min(folds, K) where
every class has K images), refits and scores once on the test rows. Nothing else enters an
episode's fit: no test row (they are not in the fitted codes' training split) and no row of
another episode. Where some class of an episode has one image (K = 1, or a class with a single
training image) there is nothing to cross-validate: C is then the middle of the grid (0.1
with the default grid; ``--c-grid`` with one value fixes it), and ``select`` has nothing to
choose.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from cnncodes.extractor.errors import SettingsError

from cnncodes.pipelines.probes.classifiers import LINEAR, fit_linear_probe, parse_c_grid, split_rows
from cnncodes.pipelines.probes.codes import Codes, load_codes
from cnncodes.pipelines.probes.grids import parse_whole_numbers
from cnncodes.pipelines.probes.metrics import classification_scores

# The folds' gradient tolerance in an episode, looser than a whole fit's (3e-4): an episode's
# folds hold a few images a class, so one image moves its CV accuracy by about a point, far more
# than the tolerance does. Measured on Caltech's codes (101 classes, K = 1, 5, 10, 5 episodes):
# the SVM's episodes chose the same C in every episode and took 28% less time (28.9 -> 20.9 s
# on the quiet 2-core machine); the softmax's choices moved between near-ties, its mean test
# accuracy by +0.1 to +0.3 points.
EPISODE_CV_TOL = 1e-3


def parse_shots(text) -> tuple[int, ...]:
    """``"1,5,10"`` -> (1, 5, 10); every value >= 1."""
    return parse_whole_numbers(text, "--shots")


@dataclass
class FewShotResult:
    """Per K: the test scores of every episode and their mean and standard deviation."""

    layer: str
    classifier: str
    episodes: int
    seed: int
    n_test: int
    classes: int
    rows: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    settings: dict = field(default_factory=dict)   # folds, norm, C grid, select, class weights

    def as_dict(self) -> dict:
        return {"layer": self.layer, "classifier": self.classifier, "episodes": self.episodes,
                "seed": self.seed, "n_test": self.n_test, "classes": self.classes, **self.settings,
                "shots": self.rows, "seconds": round(self.seconds, 3)}


def draw(y: np.ndarray, candidates: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted positions of ``k`` rows of every class among ``candidates`` (all of a class with
    fewer)."""
    picked = [rng.permutation(candidates[y[candidates] == c])[:k] for c in np.unique(y[candidates])]
    return np.sort(np.concatenate(picked))


def few_shot(cache, layer: str | None = None, classifier: str = "svm", shots=(1, 5, 10), episodes: int = 5, *,
             seed: int = 0, folds: int = 5, c_grid=None, norm: str = "standard", holdout: float | None = None,
             class_weight: str | None = None, select: str = "accuracy", allow_incomplete: bool = False,
             progress=None) -> FewShotResult:
    """Mean +- std test scores of ``classifier`` trained on K images a class, per K of ``shots``.

    ``progress(done, total)`` is called after every episode.

    Examples
    --------
    >>> r = few_shot("cache/caltech-efficientnet_lite0.h5", shots=(1, 5, 10))   # doctest: +SKIP
    >>> [(s["shots"], round(s["mean"], 3)) for s in r.rows]                       # doctest: +SKIP
    [(1, 0.412), (5, 0.786), (10, 0.842)]
    """
    t0 = time.perf_counter()
    if classifier not in LINEAR:
        raise SettingsError(f"the few-shot protocol fits a linear probe (svm or softmax), "
                            f"got {classifier!r}.")
    class_weight = None if class_weight in (None, "none") else class_weight
    if episodes < 1:
        raise SettingsError(f"--episodes must be >= 1, got {episodes}.")
    shots = parse_shots(shots)
    grid = parse_c_grid(c_grid if not isinstance(c_grid, (list, tuple)) else ",".join(map(str, c_grid)))
    codes = cache if isinstance(cache, Codes) else load_codes(cache, layer, allow_incomplete)
    train, test = split_rows(codes, holdout, seed)
    if not len(test):
        raise SettingsError("the few-shot protocol scores every episode on test rows: the cache has no test "
                            "split; pass --holdout (a share of the rows kept aside).")
    result = FewShotResult(codes.layer, classifier, episodes, seed, len(test),
                           len(np.unique(codes.y[train])),
                           settings={"folds": folds, "norm": norm, "c_grid": list(grid), "select": select,
                                     "class_weight": class_weight or "none", "holdout": holdout})
    total, done = len(shots) * episodes, 0
    for k in shots:
        runs = []
        for e in range(episodes):
            picked = draw(codes.y, train, k, np.random.default_rng([seed, k, e]))
            runs.append(_episode(codes, picked, test, classifier, grid, folds, norm, class_weight, select,
                                 seed + e))
            done += 1
            if progress:
                progress(done, total)
        acc = np.array([r["test_accuracy"] for r in runs])
        bal = np.array([r["balanced_accuracy"] for r in runs])
        result.rows.append({"shots": k, "mean": float(acc.mean()), "std": float(acc.std()),
                            "balanced_mean": float(bal.mean()), "balanced_std": float(bal.std()),
                            "train_rows": int(np.mean([r["train_rows"] for r in runs])), "episodes": runs})
    result.seconds = time.perf_counter() - t0
    return result


def _episode(codes: Codes, picked, test, classifier, grid, folds, norm, class_weight, select, seed) -> dict:
    """One episode: C by cross-validation on the ``picked`` rows only, scored on ``test``."""
    part = codes.take(np.concatenate([picked, test]), ["train"] * len(picked) + ["test"] * len(test))
    smallest = int(np.unique(codes.y[picked], return_counts=True)[1].min())
    if smallest >= 2:
        r = fit_linear_probe(part, classifier=classifier, c_grid=list(grid), folds=min(folds, smallest),
                             seed=seed, norm=norm, class_weight=class_weight, select=select, calibrate=False,
                             cv_tol=EPISODE_CV_TOL)
        return {"C": r.C, "cv_accuracy": round(r.cv_accuracy, 6), "test_accuracy": r.test_accuracy,
                "balanced_accuracy": r.balanced_accuracy, "train_rows": int(len(picked))}
    from cnncodes.pipelines.probes.solver.cv_path import CVPath
    C = grid[len(grid) // 2]   # one image of a class: nothing to cross-validate
    model = CVPath(codes.X[picked], codes.y[picked], [], classifier, norm, class_weight=class_weight).refit(C)
    acc, bal, _ = classification_scores(codes.y[test], model.predict(codes.X[test]))
    return {"C": C, "cv_accuracy": None, "test_accuracy": acc, "balanced_accuracy": bal,
            "train_rows": int(len(picked))}

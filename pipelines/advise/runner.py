"""``cnncodes advise``: measure where a data set sits on the rule's two axes, then recommend.

One pass of the pretrained network over a stratified sample of the training images (every
stage and ImageNet's own head at once; the codes of a matching complete cache are read instead
when there is one), then seconds of arithmetic on the codes: the head's entropy and LEEP, a
cross-validated softmax probe, a k-NN probe and LogME per stage (:mod:`.signals`), and the
rule (:mod:`.rule`).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnncodes.extractor.backbones.backbone import DEFAULT_MODEL
from cnncodes.extractor.errors import SettingsError
from cnncodes.extractor.files import dataset_name, slug
from cnncodes.extractor.images import ImageTable

from cnncodes.pipelines.advise.rule import Recommendation, recommend
from cnncodes.pipelines.advise.signals import leep, leep_gain, normalised_entropy

log = logging.getLogger(__name__)
DEFAULT_SAMPLE = 800


@dataclass
class Advice:
    """What ``advise`` measured and recommends; :meth:`as_dict` is its JSON."""

    data: str
    model: str
    size: dict                       # train images, classes, per class (median, smallest)
    sample: dict                     # images measured, per class, seed, where the codes came from
    imagenet_head: dict | None       # normalised entropy, LEEP, LEEP gain (None: no pretrained head)
    layers: list[dict]               # per stage: depth, dim, probe and k-NN CV accuracy, LogME
    recommendation: Recommendation
    seconds: float = 0.0
    report: str | None = None
    files: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"data": self.data, "model": self.model, "size": self.size, "sample": self.sample,
                "imagenet_head": self.imagenet_head, "layers": self.layers,
                "recommendation": self.recommendation.as_dict(), "seconds": round(self.seconds, 2),
                "report": self.report, "files": self.files}


def training_rows(table: ImageTable) -> np.ndarray:
    """Labelled rows that are for training: the ``train`` split, or every row without splits."""
    splits = np.asarray(table.splits)
    labelled = table.labels >= 0
    has_splits = bool((splits != "").any())
    return np.flatnonzero(labelled & ((splits == "train") if has_splits else True))


def stratified_sample(y: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Positions of at most ``size`` rows, an equal share of each class (all of a class smaller
    than its share; at least 2 of each class where it has them, so folds can be drawn)."""
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    share = max(2, size // max(1, len(classes)))
    picked = [rng.permutation(np.flatnonzero(y == c))[:share] for c in classes]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def advise(data, model: str = DEFAULT_MODEL, *, weights: str = "DEFAULT", sample: int = DEFAULT_SAMPLE,
           seed: int = 0, device: str = "auto", runtime: str | None = None, decode: str = "reduced",
           batch_size: int = 32) -> Advice:
    """Measure ``data`` (a stratified sample of its training images) and recommend a strategy.

    Examples
    --------
    >>> a = advise("data/digits")                       # doctest: +SKIP
    >>> a.recommendation.strategy, a.recommendation.layer  # doctest: +SKIP
    ('linear probe', 'stage4')
    """
    from cnncodes.extractor.backbones.loading import load_backbone
    from cnncodes.extractor.layers import Probe
    from cnncodes.extractor.sources import find_images

    from cnncodes.pipelines.sweep.runner import sweep_layers
    t0 = time.perf_counter()
    if sample < 20:
        raise SettingsError(f"--sample must be at least 20 images, got {sample}.")
    table = find_images(data)
    train = training_rows(table)
    y_all = table.labels[train]
    counts = np.bincount(y_all, minlength=len(table.classes))
    present = counts[counts > 0]
    if len(present) < 2:
        raise SettingsError(f"{data} has training images of {len(present)} class(es); advice needs at "
                            f"least 2.")
    size = {"train_images": int(len(train)), "classes": int(len(present)),
            "per_class_median": float(np.median(present)), "per_class_min": int(present.min()),
            "per_class_max": int(present.max())}
    rows = train[stratified_sample(y_all, sample, seed)]
    bb = load_backbone(model, weights)
    probe = Probe(bb.model, bb.input_size, model)
    stages = sweep_layers(model)
    head = _imagenet_head(bb, probe)
    codes, source = _codes(data, model, bb, table, rows, stages + ([head] if head else []),
                           device=device, runtime=runtime, decode=decode, batch_size=batch_size)
    ok = codes.pop("__ok__")
    rows, y = rows[ok], table.labels[rows[ok]]
    sample_info = {"images": int(len(rows)), "per_class": int(np.bincount(y).max()) if len(y) else 0,
                   "seed": seed, "codes_from": source, "failed": int((~ok).sum())}
    head_figures = None
    if head:
        logits = codes.pop(head)
        head_figures = {"layer": head, "normalised_entropy": round(normalised_entropy(logits), 4),
                        "leep": round(leep(logits, y), 4), "leep_gain": round(leep_gain(logits, y), 4)}
    aliases = probe.aliases()
    layers = [_measure_layer(name, codes[name], y, rows, table, aliases.get(name), seed) for name in stages]
    cache = str(_default_cache(data, model))
    rec = recommend(data=str(data), model=model, cache=cache, per_class_median=size["per_class_median"],
                    n_train=size["train_images"], n_classes=size["classes"],
                    entropy=head_figures and head_figures["normalised_entropy"],
                    leep_gain=head_figures and head_figures["leep_gain"], layers=layers, top=stages[-1])
    return Advice(str(data), model, size, sample_info, head_figures, layers, rec, time.perf_counter() - t0)


def _default_cache(data, model: str) -> Path:
    return Path("cache") / f"{dataset_name(data)}-{slug(model)}.h5"


def _imagenet_head(bb, probe) -> str | None:
    """The pretrained classifier's layer name when the weights have one (not random ones)."""
    if (bb.weights or {}).get("name") in (None, "none") or probe.classifier is None:
        return None
    return probe.classifier[0]


def _codes(data, model, bb, table, rows, layers, **kw) -> tuple[dict, str]:
    """``{layer: codes of rows}`` plus ``__ok__`` (decoded rows), from the complete default
    cache when it holds every layer with this backbone's recipe, else one pass in memory."""
    cached = _from_cache(_default_cache(data, model), bb, table, rows, layers)
    if cached is not None:
        return cached, str(_default_cache(data, model))
    from cnncodes.extractor.encoding import encode_rows
    codes, errors = encode_rows(bb, table, rows, layers, **kw)
    codes["__ok__"] = np.array([not e for e in errors], dtype=bool)
    return codes, "one pass over the sample"


def _from_cache(path: Path, bb, table, rows, layers) -> dict | None:
    from cnncodes.extractor.cache import DONE, open_cache, read_attrs
    from cnncodes.extractor.encoding import backbone_recipe
    from cnncodes.extractor.pooling import parse_pooling
    from cnncodes.extractor.recipe import Recipe
    if not path.is_file():
        return None
    try:
        made = Recipe.from_attrs(read_attrs(path))
        if made.differences(backbone_recipe(bb, parse_pooling("avg"), made.dtype, made.precision),
                            Recipe.FEATURE_KEYS):
            return None
        with open_cache(path) as c:
            if not set(layers) <= set(c.layers):
                return None
            where = {p: i for i, p in enumerate(c.paths)}
            at = [where.get(table.paths[r]) for r in rows]
            if any(i is None for i in at):
                return None
            at = np.asarray(at)
            order = np.argsort(at)  # HDF5 reads rows in increasing order
            back = np.argsort(order)
            out = {name: c.codes(name, at[order])[back] for name in layers}
            out["__ok__"] = c.status[at] == DONE
            return out
    except Exception as e:  # noqa: BLE001 - an unreadable cache is only a missed shortcut
        log.info("not reading %s: %s", path, e)
        return None


def _measure_layer(name: str, X: np.ndarray, y: np.ndarray, rows, table, alias, seed: int) -> dict:
    from cnncodes.pipelines.probes.classifiers import fit_linear_probe
    from cnncodes.pipelines.probes.codes import Codes
    from cnncodes.pipelines.probes.logme import logme
    folds = int(min(5, np.bincount(y)[np.bincount(y) > 0].min()))
    codes = Codes(Path(""), name, X.astype(np.float32, copy=False), y, np.full(len(y), "train", dtype=object),
                  np.asarray(rows), [table.paths[r] for r in rows], list(table.classes), {}, {})
    t0 = time.perf_counter()
    soft = fit_linear_probe(codes, name, "softmax", folds=folds, seed=seed, solver="batched")
    knn = fit_linear_probe(codes, name, "knn", folds=folds, seed=seed)
    return {"layer": name, "module": getattr(alias, "name", None),
            "relative_depth": round(float(getattr(alias, "relative_depth", 0.0)), 3), "dim": int(X.shape[1]),
            "probe_accuracy": round(float(soft.cv_accuracy), 4), "probe_std": round(float(soft.cv_std), 4),
            "probe_C": soft.C, "knn_accuracy": round(float(knn.cv_accuracy), 4), "knn_k": int(knn.C),
            "logme": round(float(logme(X.astype(np.float64), y)), 4), "folds": folds,
            "seconds": round(time.perf_counter() - t0, 2)}

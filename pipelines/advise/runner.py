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
from cnncodes.extractor.engine import default_cache_path
from cnncodes.extractor.errors import SettingsError
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

    from cnncodes.pipelines.probes.metrics import stratified_sample
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
    wanted = list(dict.fromkeys(stages + ["penultimate"]))
    codes, source = _codes(data, model, bb, table, rows, wanted, stages, device=device, runtime=runtime,
                           decode=decode, batch_size=batch_size)
    ok = codes.pop("__ok__")
    rows, y = rows[ok], table.labels[rows[ok]]
    codes = {k: v[ok] for k, v in codes.items()}
    # a class needs 2 decoded images for the probes' folds; the rest is left out, and said so
    per_class = np.bincount(y, minlength=len(table.classes))
    keep = per_class[y] >= 2
    left_out = sorted({table.classes[c] for c in y[~keep]})
    rows, y, codes = rows[keep], y[keep], {k: v[keep] for k, v in codes.items()}
    if len(np.unique(y)) < 2:
        raise SettingsError(f"fewer than 2 classes of {data} have 2 images that decode; advice needs at "
                            f"least 2.")
    sample_info = {"images": int(len(rows)), "per_class": int(np.bincount(y).max()), "seed": seed,
                   "codes_from": source, "failed": int((~ok).sum()), "classes_left_out": left_out}
    head_figures = None
    if head is not None:
        name, weight, bias = head
        logits = codes["penultimate"].astype(np.float64) @ weight.T + bias
        # as many folds as the largest class allows (2 to 5): a sample of many classes holds few
        # images of each (800 of 242 Omniglot characters: 3 or 4)
        value = leep(logits, y, folds=int(min(5, np.bincount(y).max())), seed=seed)
        head_figures = {"layer": name, "normalised_entropy": round(normalised_entropy(logits), 4),
                        "leep": round(value, 4), "leep_gain": round(leep_gain(value, y), 4)}
    aliases = probe.aliases()
    layers = [_measure_layer(name, codes[name], y, rows, table, aliases.get(name), seed) for name in stages]
    rec = recommend(data=str(data), model=model, cache=str(default_cache_path(data, model)),
                    per_class_median=size["per_class_median"], n_train=size["train_images"],
                    n_classes=size["classes"], entropy=head_figures and head_figures["normalised_entropy"],
                    leep_gain=head_figures and head_figures["leep_gain"], layers=layers, top=stages[-1],
                    weights=weights, decode=decode)
    return Advice(str(data), model, size, sample_info, head_figures, layers, rec, time.perf_counter() - t0)


def _imagenet_head(bb, probe) -> tuple[str, np.ndarray, np.ndarray] | None:
    """The pretrained ImageNet-1k classifier as ``(name, weight, bias)``, for the logits of the
    penultimate codes; None for random weights or a head of another label set (a fine-tuning
    checkpoint's, ImageNet-21k's), whose figures would not be comparable."""
    import torch
    if (bb.weights or {}).get("name") in (None, "none") or probe.classifier is None:
        return None
    name = probe.classifier[0]
    module = bb.model.get_submodule(name)
    if not isinstance(module, torch.nn.Linear) or module.out_features != 1000:
        return None
    bias = module.bias.detach().double().numpy() if module.bias is not None else np.zeros(1000)
    return name, module.weight.detach().double().numpy(), bias


def _codes(data, model, bb, table, rows, layers, stages, **kw) -> tuple[dict, str]:
    """``{layer: codes of rows}`` plus ``__ok__`` (decoded rows), from the complete default
    cache when it holds them with this backbone's recipe and these images, else one pass in
    memory."""
    path = default_cache_path(data, model)
    cached = _from_cache(path, bb, table, rows, layers, stages, kw.get("decode"))
    if cached is not None:
        return cached, str(path)
    from cnncodes.extractor.encoding import encode_rows
    codes, errors = encode_rows(bb, table, rows, layers, **kw)
    codes["__ok__"] = np.array([not e for e in errors], dtype=bool)
    return codes, "one pass over the sample"


def _from_cache(path: Path, bb, table, rows, layers, stages, decode) -> dict | None:
    """The codes of a complete cache of the same images, backbone, pooling and decode path
    (a sweep's or the demo's), or None. ``penultimate`` may be missing when it is the pooled
    last stage (sweep leaves it out then: the same codes)."""
    from cnncodes.extractor.cache import DONE, FAILED, open_cache, read_attrs
    from cnncodes.extractor.encoding import backbone_recipe
    from cnncodes.extractor.pooling import parse_pooling
    from cnncodes.extractor.recipe import Recipe
    if not path.is_file():
        return None
    try:
        made = Recipe.from_attrs(read_attrs(path))
        if made.differences(backbone_recipe(bb, parse_pooling("avg"), made.dtype, made.precision),
                            Recipe.FEATURE_KEYS) or made.decode != decode \
                or made.image_fingerprint != table.list_fingerprint():
            return None
        with open_cache(path) as c:
            status = c.status
            if not np.isin(status, (DONE, FAILED)).all():
                return None  # an unfinished cache: its pending rows are no failures
            names = {n: n for n in layers}
            if "penultimate" not in c.layers and "penultimate" not in stages:
                names["penultimate"] = stages[-1]
            if not set(names.values()) <= set(c.layers):
                return None
            at = np.asarray(rows)  # the same image list: the same rows
            return {**{n: c.codes(src, at) for n, src in names.items()}, "__ok__": status[at] == DONE}
    except Exception as e:  # noqa: BLE001 - an unreadable cache is only a missed shortcut
        log.info("not reading %s: %s", path, e)
        return None


def _measure_layer(name: str, X: np.ndarray, y: np.ndarray, rows, table, alias, seed: int) -> dict:
    from cnncodes.pipelines.probes.classifiers import fit_linear_probe
    from cnncodes.pipelines.probes.codes import Codes
    from cnncodes.pipelines.probes.logme import logme
    counts = np.bincount(y)
    folds = int(min(5, counts[counts > 0].min()))
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

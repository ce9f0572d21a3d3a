"""Using a saved classifier: on another cache (``evaluate``) or on new images (``predict``)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

from cnncodes.extractor.errors import ImageSourceError, IncompatibleCacheError
from cnncodes.extractor.images import gather_images
from cnncodes.extractor.recipe import Recipe, describe_differences

from cnncodes.pipelines.probes.artifacts import SavedModel, load_model
from cnncodes.pipelines.probes.codes import load_codes


def recipe_mismatches(saved: dict, attrs: dict, layer_attrs: dict | None = None) -> list[str]:
    """Why codes of a cache (``attrs``, ``layer_attrs``) cannot feed a model trained on the cache
    whose summary is ``saved``: the feature recipe and the layer's module must agree."""
    where = ("(model)", "(cache)")
    diffs = Recipe.from_attrs(saved).differences(Recipe.from_attrs(attrs), Recipe.FEATURE_KEYS, where)
    if layer_attrs is not None:
        diffs += describe_differences({"layer module": (saved.get("layer_attrs") or {}).get("module")},
                                      {"layer module": layer_attrs.get("module")}, where=where)
    return diffs


def evaluate_model(model: SavedModel | str | os.PathLike, cache, allow_incomplete: bool = False) -> dict:
    """Score a saved model on every usable row of another cache made by the same recipe."""
    m = model if isinstance(model, SavedModel) else load_model(model)
    codes = load_codes(cache, m.layer, allow_incomplete)
    diffs = recipe_mismatches(m.recipe, codes.attrs, codes.layer_attrs)
    if diffs:
        raise IncompatibleCacheError(f"{codes.path} was not made by the model's recipe: " +
                                     "; ".join(diffs) + ".")
    missing = sorted(set(codes.classes) - set(m.classes))
    if missing:
        raise IncompatibleCacheError(f"{codes.path} has classes the model never saw: "
                                     f"{', '.join(missing[:5])}.")
    index = {c: i for i, c in enumerate(m.classes)}
    y = np.array([index[codes.classes[v]] for v in codes.y])
    pred = m.pipeline.predict(codes.X)
    return {"model": str(m.path), "cache": str(codes.path), "layer": m.layer, "n": int(len(y)),
            "accuracy": float(accuracy_score(y, pred)),
            "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
            "macro_f1": float(f1_score(y, pred, average="macro")), "excluded": codes.excluded}


@dataclass
class Prediction:
    path: str
    label: str | None
    score: float | None   # probability (softmax) or decision score (svm)
    error: str = ""
    probability: float | None = None  # of the label, calibrated where the model was


def trained_backbone(m: SavedModel):
    """``(backbone, recipe)``: the backbone that made ``m``'s training codes, built again; an
    :class:`IncompatibleCacheError` where what cnncodes builds now differs from it."""
    from cnncodes.extractor.backbones.loading import load_backbone
    from cnncodes.extractor.encoding import backbone_recipe
    from cnncodes.extractor.pooling import parse_pooling
    trained = Recipe.from_attrs(m.recipe)
    bb = load_backbone(trained.model, trained.weights_argument)
    now = backbone_recipe(bb, parse_pooling(trained.pooling), trained.dtype, trained.precision)
    diffs = trained.differences(now, Recipe.FEATURE_KEYS, where=("(trained on)", "(found now)"))
    if diffs:
        raise IncompatibleCacheError(f"the backbone cnncodes builds for {m.path} "
                                     f"is not the one it was trained "
                                     f"on: " + "; ".join(diffs) + ".")
    return bb, trained


def predict_images(model: SavedModel | str | os.PathLike, inputs, *, batch_size: int = 32,
                   device: str = "auto", runtime: str | None = None) -> list[Prediction]:
    """Extract codes of new images with the model's own recipe and classify them.

    An image that cannot be decoded is a row with its error, not an exception.
    """
    from cnncodes.extractor.encoding import encode_images
    m = model if isinstance(model, SavedModel) else load_model(model)
    files = gather_images(inputs)
    if not files:
        raise ImageSourceError(f"no image files in {', '.join(map(str, inputs))}: nothing to predict.")
    bb, trained = trained_backbone(m)
    # new images are decoded as the training images were (nvJPEG's path aside, which needs CUDA)
    decode = "exact" if trained.decode == "gpu" else trained.decode
    codes, errors = encode_images(bb, files, [m.layer], trained.pooling, device=device, batch_size=batch_size,
                                  runtime=runtime, decode=decode)
    X = codes[m.layer]
    ok = np.array([not e for e in errors])
    out = [Prediction(str(f), None, None, e) for f, e in zip(files, errors)]
    if ok.any():
        if m.has_proba:
            proba = m.pipeline.predict_proba(X[ok])
            best, score = proba.argmax(1), proba.max(1)
        else:
            dec = m.pipeline.decision_function(X[ok])
            dec = dec[:, None] if dec.ndim == 1 else dec
            best = dec.argmax(1) if dec.shape[1] > 1 else (dec[:, 0] > 0).astype(int)
            score = dec.max(1) if dec.shape[1] > 1 else dec[:, 0]
        proba = m.proba(X[ok])
        classes_ = m.pipeline.classes_
        for j, (i, b, s) in enumerate(zip(np.flatnonzero(ok), best, score)):
            out[i].label = m.classes[int(classes_[b])]
            out[i].score = float(s)
            out[i].probability = None if proba is None else float(proba[j, b])
    return out

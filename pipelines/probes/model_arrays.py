"""Linear probes as plain arrays and JSON: a model file that runs no code when it is read.

A pickle (joblib) executes whatever its author put in it, and a checksum beside it only shows
the file is the one that was written, not who wrote it. The pipelines cnncodes fits itself are
a few arrays each (a scaler's mean and scale, PCA's components, a linear layer's weights), so
they are stored as an ``.npz`` archive of arrays plus one JSON description, read back with
``allow_pickle=False`` into the same scikit-learn estimators. Only a pipeline of other steps
falls back to joblib. The k-NN probe is stored the same way, as its training codes, labels, k
and T. The torch solver's fitted model is read back as the scikit-learn
estimator of the same loss (LinearSVC or multinomial LogisticRegression), whose decision
function and probabilities are the same formulas; reading a model never imports torch.
The batched solver's :class:`~.linear_model.LinearProbe` is written in the format of its
Pipeline without importing scikit-learn (the fit commands never import it).
"""
from __future__ import annotations

import json

import numpy as np

from cnncodes.pipelines.probes.linear_model import LinearProbe
from cnncodes.pipelines.probes.normalise import signed_sqrt
from cnncodes.pipelines.probes.pipeline_steps import pipeline_from_arrays, probe_arrays

MAGIC = b"PK\x03\x04"  # an .npz is a zip archive; a joblib pickle never starts so
_JSON = "__cnncodes_model__"


class NotArrays(Exception):
    """A pipeline step that cannot be written as arrays (the caller falls back to joblib)."""


def _step_arrays(name: str, step) -> tuple[dict, dict[str, np.ndarray]]:
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import FunctionTransformer, Normalizer, StandardScaler
    from sklearn.svm import LinearSVC
    if isinstance(step, StandardScaler):
        return ({"kind": "standard", "with_mean": step.with_mean, "with_std": step.with_std},
                {"mean": step.mean_, "scale": step.scale_, "var": step.var_,
                 "n_samples_seen": np.asarray(step.n_samples_seen_)})
    if isinstance(step, Normalizer):
        return {"kind": "normalizer", "norm": step.norm}, {}
    if isinstance(step, FunctionTransformer) and step.func is signed_sqrt:
        return {"kind": "signed_sqrt"}, {}
    if isinstance(step, PCA):
        return ({"kind": "pca", "whiten": bool(step.whiten), "n_components": int(step.n_components_)},
                {"components": step.components_, "mean": step.mean_,
                 "explained_variance": step.explained_variance_})
    # matched by name: importing the class would import scikit-learn's estimator machinery
    batched = type(step).__name__ == "BatchedLinearClassifier" and \
        type(step).__module__.endswith("probes.estimator")
    if isinstance(step, (LogisticRegression, LinearSVC)) or batched:
        loss = getattr(step, "loss", None)
        kind = "logistic" if isinstance(step, LogisticRegression) or loss == "log_loss" else "linear_svc"
        if isinstance(step, LogisticRegression) and getattr(step, "multi_class", "auto") == "ovr":
            raise NotArrays(f"step {name!r}: one-vs-rest LogisticRegression")
        return {"kind": kind, "C": float(step.C)}, {"coef": step.coef_, "intercept": step.intercept_,
                                                    "classes": step.classes_}
    if type(step).__name__ == "CosineKNNClassifier" and type(step).__module__.endswith("probes.knn"):
        return ({"kind": "cosine_knn", "k": int(step.k), "temperature": float(step.temperature)},
                {"train_codes": step.train_codes_, "train_labels": step.train_labels_,
                 "classes": step.classes_})
    raise NotArrays(f"step {name!r}: {type(step).__name__}")


def pipeline_to_arrays(pipeline) -> tuple[list[dict], dict[str, np.ndarray]]:
    """``(steps, arrays)``: the description of each step and its arrays (keys ``<i>/<name>``).
    Raises :class:`NotArrays` for a step cnncodes does not fit itself."""
    if isinstance(pipeline, LinearProbe):
        return probe_arrays(pipeline)
    steps, arrays = [], {}
    for i, (name, step) in enumerate(pipeline.steps):
        spec, data = _step_arrays(name, step)
        steps.append({"name": name, "n_features_in": int(getattr(step, "n_features_in_", 0)) or None, **spec})
        arrays.update({f"{i}/{k}": np.asarray(v) for k, v in data.items()})
    return steps, arrays


def write(path, payload: dict) -> None:
    """``payload`` (a model's metadata with ``pipeline``) as an ``.npz`` of arrays + JSON."""
    steps, arrays = pipeline_to_arrays(payload["pipeline"])
    meta = {k: v for k, v in payload.items() if k != "pipeline"}
    meta["pipeline_steps"] = steps
    with open(path, "wb") as f:
        np.savez_compressed(f, **{_JSON: np.array(json.dumps(meta, default=_plain))}, **arrays)


def read(path) -> dict:
    """The payload written by :func:`write`; nothing in the file is executed."""
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z[_JSON]))
        arrays = {k: z[k] for k in z.files if k != _JSON}
    meta["pipeline"] = pipeline_from_arrays(meta.pop("pipeline_steps"), arrays)
    return meta


def _plain(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)

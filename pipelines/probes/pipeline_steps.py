"""A saved Pipeline's steps, from their descriptions and arrays back to scikit-learn estimators
(see :mod:`.model_arrays`), and the steps of the Pipeline a
:class:`~.linear_model.LinearProbe` stands for. scikit-learn is imported only to build them.
"""
from __future__ import annotations

import numpy as np

from cnncodes.pipelines.probes.normalise import signed_sqrt


def probe_arrays(p) -> tuple[list[dict], dict[str, np.ndarray]]:
    """The steps and arrays of the Pipeline a :class:`~.linear_model.LinearProbe` ``p`` stands for."""
    D = p.n_features_in_
    steps, arrays = [], {}
    if p.norm == "standard":
        steps.append({"name": "scale", "n_features_in": D, "kind": "standard", "with_mean": True,
                      "with_std": True})
        arrays.update({"0/mean": p.mean, "0/scale": p.scale, "0/var": p.scale ** 2,
                       "0/n_samples_seen": np.asarray(p.n_samples)})
    if p.norm == "power":
        steps.append({"name": "sqrt", "n_features_in": D, "kind": "signed_sqrt"})
    if p.norm in ("l2", "power"):
        steps.append({"name": "l2", "n_features_in": D, "kind": "normalizer", "norm": "l2"})
    i = len(steps)
    steps.append({"name": "clf", "n_features_in": D, "kind": p.kind, "C": p.C})
    arrays.update({f"{i}/coef": p.coef, f"{i}/intercept": p.intercept, f"{i}/classes": p.classes_})
    return steps, arrays


def _step_from(spec: dict, a: dict[str, np.ndarray]):
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import FunctionTransformer, Normalizer, StandardScaler
    from sklearn.svm import LinearSVC
    kind = spec["kind"]
    if kind == "standard":
        step = StandardScaler(with_mean=spec["with_mean"], with_std=spec["with_std"])
        step.mean_, step.scale_, step.var_ = a["mean"], a["scale"], a["var"]
        step.n_samples_seen_ = a["n_samples_seen"] if a["n_samples_seen"].ndim else int(a["n_samples_seen"])
    elif kind == "normalizer":
        step = Normalizer(norm=spec["norm"])
    elif kind == "signed_sqrt":
        step = FunctionTransformer(signed_sqrt)
        step.fit(np.zeros((1, spec["n_features_in"] or 1)))
    elif kind == "pca":
        step = PCA(n_components=spec["n_components"], whiten=spec["whiten"])
        step.components_, step.mean_, step.explained_variance_ = a["components"], a["mean"], \
            a["explained_variance"]
        step.n_components_ = spec["n_components"]
    elif kind in ("logistic", "linear_svc"):
        step = LogisticRegression(C=spec["C"]) if kind == "logistic" else LinearSVC(C=spec["C"])
        step.coef_, step.intercept_, step.classes_ = a["coef"], a["intercept"], a["classes"]
    elif kind == "cosine_knn":
        from cnncodes.pipelines.probes.knn import CosineKNNClassifier
        step = CosineKNNClassifier(k=spec["k"], temperature=spec["temperature"])
        step.train_codes_, step.train_labels_, step.classes_ = (a["train_codes"], a["train_labels"],
                                                                a["classes"])
    else:
        raise ValueError(f"unknown pipeline step kind {kind!r}")
    if spec.get("n_features_in"):
        step.n_features_in_ = spec["n_features_in"]
    return step


def pipeline_from_arrays(steps: list[dict], arrays: dict[str, np.ndarray]):
    from sklearn.pipeline import Pipeline
    out = []
    for i, spec in enumerate(steps):
        mine = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.split("/", 1)[0] == str(i)}
        out.append((spec["name"], _step_from(spec, mine)))
    return Pipeline(out)

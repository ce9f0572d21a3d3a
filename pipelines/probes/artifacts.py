"""Saved classifiers: the fitted Pipeline with the extraction recipe that produced its inputs.

Trust model. The linear probes cnncodes fits are written as plain arrays and JSON (an ``.npz``,
see :mod:`.model_arrays`): reading one runs no code, whoever made it. Only a pipeline with
steps of other kinds is written as a joblib pickle, and reading a pickle runs whatever code
its author put in it. Every model file gets a ``.sha256`` sidecar; ``load_model`` checks it
before reading, and refuses a pickle without one. The sidecar is a checksum, not a signature:
it catches damage and mix-ups, not a deliberate forgery (anyone who can write the model can
write its sidecar), so load pickles only from people you trust.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from cnncodes.extractor.errors import CnnCodesError
from cnncodes.extractor.files import atomic_write, write_text_atomic
from cnncodes.extractor.provenance import library_versions, sha256_of

from cnncodes.pipelines.probes import model_arrays

MODEL_FORMAT = "cnncodes-model"
MODEL_VERSION = 2  # 2: arrays + JSON (.npz); 1: joblib pickle
_PAYLOAD_KEYS = ("version", "pipeline", "classes", "layer", "classifier", "C", "recipe", "metrics",
                 "versions")


class ModelFileError(CnnCodesError, ValueError):
    """A model file is missing, altered, not a cnncodes model, or of a newer format."""


@dataclass
class SavedModel:
    """A loaded classifier and everything needed to feed it."""

    pipeline: object
    classes: list[str]
    layer: str
    classifier: str
    C: float
    recipe: dict      # model, weights, weights_sha256, preprocessing, pooling, layer_attrs, ...
    metrics: dict
    versions: dict
    path: Path

    @property
    def has_proba(self) -> bool:
        return hasattr(self.pipeline, "predict_proba") and self.classifier in ("softmax", "knn")

    @property
    def temperature(self) -> float | None:
        """The temperature that calibrates the decision scores (models saved since it was
        fitted; None before, and for k-NN)."""
        t = (self.metrics.get("calibration") or {}).get("temperature")
        return None if t is None else float(t)

    def proba(self, X):
        """Class probabilities of codes ``X`` (columns: the pipeline's ``classes_``): calibrated
        by the model's temperature where it has one, the softmax's or k-NN's own otherwise, None
        for an SVM saved without one."""
        if self.temperature is not None and hasattr(self.pipeline, "decision_function"):
            from cnncodes.pipelines.probes.linear_model import probabilities
            return probabilities(self.pipeline.decision_function(X) / self.temperature)
        return self.pipeline.predict_proba(X) if self.has_proba else None


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def save_model(result, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``result`` (a FitResult) to ``path`` and its sha256 sidecar, atomically."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise ModelFileError(f"{path} exists: pass --overwrite to replace it, or choose another --out.")
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": MODEL_FORMAT, "version": MODEL_VERSION, "pipeline": result.pipeline,
               "classes": list(result.classes), "layer": result.layer, "classifier": result.classifier,
               "C": result.C, "recipe": dict(result.cache), "metrics": result.as_dict(),
               "versions": library_versions()}
    try:
        model_arrays.pipeline_to_arrays(result.pipeline)
    except model_arrays.NotArrays:  # a pipeline cnncodes did not fit: only a pickle holds it
        import joblib
        return _publish(path, lambda tmp: joblib.dump({**payload, "version": 1}, tmp, compress=3))
    return _publish(path, lambda tmp: model_arrays.write(tmp, payload))


def _publish(path: Path, write) -> Path:
    """``write(tmp)`` the model file, then publish it at ``path`` with its sha256 sidecar, each
    atomically (a kill between the two leaves a model that its old sidecar refuses, never one
    taken for another)."""
    with atomic_write(path) as tmp:
        write(tmp)
        digest = sha256_of(tmp)
    write_text_atomic(sidecar(path), f"{digest}  {path.name}\n")
    return path


def copy_model(source: str | os.PathLike, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Copy a saved model (checked first) to ``path`` with a sidecar of its own, atomically."""
    load_model(source)
    path = Path(path)
    if path.exists() and not overwrite:
        raise ModelFileError(f"{path} exists: pass --overwrite to replace it, or choose another --out.")
    path.parent.mkdir(parents=True, exist_ok=True)
    return _publish(path, lambda tmp: shutil.copyfile(source, tmp))


def load_model(path: str | os.PathLike) -> SavedModel:
    """Load a model saved by :func:`save_model`, after checking its sha256 sidecar."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file {path} does not exist.")
    side = sidecar(path)
    with open(path, "rb") as f:
        arrays = f.read(4) == model_arrays.MAGIC
    if not side.is_file() and arrays:
        return _saved(_read_arrays(path), path)  # nothing executes: the checksum is optional
    if not side.is_file():
        raise ModelFileError(f"{path} has no {side.name} beside it (cnncodes writes one with every model; "
                             f"was it moved without it?): refusing to unpickle it.")
    recorded = side.read_text().split()
    expected = recorded[0].lower() if recorded else ""
    if sha256_of(path) != expected:
        raise ModelFileError(f"{path} does not match its {side.name}: it was changed or damaged after "
                             f"saving; refusing to unpickle it.")
    if arrays:
        return _saved(_read_arrays(path), path)
    import joblib  # imported here: only pickles need it (50 ms of every fit command otherwise)
    try:
        payload = joblib.load(path)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        raise ModelFileError(f"{path} cannot be read as a cnncodes model: {e}") from e
    return _saved(payload, path)


def _read_arrays(path: Path) -> dict:
    try:
        return model_arrays.read(path)
    except Exception as e:  # noqa: BLE001 - a damaged or foreign archive is a bad file
        raise ModelFileError(f"{path} cannot be read as a cnncodes model: {e}") from None


def _saved(payload, path: Path) -> SavedModel:
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise ModelFileError(f"{path} is not a cnncodes model file.")
    missing = [k for k in _PAYLOAD_KEYS if k not in payload]
    if missing:
        raise ModelFileError(f"{path} is not a whole cnncodes model file (it lacks {', '.join(missing)}).")
    if int(payload.get("version", 0)) > MODEL_VERSION:
        raise ModelFileError(f"{path} has model format version {payload['version']}, newer than this "
                             f"cnncodes reads ({MODEL_VERSION}): upgrade cnncodes.")
    return SavedModel(payload["pipeline"], payload["classes"], payload["layer"], payload["classifier"],
                      payload["C"], payload["recipe"], payload["metrics"], payload["versions"], path)

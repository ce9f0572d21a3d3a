"""``cnncodes export``: a saved linear probe and the network under it, or a fine-tuned run's
network, as one ONNX file.

The graph is the extraction's own tapped network (:class:`cnncodes.extractor.runtimes._Tapped`:
the weights' normalisation of a uint8 N x H x W x 3 batch, the batch-norm-folded network up to
the probe's layer, the pooling) followed by the probe as torch operations, built from the
saved model's arrays (:func:`.model_arrays.pipeline_to_arrays`: the same description a model
file holds): normalisation (standard, l2, signed square root), PCA, the linear head, then the
calibrated probabilities ``softmax(scores / T)``. A fine-tuned run (``--run``) is its
``best.pt`` network whole, after the same normalisation: its logits are the scores, their
softmax the probabilities. It is exported with the TorchScript tracer, as the inference
runtimes' graphs are, and read back by :mod:`.onnx_model` without torch.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cnncodes.extractor.errors import CnnCodesError, SettingsError
from cnncodes.extractor.files import atomic_write
from cnncodes.extractor.provenance import library_versions

from cnncodes.pipelines.probes.artifacts import SavedModel, load_model
from cnncodes.pipelines.probes.model_arrays import pipeline_to_arrays
from cnncodes.pipelines.probes.onnx_model import ONNX_FORMAT, ONNX_FORMAT_VERSION
from cnncodes.pipelines.probes.predict import trained_backbone

OPSET = 17


class ExportError(CnnCodesError, ValueError):
    """A model that cannot be exported as asked."""


class ProbeHead(nn.Module):
    """A saved linear probe's steps as torch operations: codes in, ``(probabilities, scores)``
    out (scores as ``predict`` shows them: the SVM's decision function, the softmax's own
    probabilities)."""

    def __init__(self, m: SavedModel):
        super().__init__()
        from cnncodes.pipelines.probes.model_arrays import NotArrays
        try:
            steps, arrays = pipeline_to_arrays(m.pipeline)
        except NotArrays as e:
            raise ExportError(f"{m.path}: export takes the linear probes cnncodes fits; {e} is not one of "
                              f"their steps.") from None
        self.ops = []
        for i, step in enumerate(steps):
            kind = step["kind"]
            a = {k.split("/", 1)[1]: torch.as_tensor(np.asarray(v, np.float32)) for k, v in arrays.items()
                 if k.startswith(f"{i}/") and np.asarray(v).dtype.kind == "f"}
            if kind == "standard":
                mean = a["mean"] if step.get("with_mean", True) else torch.zeros_like(a["scale"])
                scale = a["scale"] if step.get("with_std", True) else torch.ones_like(a["mean"])
                self._buffers_of(i, mean=mean, scale=scale)
            elif kind == "pca":
                comp, mean = a["components"], a["mean"]
                scale = torch.sqrt(a["explained_variance"]) if step["whiten"] else torch.ones(comp.shape[0])
                self._buffers_of(i, components=comp, mean=mean, whiten=scale)
            elif kind in ("logistic", "linear_svc"):
                self._buffers_of(i, coef=a["coef"], intercept=a["intercept"])
                self.kind = kind
            elif kind in ("normalizer", "signed_sqrt"):
                if kind == "normalizer" and step.get("norm", "l2") != "l2":
                    raise ExportError(f"{m.path}: a {step['norm']} normalisation step is not exported "
                                      f"(l2 is).")
            else:
                raise ExportError(f"{m.path}: export takes the linear probes (fit-svm, fit-softmax); "
                                  f"its step {kind!r} is not one of theirs.")
            self.ops.append((i, kind))
        if not hasattr(self, "kind"):
            raise ExportError(f"{m.path} has no linear classifier step to export.")
        # an SVM saved before calibration existed has none: its graph's "probabilities" are then
        # softmax(margins), and the metadata says so (predict leaves them out, as for the saved SVM)
        self.calibrated = m.temperature is not None
        self.temperature = float(m.temperature or 1.0)

    def _buffers_of(self, i: int, **tensors) -> None:
        for name, t in tensors.items():
            self.register_buffer(f"s{i}_{name}", t)

    def _b(self, i: int, name: str) -> torch.Tensor:
        return getattr(self, f"s{i}_{name}")

    def forward(self, x):
        x = x.float()
        for i, kind in self.ops:
            if kind == "standard":
                x = (x - self._b(i, "mean")) / self._b(i, "scale")
            elif kind == "signed_sqrt":
                x = torch.sign(x) * torch.sqrt(torch.abs(x))
            elif kind == "normalizer":   # scikit-learn's normalize: norms below 10 eps count as 1
                norm = torch.sqrt((x * x).sum(1, keepdim=True))
                x = x / torch.where(norm < 10 * np.finfo(np.float32).eps, torch.ones_like(norm), norm)
            elif kind == "pca":
                x = ((x - self._b(i, "mean")) @ self._b(i, "components").T) / self._b(i, "whiten")
            else:
                scores = x @ self._b(i, "coef").T + self._b(i, "intercept")
        if scores.shape[1] == 1:   # a binary probe's one logit (or margin) of the second class
            z = torch.cat([torch.zeros_like(scores), scores], 1)
        else:
            z = scores
        probabilities = torch.softmax(z / self.temperature, 1)
        shown = torch.softmax(z, 1) if self.kind == "logistic" else scores
        return probabilities, shown


class Classifier(nn.Module):
    """Pixels -> (probabilities, scores[, codes]): the tapped network and the probe's head."""

    def __init__(self, tapped: nn.Module, head: ProbeHead, with_codes: bool):
        super().__init__()
        self.tapped, self.head, self.with_codes = tapped, head, with_codes

    def forward(self, pixels):
        codes = self.tapped(pixels)[0].float()
        probabilities, scores = self.head(codes)
        return (probabilities, scores, codes) if self.with_codes else (probabilities, scores)


class RunNetwork(nn.Module):
    """A fine-tuned run's network after the weights' normalisation of a uint8 N x H x W x 3
    batch: ``(probabilities, logits)``."""

    def __init__(self, net: nn.Module, split):
        super().__init__()
        self.net, self.scale = net, split.pixel_scale
        self.register_buffer("mean", torch.tensor([float(v) for v in split.mean]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([float(v) for v in split.std]).view(1, 3, 1, 1))

    def forward(self, pixels):
        from cnncodes.extractor.runtimes import normalised_pixels
        logits = self.net(normalised_pixels(pixels, self.mean, self.std, self.scale)).float()
        return torch.softmax(logits, 1), logits


def _needs_onnx() -> None:
    try:
        import onnx  # noqa: F401 - what torch.onnx.export writes with, and the metadata's writer
    except ImportError:
        raise ExportError("export needs the onnx package: pip install 'cnncodes[onnxruntime]'.") from None


def _preprocessing(split, model: str, input_size: int, decode: str) -> dict:
    """The metadata entries that say how to make the graph's pixels from an image file."""
    from PIL import Image

    from cnncodes.pipelines.probes.onnx_model import PREPROCESS_RULES
    if split is None or not split.resize_crop:
        raise ExportError(f"the preprocessing of {model}'s weights is not Pillow's 'resize the short side, "
                          f"centre-crop' (hf: models use their image processor's own resize): export keeps "
                          f"those outside the graph and needs them to be.")
    size, crop, filt = split.resize_crop
    if tuple(int(c) for c in crop) != (input_size, input_size):
        raise ExportError(f"{model}'s crop {tuple(crop)} is not its square input ({input_size}): "
                          f"not exported.")
    resize = {"size": int(size), "crop": [int(c) for c in crop], "filter": int(filt),
              "filter_name": Image.Resampling(int(filt)).name}
    # nvJPEG's decode (a cache made with --decode gpu) has no CPU twin: Pillow's exact decode is
    # the nearest, as `predict` of the saved probe uses too
    decode = "exact" if decode == "gpu" else decode
    return {"cnncodes_resize": json.dumps(resize), "cnncodes_decode": decode,
            "cnncodes_preprocess": json.dumps({"decode": decode, **resize, "steps": PREPROCESS_RULES})}


def _portable(recipe: dict) -> dict:
    """A recipe without the paths of the machine it was made on (the cache, the data folder)."""
    return {k: v for k, v in recipe.items() if k not in ("path", "data_root", "data", "out")}


# Largest difference of the exported graph's outputs to PyTorch's on a check batch, relative to
# the output's largest value (the inference runtimes' tolerance, extractor.runtimes.TOLERANCE,
# is for codes; the head's products add a little).
EXPORT_TOLERANCE = 1e-4


def _write(module: nn.Module, out: Path, input_size: int, outputs: list[str], meta: dict) -> None:
    """Trace ``module`` on a uint8 batch into ``out`` (atomically) with ``meta`` as its metadata,
    after checking ONNX Runtime's outputs against PyTorch's on three random images (a graph the
    tracer got wrong is never published)."""
    from cnncodes.extractor.runtimes import _one_line, onnx_tracing
    x = torch.zeros(2, input_size, input_size, 3, dtype=torch.uint8)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"cnncodes_format": ONNX_FORMAT, "cnncodes_format_version": str(ONNX_FORMAT_VERSION),
            "cnncodes_input_size": str(input_size),
            "cnncodes_versions": json.dumps(library_versions(), default=str), **meta}
    module = module.eval()
    with atomic_write(out) as tmp:
        try:
            with onnx_tracing():
                torch.onnx.export(module, (x,), str(tmp), input_names=["pixels"], output_names=outputs,
                                  dynamic_axes={"pixels": {0: "n"}, **{o: {0: "n"} for o in outputs}},
                                  opset_version=OPSET, dynamo=False)
            _add_metadata(tmp, meta)
            worst = _check(module, tmp, input_size, outputs)
        except Exception as e:  # noqa: BLE001 - the tracer and ONNX fail in many ways; each is one line
            raise ExportError(f"the network cannot be exported to ONNX: {_one_line(e)}") from None
        if not worst <= EXPORT_TOLERANCE:  # NaN included
            raise ExportError(f"the exported graph's outputs differ from PyTorch's by {worst:.1e} of their "
                              f"largest value (more than {EXPORT_TOLERANCE:.0e}): not written.")


def _check(module: nn.Module, path: Path, input_size: int, outputs: list[str]) -> float:
    """The largest relative difference of ONNX Runtime's outputs to PyTorch's on three random
    images (not the trace's batch of two: a batch size baked into the graph fails here)."""
    import onnxruntime as ort
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (3, input_size, input_size, 3), dtype=torch.uint8, generator=g)
    with torch.inference_mode():
        want = [t.float().numpy() for t in module(x)]
    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    got = session.run(outputs, {"pixels": x.numpy()})
    return max(float(np.abs(g_ - w).max() / (np.abs(w).max() or 1.0)) for g_, w in zip(got, want))


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False) -> dict:
    """Write a fine-tuned run's best network (``best.pt``) as one ONNX file at ``out``."""
    import time

    from cnncodes.extractor.backbones.loading import load_backbone
    from cnncodes.extractor.layers import Probe

    from cnncodes.pipelines.finetune.checkpoints import load_checkpoint
    from cnncodes.pipelines.finetune.freezing import replace_head
    t0 = time.perf_counter()
    out, run_dir = Path(out), Path(run_dir)
    if out.exists() and not overwrite:
        raise SettingsError(f"{out} exists: pass --overwrite to replace it, or choose another --out.")
    _needs_onnx()
    if not (run_dir / "best.pt").is_file():
        raise ExportError(f"{run_dir} holds no best.pt: not a fine-tuning run folder, or a run that has not "
                          f"finished an epoch.")
    ckpt = load_checkpoint(run_dir / "best.pt")
    r = ckpt["recipe"]
    from cnncodes.extractor.recipe import Recipe
    # the weights the run started from: the same preprocessing (best.pt replaces every weight)
    bb = load_backbone(r["model"], Recipe.from_attrs({"model": r["model"], "weights": r.get("weights")})
                       .weights_argument)
    classes = list(r["classes"])
    replace_head(bb.model, Probe(bb.model, bb.input_size, r["model"]), len(classes))
    bb.model.load_state_dict(ckpt["model"])
    meta = {"cnncodes_classes": json.dumps(classes), "cnncodes_layer": "logits",
            "cnncodes_classifier": "finetune", "cnncodes_run": run_dir.resolve().name,
            "cnncodes_temperature": "1.0",
            **_preprocessing(bb.split, r["model"], bb.input_size, r.get("decode", "exact")),
            "cnncodes_recipe": json.dumps(_portable(r), default=str)}
    _write(RunNetwork(bb.model.eval(), bb.split), out, bb.input_size, ["probabilities", "scores"], meta)
    return {"path": str(out), "model": str(run_dir), "layer": "logits", "classifier": "finetune",
            "classes": len(classes), "input": [None, bb.input_size, bb.input_size, 3],
            "outputs": ["probabilities", "scores"], "temperature": None, "bytes": out.stat().st_size,
            "seconds": round(time.perf_counter() - t0, 2)}


def export_classifier(model_file: str | os.PathLike, out: str | os.PathLike, *, with_codes: bool = False,
                      overwrite: bool = False) -> dict:
    """Write the saved probe ``model_file`` with its network as one ONNX file at ``out``; returns
    a summary (path, classes, layer, input size, outputs, seconds)."""
    import time

    from cnncodes.extractor.encoding import prepare_model
    from cnncodes.extractor.layers import Probe
    from cnncodes.extractor.pooling import parse_pooling
    from cnncodes.extractor.runtimes import _Tapped
    t0 = time.perf_counter()
    out = Path(out)
    if out.exists() and not overwrite:
        raise SettingsError(f"{out} exists: pass --overwrite to replace it, or choose another --out.")
    _needs_onnx()
    m = load_model(model_file)
    if m.classifier not in ("svm", "softmax"):
        raise ExportError(f"export takes the linear probes (fit-svm, fit-softmax); {m.path} is a "
                          f"{m.classifier} model.")
    head = ProbeHead(m)
    bb, trained = trained_backbone(m)
    split = bb.split
    preprocessing = _preprocessing(split, trained.model, bb.input_size, trained.decode)
    probe = Probe(bb.model, bb.input_size, bb.name)
    taps = probe.resolve([m.layer])
    pooling = parse_pooling(trained.pooling)
    net = prepare_model(bb, taps, torch.device("cpu"))
    model = Classifier(_Tapped(net, taps, pooling, split), head, with_codes)
    classes = [m.classes[int(c)] for c in m.pipeline.classes_]
    outputs = ["probabilities", "scores"] + (["codes"] if with_codes else [])
    meta = {"cnncodes_classes": json.dumps(classes), "cnncodes_layer": m.layer,
            "cnncodes_classifier": m.classifier, "cnncodes_C": repr(float(m.C)),
            "cnncodes_temperature": repr(head.temperature) if head.calibrated else "none", **preprocessing,
            "cnncodes_recipe": json.dumps(_portable(m.recipe), default=str),
            "cnncodes_metrics": json.dumps({k: m.metrics.get(k) for k in ("cv_accuracy", "test_accuracy")})}
    _write(model, out, bb.input_size, outputs, meta)
    return {"path": str(out), "model": str(m.path), "layer": m.layer, "classifier": m.classifier,
            "classes": len(classes), "input": [None, bb.input_size, bb.input_size, 3], "outputs": outputs,
            "temperature": head.temperature if head.calibrated else None, "bytes": out.stat().st_size,
            "seconds": round(time.perf_counter() - t0, 2)}


def _add_metadata(path: Path, meta: dict) -> None:
    """The model's metadata_props, written into the exported file."""
    import onnx
    model = onnx.load(str(path))
    del model.metadata_props[:]
    for k, v in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    model.producer_name = "cnncodes"
    onnx.save(model, str(path))

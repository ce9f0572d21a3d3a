"""An exported classifier (``cnncodes export``) run with ONNX Runtime alone: no torch imported.

The ONNX file is the whole classifier from the decoded pixels on: a uint8 N x H x W x 3 batch at
the recipe's input size in, the weights' normalisation, the truncated network, the pooling, the
probe's normalisation (and PCA) and its linear head, then the calibrated class probabilities out
(``probabilities``; ``scores`` are what ``predict`` shows as the score: the SVM's decision
function, the softmax's own probabilities; ``codes`` too when exported with them).

What stays outside the graph is the decoding and the exact resize and centre crop, which belong
to the image decoder: they are described in the model's metadata (``cnncodes_resize``,
``cnncodes_decode``) and done here with the same Pillow code the extraction runs
(:func:`~cnncodes.extractor.images.decode_rgb`,
:func:`~cnncodes.extractor.resize.resize_center_crop`), so a photo gives the pixels it gave when
the probe's training codes were extracted.

The metadata (``custom_metadata_map``) holds ``cnncodes_format`` (``cnncodes-onnx-classifier``),
``cnncodes_format_version``, the class names of the output columns, the layer, the classifier,
its C and temperature, and the full extraction recipe, as JSON strings.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnncodes.extractor.errors import CnnCodesError

ONNX_FORMAT = "cnncodes-onnx-classifier"
ONNX_FORMAT_VERSION = 1
# An ONNX file is a protobuf ModelProto whose first field is ir_version (field 1, a varint):
# its first byte is 0x08. Model files cnncodes writes otherwise start "PK" (.npz) or 0x80 (joblib).
ONNX_FIRST_BYTE = b"\x08"


class OnnxModelError(CnnCodesError, ValueError):
    """An ONNX file that is not a classifier cnncodes exported, is damaged, or is newer."""


# The decode and resize rules the metadata states (``cnncodes_preprocess``), for readers other than
# cnncodes: what :func:`preprocess` does, in words.
PREPROCESS_RULES = [
    "read the file's bytes and decode with Pillow",
    "decode 'reduced': Image.draft(None, (size, size)) before loading (a JPEG decodes at the smallest "
    "DCT scale 1/2, 1/4 or 1/8 that keeps both sides >= size), then after the steps below Image.reduce(f) "
    "by f = min(width // size, height // size) when f >= 2; decode 'exact': neither",
    "apply the EXIF orientation (ImageOps.exif_transpose)",
    "to 8-bit RGB: 16- and 32-bit integer images scaled by 65535 (or 255), float images by 1, "
    "transparent pixels composited on white, palette, grayscale and CMYK converted",
    "resize the short side to size with the Pillow filter 'filter' (long side int(size * long / short), "
    "as torchvision), antialiased",
    "centre-crop (height, width) = crop, offsets round((resized - crop) / 2)",
    "uint8, height x width x 3, stacked into N x H x W x 3",
]


def is_onnx(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an ONNX file (by its first byte; a model cnncodes saves starts ``PK``
    (.npz) or 0x80 (joblib), whatever its name)."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return Path(path).suffix.lower() == ".onnx"
    if head.startswith((b"PK", b"\x80")):
        return False
    return head[:1] == ONNX_FIRST_BYTE or Path(path).suffix.lower() == ".onnx"


def preprocess(path: str | os.PathLike, resize: dict, decode: str) -> np.ndarray:
    """The uint8 (H, W, 3) pixels of the image at ``path`` as the exported graph takes them:
    decoded (at reduced scale with ``decode`` = ``reduced``), resized and centre-cropped as the
    weights' preprocessing does, bitwise as the extraction's decoders do it."""
    from PIL import Image

    from cnncodes.extractor.images import decode_rgb
    from cnncodes.extractor.resize import resize_center_crop, resized_size
    size, (ch, cw), filt = int(resize["size"]), resize["crop"], int(resize["filter"])
    with open(path, "rb") as f:
        data = f.read()
    img = decode_rgb(data, Path(path).name, min_size=(size, size) if decode == "reduced" else None)
    out = resize_center_crop(img, size, (ch, cw), filt)
    if out is None:  # the shortcut declined (see resize_center_crop): torchvision's plain operations
        nw, nh = resized_size(*img.size, size)
        img = img.resize((nw, nh), Image.Resampling(filt))
        top, left = int(round((nh - ch) / 2.0)), int(round((nw - cw) / 2.0))
        out = img.crop((left, top, left + cw, top + ch))
    return np.asarray(out, dtype=np.uint8)


@dataclass
class OnnxPrediction:
    path: str
    label: str | None
    score: float | None         # as the saved probe's predict: SVM decision score, softmax probability
    probability: float | None   # of the label, calibrated
    error: str = ""


class OnnxClassifier:
    """An exported classifier, loaded with ONNX Runtime; its metadata checked.

    Examples
    --------
    >>> clf = OnnxClassifier("classifier.onnx")                     # doctest: +SKIP
    >>> [p.label for p in clf.predict(["a.jpg", "b.jpg"])]          # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise OnnxModelError(f"model file {self.path} does not exist.")
        try:
            import onnxruntime as ort
        except ImportError:
            raise OnnxModelError("running an exported ONNX model needs ONNX Runtime: pip install "
                                 "'cnncodes[onnxruntime]'.") from None
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(self.path), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - ONNX Runtime's own error types: a damaged or foreign file
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise OnnxModelError(f"{self.path} cannot be read as an ONNX model: {first}") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("cnncodes_format") != ONNX_FORMAT:
            raise OnnxModelError(f"{self.path} is an ONNX model, but not a classifier exported by "
                                 f"`cnncodes export` (it has no cnncodes metadata).")
        try:
            version = int(meta.get("cnncodes_format_version", "0") or 0)
        except ValueError:
            raise OnnxModelError(f"{self.path} has damaged cnncodes metadata (format version "
                                 f"{meta.get('cnncodes_format_version')!r}).") from None
        if version > ONNX_FORMAT_VERSION:
            raise OnnxModelError(f"{self.path} was exported in format version {version}, newer than this "
                                 f"cnncodes reads ({ONNX_FORMAT_VERSION}): upgrade cnncodes.")
        self._read_metadata(meta)

    def _read_metadata(self, meta: dict) -> None:
        """The metadata, checked against the graph: a model whose metadata was edited or damaged
        is refused here in one line, not by a traceback at the first image."""
        from PIL import Image
        try:
            self.classes = list(json.loads(meta["cnncodes_classes"]))
            self.resize = dict(json.loads(meta["cnncodes_resize"]))
            size, crop = int(self.resize["size"]), [int(c) for c in self.resize["crop"]]
            Image.Resampling(int(self.resize["filter"]))
            self.decode = meta.get("cnncodes_decode", "exact")
            t = meta.get("cnncodes_temperature", "none")
            self.temperature = None if t in ("none", "") else float(t)
            self.recipe = json.loads(meta.get("cnncodes_recipe", "{}"))
        except (KeyError, ValueError, TypeError, IndexError) as e:
            raise OnnxModelError(f"{self.path} has damaged cnncodes metadata "
                                 f"({type(e).__name__}: {e}).") from None
        self.info = {k[len("cnncodes_"):]: meta[k] for k in meta if k.startswith("cnncodes_")}
        if self.decode not in ("reduced", "exact"):
            raise OnnxModelError(f"{self.path} asks for the decode {self.decode!r}, which this cnncodes "
                                 f"does not know: upgrade cnncodes.")
        self.outputs = [o.name for o in self.session.get_outputs()]
        outs = {o.name: o.shape for o in self.session.get_outputs()}
        if "probabilities" not in outs or "scores" not in outs:
            raise OnnxModelError(f"{self.path} lacks the 'probabilities' and 'scores' outputs of a cnncodes "
                                 f"classifier.")
        width = outs["probabilities"][1]
        if isinstance(width, int) and width != len(self.classes):
            raise OnnxModelError(f"{self.path} names {len(self.classes)} classes for {width} output columns.")
        shape = self.session.get_inputs()[0].shape
        if len(shape) != 4 or (all(isinstance(v, int) for v in shape[1:3]) and list(shape[1:3]) != crop) \
                or size < 1:
            raise OnnxModelError(f"{self.path}'s input {shape} is not the crop {crop} its metadata "
                                 f"describes.")

    def run(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """The graph's outputs for a uint8 (N, H, W, 3) batch."""
        try:
            return dict(zip(self.outputs, self.session.run(self.outputs, {"pixels": pixels})))
        except Exception as e:  # noqa: BLE001 - ONNX Runtime's own error types: one line
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise OnnxModelError(f"{self.path} failed on a batch of {len(pixels)}: {first}") from None

    @property
    def uncalibrated_svm(self) -> bool:
        return self.info.get("classifier") == "svm" and self.temperature is None

    def predict(self, paths, batch_size: int = 32, workers: int = 2) -> list[OnnxPrediction]:
        """Classify image files; an image that cannot be decoded is a row with its error."""
        paths = [str(p) for p in paths]
        out = [OnnxPrediction(p, None, None, None) for p in paths]

        def load(i):
            try:
                return i, preprocess(paths[i], self.resize, self.decode), ""
            except Exception as e:  # noqa: BLE001 - any image Pillow refuses (a decompression bomb too)
                return i, None, f"{type(e).__name__}: {e}"[:500]

        with ThreadPoolExecutor(max(1, workers)) as pool:   # Pillow decodes outside the GIL
            for lo in range(0, len(paths), batch_size):
                loaded = list(pool.map(load, range(lo, min(len(paths), lo + batch_size))))
                for i, _, err in loaded:
                    out[i].error = err
                good = [(i, a) for i, a, err in loaded if not err]
                if not good:
                    continue
                res = self.run(np.stack([a for _, a in good]))
                proba, scores = res["probabilities"], res["scores"]
                best = proba.argmax(1)
                for j, (i, _) in enumerate(good):
                    b = int(best[j])
                    out[i].label = self.classes[b]
                    # an SVM exported without a temperature (saved before calibration) has no
                    # probabilities, as its saved model has none
                    out[i].probability = None if self.uncalibrated_svm else float(proba[j, b])
                    s = scores[j]   # as `predict` of the saved probe: one column for a binary SVM
                    out[i].score = float(s[b] if s.shape[0] > 1 else s[0])
        return out

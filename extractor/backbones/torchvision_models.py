"""Every torchvision classification model by name, with ``DEFAULT``, an enum member name, a file
or ``none`` as weights; preprocessing is the weights enum's own ``transforms()``."""
from __future__ import annotations

from ..errors import WeightsNotFoundError
from ..provenance import sha256_of
from .backbone import Backbone
from .downloads import download_torchvision, hub_checkpoint, offline
from .weights_files import NO_WEIGHTS, file_weights, is_path, load_weights_file


def torchvision_names() -> list[str]:
    import torchvision
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _resolve_enum(name: str, weights: str):
    import torchvision
    enum_cls = torchvision.models.get_model_weights(name)
    if weights.upper() == "DEFAULT":
        return enum_cls.DEFAULT
    member = weights.split(".")[-1]
    try:
        return enum_cls[member]
    except KeyError:
        options = ", ".join(["DEFAULT"] + [m.name for m in enum_cls]) + ", none or a file path"
        raise WeightsNotFoundError(f"'{weights}' is not a weights choice of {name}: use {options}.") from None


def torchvision_backbone(name: str, weights: str) -> Backbone:
    import torchvision
    builder = torchvision.models.get_model_builder(name)
    enum_cls = torchvision.models.get_model_weights(name)
    if weights.lower() == "none" or is_path(weights) and weights.upper() != "DEFAULT":
        model = builder(weights=None)
        if weights.lower() == "none":
            winfo = dict(NO_WEIGHTS)
        else:
            load_weights_file(model, weights)
            winfo = file_weights(weights)
        enum = enum_cls.DEFAULT  # the architecture's own preprocessing; no file is needed for it
    else:
        enum = _resolve_enum(name, weights)
        f = hub_checkpoint(enum)
        if not f.is_file() and offline():
            raise WeightsNotFoundError(
                f"weights {enum} for {name} are not in the torch hub cache, and the network is off "
                f"(--offline / CNNCODES_OFFLINE / HF_HUB_OFFLINE). Download {enum.url} and put {f.name} "
                f"in {f.parent}/ (or set TORCH_HOME), or pass --weights PATH or --weights none.")
        if not f.is_file():
            download_torchvision(enum, f)
        model = builder(weights=enum, progress=False)  # from the cache now
        winfo = {"name": str(enum), "file": f.name, "sha256": sha256_of(f), "argument": str(enum)}
    transform = enum.transforms()
    pre = {"resize": int(transform.resize_size[0]), "crop": int(transform.crop_size[0]),
           "interpolation": transform.interpolation.value, "mean": [float(m) for m in transform.mean],
           "std": [float(s) for s in transform.std], "antialias": bool(transform.antialias),
           "source": f"{enum}.transforms()"}
    return Backbone(name, model, transform, pre, winfo)


def torchvision_rows() -> list[dict]:
    import torchvision
    rows = []
    for name in torchvision_names():
        enum = torchvision.models.get_model_weights(name).DEFAULT
        f = hub_checkpoint(enum)
        rows.append({"name": name, "family": "torchvision", "default_weights": str(enum),
                     "offline": f.is_file(), "where": str(f)})
    return rows

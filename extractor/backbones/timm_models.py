"""``timm:<name>[.<tag>]``: any timm architecture, with the tag's pretrained weights, a file or
none, and the preprocessing timm's config gives it."""
from __future__ import annotations

import difflib
from collections.abc import Callable

from torch import nn

from ..errors import ModelNotFoundError, WeightsNotFoundError
from ..provenance import sha256_of
from .backbone import Backbone
from .downloads import timm_cached, timm_file
from .weights_files import NO_WEIGHTS, file_weights, is_path, load_weights_file


def timm_preprocessing(model: nn.Module) -> tuple[Callable, dict]:
    import math

    from timm.data import create_transform, resolve_data_config
    cfg = resolve_data_config({}, model=model)
    crop = int(cfg["input_size"][-1])
    pre = {"resize": int(math.floor(crop / cfg["crop_pct"])), "crop": crop,
           "interpolation": cfg["interpolation"], "mean": [float(m) for m in cfg["mean"]],
           "std": [float(s) for s in cfg["std"]], "crop_pct": float(cfg["crop_pct"]),
           "source": "timm.data.resolve_data_config"}
    return create_transform(**cfg), pre


def _timm_name(name: str) -> str:
    """``timm:<architecture>[.<pretrained tag>]`` checked against timm's registry."""
    import timm
    full = name.removeprefix("timm:")
    arch, _, tag = full.partition(".")
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        hint = f" Did you mean {', '.join('timm:' + c for c in close)}?" if close else ""
        raise ModelNotFoundError(f"'{arch}' is not a timm architecture.{hint}")
    if tag and full not in timm.list_pretrained(f"{arch}.*"):
        tags = [t.partition(".")[2] for t in timm.list_pretrained(f"{arch}.*")]
        close = difflib.get_close_matches(tag, tags, n=3, cutoff=0.4)
        known = f" Did you mean {', '.join(f'timm:{arch}.{t}' for t in close)}?" if close else ""
        raise ModelNotFoundError(f"'{tag}' is not a pretrained tag of timm's {arch}.{known} Its tags: "
                                 f"{', '.join(tags) or 'none'} (cnncodes list-models --family timm "
                                 f"--pretrained {arch}).")
    return full


def timm_backbone(name: str, weights: str) -> Backbone:
    import timm
    full = _timm_name(name)
    model = timm.create_model(full, pretrained=False)  # carries the tag's pretrained_cfg
    if weights.lower() == "none":
        winfo = dict(NO_WEIGHTS)
    elif weights.upper() == "DEFAULT":
        cfg = dict(model.pretrained_cfg)
        f = timm_file(cfg)
        # timm loads its own file (key filters, head adaption) from the cached path
        model = timm.create_model(full, pretrained=True, pretrained_cfg_overlay={"file": str(f)})
        winfo = {"name": f"timm:{cfg['architecture']}.{cfg.get('tag') or ''}".rstrip("."), "file": str(f),
                 "sha256": sha256_of(f), "argument": "DEFAULT", "tag": cfg.get("tag"),
                 "hf_hub_id": cfg.get("hf_hub_id")}
    elif is_path(weights):
        load_weights_file(model, weights)
        winfo = file_weights(weights)
    else:
        raise WeightsNotFoundError(f"timm models take --weights DEFAULT (the tag's pretrained weights), a "
                                   f"file or none, not '{weights}'.")
    transform, pre = timm_preprocessing(model)
    return Backbone(name, model, transform, pre, winfo)


def timm_rows(pattern: str, pretrained: bool) -> list[dict]:
    """timm architectures (default tag), or with ``pretrained`` every tagged weights, with
    whether the Hugging Face cache holds their file."""
    import timm
    from huggingface_hub.constants import HF_HUB_CACHE
    names = timm.list_pretrained(pattern) if pretrained else timm.list_models(pattern)
    rows = []
    for name in names:
        # an architecture's first tagged config is its default weights
        cfg = timm.models.get_pretrained_cfg(name) if pretrained else \
            next(iter(timm.models.get_arch_pretrained_cfgs(name).values()), None)
        repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
        found = timm_cached(repo) if repo else None
        rows.append({"name": f"timm:{name}", "family": "timm",
                     "default_weights": f"hf-hub:{repo}" if repo else "--weights PATH or none",
                     "offline": found is not None,
                     "where": str(found) if found else (f"{HF_HUB_CACHE} (on first use)" if repo else "")})
    return rows

"""Weights files: a state dict read from a file (or a checkpoint holding one) and loaded into a
model, its classifier head resized to the file's classes."""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..errors import WeightsNotFoundError
from ..provenance import sha256_of

log = logging.getLogger(__name__)

NO_WEIGHTS = {"name": "none", "file": None, "sha256": None, "argument": "none"}


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a weights file: a plain state dict or a checkpoint holding one.

    Accepts ``{"model": sd}`` / ``{"state_dict": sd}`` checkpoints (cnncodes' fine-tuning
    checkpoints among them) and strips the ``module.`` prefix DistributedDataParallel adds.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"weights file {path} does not exist.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle errors, zip errors, truncated files
        # torch's own message advises weights_only=False, which would run the file's code:
        # bad advice for a file of unknown origin, so it is not passed on.
        what = "it holds pickled objects besides tensors" if "weights_only" in str(e) else \
            "it is not a PyTorch file (torch.save), or it is truncated"
        raise WeightsNotFoundError(f"{path} is not a readable PyTorch weights file: {what}.") from None
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsNotFoundError(f"{path} holds no state dict (a mapping of names to tensors).")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _heads(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The classifier's Linear modules: timm's ``get_classifier()`` (both heads of a distilled
    DeiT), else the last ``Linear``."""
    from ..layers import own_classifiers
    named = [(n, m) for n, m in own_classifiers(model) if isinstance(m, nn.Linear)]
    return named or [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1:]


def timm_filter(model: nn.Module) -> Callable | None:
    """timm's ``checkpoint_filter_fn`` of the model's module, which timm itself applies to the
    files it loads: it maps other key layouts and resamples positional embeddings (and patch
    embeddings) to the model's input size."""
    import sys
    if not type(model).__module__.startswith("timm."):
        return None
    fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    return fn if callable(fn) else None


def load_weights_file(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a weights file into ``model``, resizing the classifier head if its class count differs.

    A fine-tuned checkpoint has a head sized to its own classes; the backbone is what matters
    for CNN codes, so the classifier's ``Linear`` modules are replaced by ones of the file's
    shape. A timm model's file goes through timm's own filter first: a ViT's positional
    embeddings saved at another input size are resampled to the model's patch grid (the
    preprocessing's crop), as timm does when it loads pretrained weights.
    """
    sd = read_state_dict(path)
    fn = timm_filter(model)
    if fn is not None:
        before = {k: tuple(v.shape) for k, v in sd.items() if k in ("pos_embed", "patch_embed.proj.weight")}
        try:
            sd = fn(sd, model)
        except Exception as e:  # noqa: BLE001 - timm's filter is written for timm's files: keep ours as is
            log.warning("%s: timm's checkpoint filter of %s failed (%s); loading the file as it is",
                        path, type(model).__name__, e)
        for k, shape in before.items():
            if k in sd and tuple(sd[k].shape) != shape:
                log.info("%s: %s resampled from %s to %s by timm", path, k, shape, tuple(sd[k].shape))
    own = model.state_dict()
    mismatched = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    heads = _heads(model)
    if heads and mismatched and all(any(k.startswith(h + ".") for h, _ in heads) for k in mismatched):
        for h, _ in heads:
            if h + ".weight" in sd:
                out_features, in_features = sd[h + ".weight"].shape
                _set_module(model, h, nn.Linear(in_features, out_features))
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = [f"{len(keys)} {what} ({_some(keys)})" for what, keys in
                 (("missing keys", missing), ("unexpected keys", unexpected),
                  ("keys of another shape", wrong))
                 if keys]
        raise WeightsNotFoundError(f"{path} does not fit this model (is it another architecture's?): "
                                   + "; ".join(parts) + ".")
    model.load_state_dict(sd)


def _some(keys: list[str], n: int = 3) -> str:
    """The first ``n`` keys, whole, and how many more."""
    more = f", and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def file_weights(path: str) -> dict:
    p = Path(path).expanduser().resolve()
    return {"name": p.name, "file": str(p), "sha256": sha256_of(p), "argument": str(p)}


def is_path(weights: str) -> bool:
    return os.sep in weights or weights.endswith((".pt", ".pth", ".bin", ".ckpt")) or Path(weights).is_file()

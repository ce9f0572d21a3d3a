"""A backbone by name (embedded, torchvision or ``timm:``), and the lists of models and layers."""
from __future__ import annotations

import difflib
import logging

import torch
from torch import nn

from ..errors import ModelNotFoundError
from .backbone import DEFAULT_MODEL, Backbone
from .embedded import EMBEDDED, embedded_backbone, embedded_rows
from .timm_models import timm_backbone, timm_rows
from .torchvision_models import torchvision_backbone, torchvision_names, torchvision_rows

log = logging.getLogger(__name__)


def load_backbone(name: str = DEFAULT_MODEL, weights: str | None = "DEFAULT", seed: int = 0) -> Backbone:
    """Build a model with its weights and preprocessing, without touching the network.

    Parameters
    ----------
    name : str
        ``efficientnet_lite0`` / ``1`` / ``2``, a torchvision classification model name, or
        ``timm:<name>``.
    weights : str or None
        ``DEFAULT``, a torchvision enum member name, a path to a state dict / checkpoint, or
        ``none`` (random initialisation; ``None`` means the same).
    seed : int
        Of the random initialisation under ``none``: the same network in every process (so a
        cache of random codes resumes and extends with the same network), drawn from a forked
        generator that leaves torch's global one as it was.

    Examples
    --------
    >>> bb = load_backbone("resnet18", weights="none")
    >>> bb.preprocessing["crop"], bb.weights["name"]
    (224, 'none')
    """
    weights = "none" if weights is None else str(weights)
    random = weights.lower() == "none"
    with torch.random.fork_rng(devices=[], enabled=random):
        if random:
            torch.manual_seed(seed)
        bb = _build(name, weights)
    if random:
        bb.weights["seed"] = seed
    bb.model.eval()
    if bb.weights["name"] != "none":
        msg = untrained_warning(bb.model)
        if msg:
            bb.warnings.append(f"{name} with weights {bb.weights['name']}: {msg}")
            log.warning(bb.warnings[-1])
    return bb


def _build(name: str, weights: str) -> Backbone:
    if name in EMBEDDED:
        bb = embedded_backbone(name, weights)
    elif name.startswith("timm:"):
        bb = timm_backbone(name, weights)
    elif name.startswith("hf:"):
        from .hf_models import hf_backbone
        bb = hf_backbone(name, weights)
    elif name.startswith("openclip:"):
        from .openclip_models import openclip_backbone
        bb = openclip_backbone(name, weights)
    elif name in torchvision_names():
        bb = torchvision_backbone(name, weights)
    else:
        known = list(EMBEDDED) + torchvision_names()
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ModelNotFoundError(
            f"'{name}' is not a known model.{hint} Run 'cnncodes list-models'; "
            f"timm architectures are named 'timm:<name>', Hugging Face models 'hf:<repo>', OpenCLIP "
            f"image towers 'openclip:<architecture>/<tag>'.")
    return bb


def untrained_warning(model: nn.Module) -> str | None:
    """A reason to think the weights are untrained, or None.

    Freshly initialised batch-norm layers have running variance exactly 1 and mean exactly 0;
    trained ones essentially never do.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and m.running_var is not None]
    if bns and all(bool(torch.all(m.running_var == 1)) and bool(torch.all(m.running_mean == 0))
                   for m in bns):
        return ("every batch-norm layer has running mean 0 and variance 1: these weights look "
                "untrained (randomly initialised), so the codes will be close to meaningless.")
    return None


FAMILIES = ("embedded", "torchvision", "timm", "hf", "openclip")


def list_models(family: str | None = None, pattern: str | None = None,
                pretrained: bool = False) -> list[dict]:
    """The model names cnncodes accepts, each with its default weights, whether they are here
    (``offline``) and where they are (or would be) kept.

    ``family`` keeps one of :data:`FAMILIES`; ``pattern`` is a shell-style filter on the name
    (``resnet*``); timm, with its thousand architectures, is listed when asked for by family or
    pattern, and with ``pretrained`` as its tagged weights (``timm:convnext_tiny.fb_in1k``).
    ``hf`` lists the Hugging Face cache's repositories that have an image processor (any other
    repository of the hub is loaded by name all the same), ``openclip`` OpenCLIP's pretrained
    tags (``openclip:ViT-B-32/openai``); each when asked for by family or pattern, and only where
    its library is installed.
    """
    import fnmatch
    if family not in (None, *FAMILIES):
        raise ModelNotFoundError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}.")
    rows = []
    if family in (None, "embedded"):
        rows += embedded_rows()
    if family in (None, "torchvision"):
        rows += torchvision_rows()
    if family == "timm" or (family is None and (pattern or pretrained)):
        rows += timm_rows(pattern.removeprefix("timm:") if pattern else "*", pretrained)
    if family == "hf" or (family is None and pattern):
        from .hf_models import hf_rows
        rows += hf_rows()
    if family == "openclip" or (family is None and pattern):
        from .openclip_models import openclip_rows
        rows += openclip_rows()
    if pattern:
        rows = [r for r in rows if any(fnmatch.fnmatch(r["name"], f"{p}{pattern}")
                                       for p in ("", "timm:", "hf:", "openclip:"))]
    return rows


def list_layers(model: str = DEFAULT_MODEL, weights: str | None = "none") -> tuple[list, dict]:
    """Every tappable layer of ``model`` (name, type, kind, shape, stride) and what each alias
    means: ``stageK``, ``penultimate`` and ``block:K`` for every block.

    Weights do not change shapes, so the default builds the architecture without loading any.
    """
    from ..layers import Probe
    bb = load_backbone(model, weights)
    probe = Probe(bb.model, bb.input_size, model)
    return probe.layers, {**probe.aliases(), **{f"block:{k}": b for k, b in enumerate(probe.blocks)}}

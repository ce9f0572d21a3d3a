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
    """An OpenCLIP image tower: pixels -> its projected image embedding, with the embedding
    before the projection the input of an identity ``head`` (``penultimate``) and the projection
    a layer of its own (the ``projection`` alias).

    The projection of each kind of tower: the ViT's bare matrix ``proj`` (held here as a
    ``Linear``); a timm tower's ``head.proj`` (linear) or ``head.mlp``, or without either the timm
    trunk's own classifier, which OpenCLIP sizes to the embedding. A ModifiedResNet's attention
    pool, and a timm tower's, project inside the pool: there the tower's output is both.
    """

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual
        self.head = nn.Identity()
        self.projection: nn.Module | None = None
        self._kind, alias = "tower", "head"
        trunk, head = getattr(visual, "trunk", None), getattr(visual, "head", None)
        proj = getattr(visual, "proj", None)
        if isinstance(proj, nn.Parameter):  # the ViT tower's `pooled @ proj`, as a Linear
            visual.proj = None
            self.projection = nn.Linear(proj.shape[0], proj.shape[1], bias=False)
            self.projection.weight = nn.Parameter(proj.detach().t().contiguous(),
                                                  requires_grad=proj.requires_grad)
            alias = "projection"
        elif trunk is not None and isinstance(head, nn.Sequential) and "pool" not in head._modules:
            last = next((k for k in ("proj", "mlp") if k in head._modules), None)
            if last is not None:
                self._kind, alias = "timm-head", f"visual.head.{last}"
            elif isinstance(_trunk_classifier(trunk)[1], nn.Linear):
                self._kind, alias = "timm-trunk", "visual.trunk." + _trunk_classifier(trunk)[0]
        self.layer_aliases = {"projection": alias}
        # prefix tokens: the ViT tower's one class token (OpenCLIP: "always there, as of now"),
        # a timm trunk's own count
        n = getattr(trunk, "num_prefix_tokens", None) if trunk is not None else None
        self.num_prefix_tokens = n if isinstance(n, int) else (1 if hasattr(visual, "class_embedding") else 0)
        self.has_class_token = (self.num_prefix_tokens > 0
                                and getattr(trunk, "has_class_token", True) is not False)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        v = self.visual
        if self._kind == "timm-head":  # the head's pool/dropout, not its projection
            x = v.trunk(x)
            for name, m in v.head.named_children():
                if name not in ("proj", "mlp"):
                    x = m(x)
            return x
        if self._kind == "timm-trunk":
            return v.trunk.forward_head(v.trunk.forward_features(x), pre_logits=True)
        out = v(x)
        return out[0] if isinstance(out, (tuple, list)) else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.head(self.embed(x))
        if self._kind == "timm-head":
            head = self.visual.head
            return head.proj(e) if "proj" in head._modules else head.mlp(e)
        if self._kind == "timm-trunk":
            return _trunk_classifier(self.visual.trunk)[1](e)
        return self.projection(e) if self.projection is not None else e

    def get_classifier(self) -> nn.Module:
        return self.head


def _trunk_classifier(trunk: nn.Module) -> tuple[str, nn.Module | None]:
    """A timm trunk's classifier as (module name, module), by timm's own ``get_classifier()``."""
    get = getattr(trunk, "get_classifier", None)
    head = get() if callable(get) else None
    names = {id(m): n for n, m in trunk.named_modules()}
    return (names.get(id(head), ""), head) if head is not None else ("", None)


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
    """OpenCLIP's ``create_model_and_transforms``, its failures one line, its notices (on the root
    logger: "No pretrained weights loaded ...", "Pretrained tag or path ... not found") quiet."""
    import logging
    before = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        return open_clip.create_model_and_transforms(**kw)
    except Exception as e:  # noqa: BLE001 - configs, downloads, unpickling, state dicts: each one line
        reason = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise ModelNotFoundError(f"could not load {name}: {reason}") from None
    finally:
        logging.disable(before)


def _network(what: str, where: str, name: str) -> None:
    if offline():
        raise WeightsNotFoundError(f"{name}: the weights are not in {where}, and the network is off "
                                   f"(--offline / CNNCODES_OFFLINE / HF_HUB_OFFLINE): run once online.")
    check_reachable(what, "rerun when online (or --offline with the files cached)")


def _checkpoint(open_clip, folder: Path) -> Path | None:
    """The weights file OpenCLIP itself loads from a folder (its ``_find_checkpoint_in_dir``)."""
    from open_clip import factory
    find = getattr(factory, "_find_checkpoint_in_dir", None)
    if find is None:  # an OpenCLIP without it: its documented names, in its order
        return next((folder / f for f in _HUB_FILES if (folder / f).is_file()), None)
    found = find(folder)
    return Path(found) if found else None


def _schema_backbone(open_clip, name: str, spec: str, w: str):
    """``hf-hub:<repo>`` / ``local-dir:<folder>``: OpenCLIP's config and weights of a folder."""
    if w not in ("default", "none"):
        raise WeightsNotFoundError(f"{name} holds its own weights: --weights DEFAULT or none.")
    if spec.startswith("hf-hub:"):
        repo = spec.removeprefix("hf-hub:")
        if "@" in repo:
            raise ModelNotFoundError(f"{name}: OpenCLIP's hf-hub: names take no @revision.")
        folder = _hub_folder(repo)
        if folder is None:
            from .hf_models import cached_repo
            if cached_repo(repo) is not None:
                raise ModelNotFoundError(f"{name}: the cached repository {repo} has no open_clip_config.json "
                                         f"(a transformers model? use hf:{repo}).")
            _network(repo, f"{repo} in the Hugging Face cache", name)
        source = f"local-dir:{folder}" if folder is not None else spec
    else:
        folder = Path(spec.removeprefix("local-dir:")).expanduser()
        if not (folder / "open_clip_config.json").is_file():
            raise ModelNotFoundError(f"{name}: {folder} is not a folder with an open_clip_config.json.")
        source = f"local-dir:{folder}"
    if folder is not None and w == "default" and _checkpoint(open_clip, folder) is None:
        raise WeightsNotFoundError(f"{name}: {folder} holds no weights file OpenCLIP would load "
                                   f"(*.safetensors, *.bin, *.pth).")
    model, _, preprocess = _create(open_clip, name, model_name=source, load_weights=w == "default")
    if w == "none":
        return model, preprocess, dict(NO_WEIGHTS)
    folder = folder or _hub_folder(spec.removeprefix("hf-hub:"))
    ckpt = _checkpoint(open_clip, folder)
    winfo = {"name": name, "file": str(ckpt), "sha256": sha256_of(ckpt), "argument": "DEFAULT"}
    if spec.startswith("hf-hub:"):
        winfo["revision"] = folder.name
    return model, preprocess, winfo


def openclip_backbone(name: str, weights: str) -> Backbone:
    open_clip = need_extra("open_clip", "openclip", name)
    arch, tag = parse_name(name, open_clip)
    w = weights.lower()
    if arch.startswith(_SCHEMAS):
        model, preprocess, winfo = _schema_backbone(open_clip, name, arch, w)
    else:
        cfg = open_clip.get_pretrained_cfg(arch, tag) if tag else {}
        # what the tag's weights were trained with, whatever file they come from: its
        # preprocessing (which OpenCLIP applies for a tag, not for a file: open_clip #1068) and
        # its activation (QuickGELU for OpenAI's weights, which OpenCLIP only warns about)
        kw = {"image_mean": cfg.get("mean"), "image_std": cfg.get("std"),
              "image_interpolation": cfg.get("interpolation"),
              "image_resize_mode": cfg.get("resize_mode"), "force_quick_gelu": bool(cfg.get("quick_gelu"))}
        if w == "default":
            if tag is None:
                tags = open_clip.list_pretrained_tags_by_model(arch)
                raise WeightsNotFoundError(f"{name} names no pretrained tag: use {PREFIX}{arch}/<tag> (its "
                                           f"tags: {', '.join(tags) or 'none'}), or --weights PATH or none.")
            f, where = _cached_tag_file(cfg)
            if f is None:
                _network(_hub_repo(cfg) or cfg.get("url", ""), where, name)
                model, _, preprocess = _create(open_clip, name, model_name=arch, pretrained=tag, **kw)
                f, _ = _cached_tag_file(cfg)
            else:
                model, _, preprocess = _create(open_clip, name, model_name=arch, pretrained=str(f), **kw)
            winfo = {"name": f"{PREFIX}{arch}/{tag}", "file": str(f) if f else None,
                     "sha256": sha256_of(f) if f else None, "argument": "DEFAULT", "tag": tag,
                     "quick_gelu": kw["force_quick_gelu"]}
        elif w == "none":
            model, _, preprocess = _create(open_clip, name, model_name=arch, load_weights=False, **kw)
            winfo = dict(NO_WEIGHTS)
        elif is_path(weights):
            f = Path(weights).expanduser()
            if not f.is_file():
                raise WeightsNotFoundError(f"weights file {f} does not exist.")
            model, _, preprocess = _create(open_clip, name, model_name=arch, pretrained=str(f), **kw)
            winfo = file_weights(weights)
        else:
            raise WeightsNotFoundError(f"OpenCLIP models take --weights DEFAULT (the tag's), a file or none, "
                                       f"not '{weights}'.")
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

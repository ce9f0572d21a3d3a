"""``hf:<repo id>[@revision]`` (or ``hf:<folder>``): a Hugging Face Transformers vision model,
with its image processor's own preprocessing.

- The model is ``AutoModel``'s for the repository; of a composite model (CLIP, SigLIP) the
  vision tower (``vision_model``) and, where the model has one, its ``visual_projection``.
  ``AutoBackbone`` is not needed: the layer probe hooks every module of the whole model.
- Preprocessing is ``AutoImageProcessor``'s, read from the repository's
  ``preprocessor_config.json``: cnncodes calls the processor itself for its resize and crop
  (per image, in the decoding workers) and folds its rescale into its mean and std per batch
  as the processor does, so the network's input is bitwise the processor's (a test checks it).
  A processor cnncodes cannot cut that way runs whole per image.
- Files come from the Hugging Face cache (``HF_HOME``) with no network at all when they are
  there; otherwise from the hub, by transformers' own loader; ``--offline`` never connects.
- ``penultimate`` is the image embedding: the model's ``pooler_output`` (ConvNeXt, Swin, BEiT:
  what their classifiers read; DINOv2: the CLS token after the final norm, which its classifier
  reads together with the patch tokens' mean; CLIP's and SigLIP's towers: their image
  embedding), except for ViT and DeiT, whose pooler is BERT's ``dense + tanh``: for them the
  CLS token after the final norm, what their image-classification heads read. ``projection``
  is CLIP's projected image embedding.
- A model whose forward pass is random in eval mode (ViTMAE masks patches at random) is
  refused; weights a repository lacks (initialised at random) are named in a warning.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelNotFoundError, WeightsNotFoundError
from ..provenance import sha256_of
from .backbone import Backbone, SplitTransform, need_extra
from .downloads import check_reachable, offline
from .weights_files import NO_WEIGHTS

log = logging.getLogger(__name__)

PREFIX = "hf:"


def parse_name(name: str) -> tuple[str, str | None]:
    """``hf:<repo>[@revision]`` -> (repo, revision or None); ``hf:<folder>`` -> (folder, None)."""
    spec = name.removeprefix(PREFIX)
    folder = Path(spec).expanduser()
    if spec.startswith(("/", ".", "~")) or folder.exists():
        if not folder.exists():
            base = Path(spec.rpartition("@")[0]).expanduser() if "@" in spec else None
            if base is not None and base.is_dir():
                raise ModelNotFoundError(f"{name}: a local folder takes no @revision.")
            raise ModelNotFoundError(f"{name}: there is no folder {folder}.")
        if not (folder.is_dir() and (folder / "config.json").is_file()):
            raise ModelNotFoundError(f"{name}: {folder} is not a folder written by save_pretrained (it has "
                                     f"no config.json).")
        return str(folder), None
    repo, _, revision = spec.partition("@")
    if not repo:
        raise ModelNotFoundError(f"'{name}' names no repository: use hf:<owner>/<name>[@revision] or "
                                 f"hf:<folder>.")
    return repo, revision or None


class ProcessorTransform:
    """A transformers image processor as cnncodes' transform: PIL RGB image -> float tensor."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, img) -> torch.Tensor:
        return self.processor(img, return_tensors="pt")["pixel_values"][0]

    def pixels(self, img) -> torch.Tensor:
        """The processor's resize and crop only: a uint8 tensor (3, H, W)."""
        out = self.processor(img, do_rescale=False, do_normalize=False, return_tensors="pt")
        return out["pixel_values"][0]

    def as_split(self) -> SplitTransform | None:
        """The processor cut as :class:`SplitTransform` is: transformers' torchvision backend
        resizes and crops uint8 tensors, then normalises in float32 with ``mean / rescale`` and
        ``std / rescale``; :class:`SplitTransform` runs exactly that. None for other processors
        (the PIL backend rescales and normalises in numpy), which then run whole."""
        p = self.processor
        if getattr(p, "backend", None) != "torchvision" or not (p.do_rescale and p.do_normalize):
            return None
        scale = 1.0 / p.rescale_factor
        mean = (torch.tensor(p.image_mean) * scale).tolist()
        std = (torch.tensor(p.image_std) * scale).tolist()
        return SplitTransform([self.pixels], "float", mean, std)


class HFVision(nn.Module):
    """A transformers vision model as a network of pixels -> its image embedding.

    What cnncodes' layer probe reads of a model: ``num_prefix_tokens`` (CLS, distillation and
    register tokens before the patch tokens), ``get_classifier()`` (whose input is
    ``penultimate``) and ``layer_aliases`` (``projection``).
    """

    def __init__(self, model: nn.Module, projection: nn.Linear | None):
        super().__init__()
        self.model = model
        self.head = nn.Identity()
        self.projection = projection
        pooler = getattr(model, "pooler", None)
        # ViT's and DeiT's pooler is BERT's (dense + tanh), which their classifiers do not read
        self._pooler = pooler is None or not any(isinstance(m, nn.Tanh) for m in pooler.modules())
        self.num_prefix_tokens = embedding_prefix_tokens(model)
        self.has_class_token = self.num_prefix_tokens > 0
        self.layer_aliases = {"projection": "projection"} if projection is not None else {}

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=x)
        pooled = getattr(out, "pooler_output", None) if self._pooler else None
        if pooled is None:
            h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
            if h.ndim == 3:
                pooled = h[:, 0] if self.num_prefix_tokens else h.mean(1)
            else:
                pooled = h.flatten(2).mean(-1)
        return pooled.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.head(self.embed(x))
        return self.projection(pooled) if self.projection is not None else pooled

    def get_classifier(self) -> nn.Module:
        return self.head


# The learned tokens transformers' vision embeddings put before the patch tokens, by parameter
# name: ViT's and BEiT's `cls_token`, DeiT's `distillation_token`, DINOv2's `register_tokens`,
# CLIP's `class_embedding` (a vector: one token).
_PREFIX_PARAMETERS = ("cls_token", "class_embedding", "distillation_token", "register_tokens")


def embedding_prefix_tokens(model: nn.Module) -> int:
    """How many tokens come before the patch tokens (CLS, distillation, registers), counted from
    the embeddings' learned token parameters."""
    n = 0
    for name, p in model.named_parameters():
        if name.rpartition(".")[2] in _PREFIX_PARAMETERS and "embeddings" in name:
            n += int(p.shape[-2]) if p.ndim == 3 else 1
    return n


def _check_deterministic(net: nn.Module, size: int, name: str) -> None:
    """Refuse a model whose forward pass is random in eval mode (ViTMAE masks and shuffles
    patches at random): its codes would be noise."""
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = net(x), net(x)
    if a.shape != b.shape or not torch.equal(a, b):
        raise ModelNotFoundError(f"{name} gives another output each time for the same image (it masks or "
                                 f"shuffles patches at random, as ViTMAE does): not a feature extractor.")


def cached_repo(repo: str) -> Path | None:
    """The Hugging Face cache's folder of a model repository, whatever it holds (for messages)."""
    from huggingface_hub.constants import HF_HUB_CACHE
    folder = Path(HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
    return folder if folder.is_dir() else None


def _snapshot(repo: str, revision: str | None) -> Path | None:
    """The cached folder of ``repo`` at ``revision`` (the cache's ``main``), or the folder itself."""
    if Path(repo).is_dir():
        return Path(repo)
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError
    try:
        hit = try_to_load_from_cache(repo, "config.json", revision=revision)
    except HFValidationError as e:
        raise ModelNotFoundError(f"hf:{repo}: not a repository id ({str(e).splitlines()[0]}).") from None
    return Path(hit).parent if isinstance(hit, str) else None


def _load(repo: str, revision: str | None, name: str, what: str, loader):
    """``loader(local_files_only=True)`` from the cache first (no network at all), else from the
    hub (a partial cache, a config cached by ``list-layers`` without the weights, is completed);
    every failure is one line."""
    from huggingface_hub.constants import HF_HUB_CACHE
    if Path(repo).is_dir() or _snapshot(repo, revision) is not None:
        try:
            return loader(local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            if Path(repo).is_dir() or offline():
                raise ModelNotFoundError(f"could not load the {what} of {name}: {_reason(e)}") from None
    elif offline():
        hint = " (an OpenCLIP repository? use openclip:hf-hub:" + repo + ")" if cached_repo(repo) else ""
        raise WeightsNotFoundError(f"{name} is not in the Hugging Face cache ({HF_HUB_CACHE}){hint}, and the "
                                   f"network is off (--offline / CNNCODES_OFFLINE / HF_HUB_OFFLINE): run "
                                   f"once online.")
    check_reachable(repo, "rerun when online (or --offline with the files in the Hugging Face cache)")
    try:
        return loader(local_files_only=False)
    except (OSError, ValueError, KeyError) as e:
        raise ModelNotFoundError(f"could not load the {what} of {name}: {_reason(e)}") from None


def _reason(e: BaseException) -> str:
    text = str(e).strip()
    if "is not a local folder and is not a valid model identifier" in text or "404" in text:
        return "no such repository on the Hugging Face hub (or it is private: hf auth login)"
    return text.splitlines()[0] if text else e.__class__.__name__


def weight_files(folder: Path) -> list[Path]:
    """The weights files transformers loads from a folder, in its order of preference: the
    safetensors shards of an index, one safetensors file, then the same for PyTorch's .bin."""
    import json
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (folder / index).is_file():
            shards = sorted(set(json.loads((folder / index).read_text()).get("weight_map", {}).values()))
            return [folder / f for f in shards]
        if (folder / single).is_file():
            return [folder / single]
    return []


def _file_sha256(f: Path) -> str:
    """A cached file's sha256: the hub names large (LFS) files' blobs by it, so a symbolic link
    into ``blobs/`` says it without reading gigabytes; otherwise the bytes are hashed."""
    target = Path(os.path.realpath(f))
    if f.is_symlink() and target.parent.name == "blobs" and len(target.name) == 64 \
            and all(c in "0123456789abcdef" for c in target.name):
        return target.name
    return sha256_of(f)


def _weights_info(folder: Path, repo: str, revision: str | None) -> dict:
    files = weight_files(folder)
    if not files:
        raise WeightsNotFoundError(f"{folder} holds no weights transformers loads (model.safetensors, "
                                   f"pytorch_model.bin, or their sharded indexes).")
    digests = [_file_sha256(f) for f in files]
    digest = digests[0] if len(files) == 1 else hashlib.sha256(
        "".join(f"{f.name}:{d}\n" for f, d in zip(files, digests)).encode()).hexdigest()
    local = Path(repo).is_dir()
    commit = None if local else folder.name
    return {"name": f"hf:{repo}@{commit}" if commit else f"hf:{folder.resolve()}", "file": str(folder),
            "sha256": digest, "argument": "DEFAULT", "revision": commit or revision,
            "files": [f.name for f in files]}


def hf_backbone(name: str, weights: str) -> Backbone:
    transformers = need_extra("transformers", "hf", name)
    from transformers.utils import logging as tlog
    repo, revision = parse_name(name)
    if weights.upper() not in ("DEFAULT", "NONE"):
        raise WeightsNotFoundError(f"{name} takes --weights DEFAULT (the repository's) or none; a local "
                                   f"model is named by its folder: hf:/path/to/folder.")
    kw = {"revision": revision} if revision else {}
    verbosity = tlog.get_verbosity()
    tlog.set_verbosity_error()  # its notices on weights a model does not use (a CLIP's text tower)
    warnings = []
    try:
        processor = _load(repo, revision, name, "image processor",
                          lambda **a: transformers.AutoImageProcessor.from_pretrained(repo, **kw, **a))
        if weights.upper() == "DEFAULT":
            tlog.disable_progress_bar()
            try:
                model, info = _load(repo, revision, name, "model",
                                    lambda **a: transformers.AutoModel.from_pretrained(
                                        repo, output_loading_info=True, **kw, **a))
            finally:
                tlog.enable_progress_bar()
            winfo = _weights_info(_snapshot(repo, revision), repo, revision)
            # weights the repository does not hold are random: say so (a BERT-style pooler that
            # penultimate does not read is no loss)
            missing = [k for k in info.get("missing_keys", ()) if not k.startswith("pooler.")]
            if missing:
                warnings.append(f"{name}: {len(missing)} weights of {type(model).__name__} are not in the "
                                f"repository and were initialised at random ({', '.join(sorted(missing)[:3])}"
                                f"{' ...' if len(missing) > 3 else ''}).")
        else:
            config = _load(repo, revision, name, "config",
                           lambda **a: transformers.AutoConfig.from_pretrained(repo, **kw, **a))
            model = transformers.AutoModel.from_config(config)
            winfo = dict(NO_WEIGHTS)
    finally:
        tlog.set_verbosity(verbosity)
    tower = getattr(model, "vision_model", None)
    projection = getattr(model, "visual_projection", None) if tower is not None else None
    tower = tower if isinstance(tower, nn.Module) else model
    import inspect
    if "pixel_values" not in inspect.signature(tower.forward).parameters:
        raise ModelNotFoundError(f"{name} is a {type(model).__name__}, not an image model (its forward takes "
                                 f"no pixel_values).")
    transform = ProcessorTransform(processor)
    pre = _preprocessing(processor, transform, name)
    net = HFVision(tower.eval(), projection if isinstance(projection, nn.Linear) else None)
    _check_deterministic(net, pre["crop"], name)
    for w in warnings:
        log.warning(w)
    return Backbone(name, net, transform, pre, winfo, warnings=warnings, decode="exact")


def _preprocessing(processor, transform: ProcessorTransform, name: str) -> dict:
    """The processor's settings as cnncodes records them, with the input size its output has."""
    from PIL import Image
    sides = set()
    for w, h in ((320, 240), (240, 320)):
        out = transform.pixels(Image.new("RGB", (w, h)))
        sides.add(tuple(out.shape[-2:]))
    if len(sides) != 1:
        raise ModelNotFoundError(f"{name}: its image processor gives inputs of {sorted(sides)} pixels "
                                 f"depending on the image; cnncodes needs one square input size.")
    if len({*next(iter(sides))}) != 1:
        raise ModelNotFoundError(f"{name}: its image processor gives {next(iter(sides))} pixel inputs; "
                                 f"cnncodes needs one square input size.")
    crop = int(next(iter(sides))[0])
    size = dict(processor.size or {})
    side = size.get("shortest_edge") or max(size.get("height") or 0, size.get("width") or 0) or crop
    crop_pct = getattr(processor, "crop_pct", None)
    resample = getattr(processor, "resample", None)
    interpolation = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}.get(
        int(resample) if resample is not None else 2, "bilinear")
    return {"resize": int(side / crop_pct) if crop_pct else int(side), "crop": crop,
            "interpolation": interpolation, "mean": [float(m) for m in processor.image_mean],
            "std": [float(s) for s in processor.image_std], "size": size,
            "crop_size": dict(getattr(processor, "crop_size", None) or {}) or None,
            "do_center_crop": bool(getattr(processor, "do_center_crop", False)),
            "rescale_factor": float(processor.rescale_factor), "crop_pct": crop_pct,
            "processor": type(processor).__name__, "backend": str(getattr(processor, "backend", "")),
            "source": "transformers.AutoImageProcessor"}


def hf_rows() -> list[dict]:
    """The ``hf:`` models in the Hugging Face cache: repositories with an image processor."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound
    try:
        info = scan_cache_dir()
    except (CacheNotFound, OSError):
        return []
    rows = []
    for r in sorted(info.repos, key=lambda r: r.repo_id):
        if r.repo_type != "model":
            continue
        snap = next((s for s in r.revisions
                     if any(f.file_name == "preprocessor_config.json" for f in s.files)), None)
        if snap is not None:
            rows.append({"name": f"hf:{r.repo_id}", "family": "hf", "default_weights": f"hf-hub:{r.repo_id}",
                         "offline": bool(weight_files(Path(snap.snapshot_path))),
                         "where": str(snap.snapshot_path)})
    return rows

"""Tiny random-weight models written by the libraries' own APIs (``save_pretrained``, OpenCLIP's
config and state dict) into the layout huggingface_hub keeps under ``HF_HOME``, so that cnncodes
loads them by name with the network off, exactly as it would load a downloaded model."""
from __future__ import annotations

import json
from pathlib import Path

import torch

REVISION = "0123456789abcdef0123456789abcdef01234567"

# OpenCLIP's model config and preprocessing, as a hub repository's open_clip_config.json has them
OPENCLIP_CONFIG = {
    "model_cfg": {"embed_dim": 16,
                  "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16,
                                 "patch_size": 8},
                  "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}},
    "preprocess_cfg": {"mean": [0.4, 0.45, 0.5], "std": [0.2, 0.25, 0.3], "interpolation": "bicubic",
                       "resize_mode": "shortest"},
}


def snapshot(home: Path, repo: str) -> Path:
    """``HF_HOME/hub/models--<owner>--<name>``: refs/main naming a snapshot folder."""
    folder = Path(home) / "hub" / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(REVISION)
    snap = folder / "snapshots" / REVISION
    snap.mkdir(parents=True, exist_ok=True)
    return snap


def write_hf_models(home: Path) -> dict[str, str]:
    """Four transformers repositories: a ViT (a stretching resize, a BERT-style pooler), DINOv2
    with four register tokens (resize then crop), a CLIP (a composite with a projection) and a
    Swin (hierarchical tokens). Returns name -> repo."""
    import transformers as tr
    torch.manual_seed(0)
    text = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                vocab_size=99, bos_token_id=1, eos_token_id=2)
    vision = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                  image_size=32, patch_size=8)
    models = {
        "vit": (tr.ViTModel(tr.ViTConfig(**vision)), tr.ViTImageProcessor(size={"height": 32, "width": 32})),
        "dinov2": (tr.Dinov2WithRegistersModel(tr.Dinov2WithRegistersConfig(**vision, num_register_tokens=4)),
                   tr.BitImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32},
                                        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])),
        "clip": (tr.CLIPModel(tr.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)),
                 tr.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})),
        "swin": (tr.SwinModel(tr.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1, 2],
                                            num_heads=[2, 2, 4], window_size=2)),
                 tr.ViTImageProcessor(size={"height": 32, "width": 32})),
    }
    out = {}
    for name, (model, processor) in models.items():
        repo = f"cnncodes-test/tiny-{name}"
        snap = snapshot(home, repo)
        model.save_pretrained(snap)
        processor.save_pretrained(snap)
        out[name] = repo
    return out


def write_openclip_model(home: Path, repo: str = "cnncodes-test/tiny-openclip") -> str:
    """A tiny OpenCLIP ViT model as a hub repository (``openclip:hf-hub:<repo>``)."""
    import open_clip
    from safetensors.torch import save_file
    torch.manual_seed(0)
    model = open_clip.CLIP(**OPENCLIP_CONFIG["model_cfg"])
    snap = snapshot(home, repo)
    (snap / "open_clip_config.json").write_text(json.dumps(OPENCLIP_CONFIG))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(snap / "open_clip_model.safetensors"))
    return repo


# OpenCLIP towers of timm trunks: a ViT whose own classifier is the projection (timm_proj null,
# as EVA02's), and a ResNet with a linear projection after its pool
OPENCLIP_TIMM_TOWERS = {
    # OpenCLIP builds the trunk at timm's own size (224 for this ViT), whatever image_size says
    "timm-token": {"image_size": 224, "timm_model_name": "vit_tiny_patch16_224",
                   "timm_model_pretrained": False, "timm_pool": "token", "timm_proj": None},
    "timm-linear": {"image_size": 32, "timm_model_name": "resnet10t", "timm_model_pretrained": False,
                    "timm_pool": "avg", "timm_proj": "linear"},
}


def write_openclip_folder(folder: Path, vision_cfg: dict) -> Path:
    """An OpenCLIP model as a local folder (``openclip:local-dir:<folder>``)."""
    import open_clip
    from safetensors.torch import save_file
    torch.manual_seed(0)
    cfg = {**OPENCLIP_CONFIG["model_cfg"], "vision_cfg": vision_cfg}
    model = open_clip.CLIP(**cfg)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": cfg, "preprocess_cfg": OPENCLIP_CONFIG["preprocess_cfg"]}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    return folder


def write_vitmae(home: Path, repo: str = "cnncodes-test/tiny-vitmae") -> str:
    """A ViTMAE, whose forward pass masks patches at random."""
    import transformers as tr
    torch.manual_seed(0)
    snap = snapshot(home, repo)
    tr.ViTMAEModel(tr.ViTMAEConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64, image_size=32, patch_size=8)).save_pretrained(snap)
    tr.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(snap)
    return repo

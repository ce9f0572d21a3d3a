"""Fine-tuning's recipe options: augmentation presets, gradient clipping, and how runs made
before them resume."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cnncodes.extractor.backbones.loading import load_backbone

from cnncodes.pipelines.finetune.checkpoints import load_checkpoint
from cnncodes.pipelines.finetune.data import AUGMENTS, train_min_size, train_transform
from cnncodes.pipelines.finetune.freezing import FinetuneError
from cnncodes.pipelines.finetune.training import finetune

from .test_finetune import tiny_config, write_many

LITE0 = {"resize": 256, "crop": 224, "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3}


def test_every_preset_makes_a_crop_sized_tensor_and_none_is_the_evaluation_transform():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    for name in AUGMENTS:
        torch.manual_seed(0)
        assert train_transform(LITE0, name)(img).shape == (3, 224, 224), name
    a, b = train_transform(LITE0, "none")(img), train_transform(LITE0, "none")(img)
    assert torch.equal(a, b)  # no randomness
    with pytest.raises(FinetuneError, match="augment must be one of none, light, standard"):
        train_transform(LITE0, "heavy")


def test_a_reduced_training_decode_keeps_the_smallest_crops_pixels():
    assert train_min_size("reduced", LITE0, "standard") == (792, 792)   # 224 / sqrt(0.08)
    assert train_min_size("reduced", LITE0, "light") == (379, 379)      # 224 / sqrt(0.35)
    assert train_min_size("reduced", LITE0, "none") == (256, 256)       # the resize's
    assert train_min_size("exact", LITE0, "standard") is None


def test_clipping_bounds_every_step(tmp_path):
    data = write_many(tmp_path / "data")
    moved = {}
    for clip in (0.0, 1e-9):
        cfg = tiny_config(data, tmp_path / f"run{clip}", stages="all:1", init_head="random", clip_grad=clip,
                          weight_decay=0.0, momentum=0.0)
        start = load_backbone("timm:test_efficientnet", "none").model.state_dict()
        finetune(cfg, progress=False)
        end = load_checkpoint(tmp_path / f"run{clip}" / "last.pt")["model"]
        moved[clip] = max(float((end[k].float() - start[k].float()).abs().max()) for k in start
                          if k.startswith("conv_stem") and k in end)
    assert moved[1e-9] < 1e-6 < moved[0.0]
    with pytest.raises(FinetuneError, match="clip_grad must be 0"):
        finetune(tiny_config(data, tmp_path / "bad", clip_grad=-1.0), progress=False)


def test_a_run_made_before_the_newer_settings_resumes_and_says_how(tmp_path):
    data = write_many(tmp_path / "data")
    # as such a run was made: the former augmentation, exact decoding, a random head
    cfg = tiny_config(data, tmp_path / "run", stages="head:1", decode="exact", init_head="random",
                      augment="standard")
    finetune(cfg, progress=False)
    last = tmp_path / "run" / "last.pt"
    ckpt = load_checkpoint(last)
    for key in ("augment", "clip_grad", "decode", "init_head"):
        del ckpt["recipe"][key]
    torch.save(ckpt, last)
    assert finetune(cfg, resume=True, progress=False).status == "up to date"
    with pytest.raises(FinetuneError, match="resume it with --decode exact --init-head random"):
        finetune(tiny_config(data, tmp_path / "run", stages="head:1"), resume=True, progress=False)

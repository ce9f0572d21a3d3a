"""The settings of a fine-tuning run, where it is written, and how its optimiser is built.

:class:`FinetuneConfig` holds every setting; :func:`recipe_settings` picks those a resumed run
must share with the one it continues; :func:`make_optimizer` and :func:`warmup_cosine` turn
them into the two learning rates (backbone, head) and their schedule within a stage.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn

from cnncodes.extractor.backbones.backbone import DEFAULT_MODEL
from cnncodes.extractor.files import dataset_name, slug

from cnncodes.pipelines.finetune.freezing import FinetuneError


@dataclass
class FinetuneConfig:
    """Every setting of a fine-tuning run; all but ``out``, ``device``, ``workers`` and
    ``prepared_dir`` are part of the recipe a resume must match."""

    data: str
    out: str
    model: str = DEFAULT_MODEL
    weights: str = "DEFAULT"
    stages: str = "head:2,all:3"
    lr: float = 1e-4
    head_lr_mult: float = 10.0
    optimizer: str = "adamw"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.5
    label_smoothing: float = 0.0
    batch_size: int = 32
    accumulate: int = 1
    val_fraction: float = 0.1
    patience: int = 3
    # batch norm while training (freezing.BN_MODES): `eval` keeps every layer's running statistics
    bn: str = "eval"
    from_scratch: bool = False
    seed: int = 0
    # how images are decoded (cnncodes.extractor.decoding): `reduced` (at the smallest scale the
    # resize needs) or `exact` (full size; the only path of runs made before this setting)
    decode: str = "reduced"
    # the new head's start (head_init.py): `probe` (the softmax probe of the training images'
    # penultimate codes: probe, then fine-tune) or `random` (the only start before this setting)
    init_head: str = "probe"
    # the training images' augmentation (data.AUGMENTS); `standard` is the only one before it
    augment: str = "light"
    # largest gradient norm per step (0: no clipping)
    clip_grad: float = 0.0
    # layer-wise learning-rate decay: each stage below the top trains at this multiple of the
    # rate of the stage above it (1: one rate for the whole backbone)
    lr_decay: float = 1.0
    # batch-level augmentation (epochs.MIXES): none, mixup, cutmix, or both (one per batch)
    mix: str = "none"
    # exponential moving average of the weights (0: off): validation and test score the average
    ema: float = 0.0
    # images decoded once (prepared.py): training copies at training resolution and evaluation
    # copies as the network sees them, in `prepared_dir`, read back every epoch
    prepare: bool = True
    precision: str = "auto"
    device: str = "auto"
    workers: int | None = None
    prepared_dir: str = "cache/prepared"


_NOT_RECIPE = {"data", "out", "device", "workers", "prepared_dir"}
# What the settings added since runs were first written did before they existed: a checkpoint
# whose recipe lacks one was made that way, and resumes as such.
# Defaults that changed (measured: docs/finetune.md): a run made with the former ones resumes
# only when they are asked for, and the refusal says which.
CHANGED_DEFAULTS = {"lr": 5e-3, "optimizer": "sgd", "bn": "frozen", "augment": "standard"}
FORMER_DEFAULTS = {"decode": "exact", "init_head": "random", "augment": "standard", "clip_grad": 0.0,
                   "lr_decay": 1.0, "mix": "none", "ema": 0.0, "prepare": False}


def recipe_settings(cfg: FinetuneConfig) -> dict:
    """The settings that decide a run's result (all but where it reads and writes, and which
    device and how many decoding workers it uses)."""
    return {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in _NOT_RECIPE}


def default_run_dir(data, model: str, from_scratch: bool = False) -> Path:
    """``runs/<data>-<model>``, with ``-scratch`` for a from-scratch run, made safe as a path
    component (``timm:resnet18`` -> ``timm-resnet18``)."""
    return Path("runs") / (f"{dataset_name(data)}-{slug(model)}" + ("-scratch" if from_scratch else ""))


def warmup_cosine(total: int, warmup: int):
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return factor


def make_optimizer(model: nn.Module, heads: tuple[str, ...], cfg: FinetuneConfig,
                   depth: dict[str, int] | None = None) -> torch.optim.Optimizer:
    """The trainable backbone at ``lr`` and the head at ``lr * head_lr_mult``. From scratch
    every parameter is new, so all train at the head's rate (as d2l's scratch baseline does:
    10x the fine-tuned backbone's rate).

    With ``lr_decay`` below 1 and ``depth`` (parameter name -> stage index, from
    :func:`~cnncodes.pipelines.finetune.freezing.depth_groups`), the backbone is one group per
    stage, the top one (``backbone``) at ``lr`` and each one below at ``lr_decay`` times the rate
    of the one above (``backbone-1``, ``backbone-2``, ...: layer-wise learning-rate decay, as
    BEiT's and ConvNeXt's fine-tuning recipes do per block)."""
    head_lr = cfg.lr * cfg.head_lr_mult
    body_lr = head_lr if cfg.from_scratch else cfg.lr
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and not any(n.startswith(h + ".")
                                                                                         for h in heads)]
    if not 0 < cfg.lr_decay <= 1:
        raise FinetuneError(f"--lr-decay must be in (0, 1], got {cfg.lr_decay!r}.")
    if named and depth and cfg.lr_decay < 1 and not cfg.from_scratch:
        by_depth: dict[int, list] = {}
        for n, p in named:
            by_depth.setdefault(depth.get(n, 0), []).append(p)
        top = max(by_depth)
        groups = [{"params": by_depth[d], "lr": body_lr * cfg.lr_decay ** (top - d),
                   "name": "backbone" if d == top else f"backbone-{top - d}"}
                  for d in sorted(by_depth, reverse=True)]
    else:
        groups = [{"params": [p for _, p in named], "lr": body_lr, "name": "backbone"}] if named else []
    groups.append({"params": [p for h in heads for p in model.get_submodule(h).parameters()], "lr": head_lr,
                   "name": "head"})
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=head_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=head_lr, weight_decay=cfg.weight_decay)
    raise FinetuneError(f"--optimizer must be sgd or adamw, not '{cfg.optimizer}'.")


def make_scheduler(opt: torch.optim.Optimizer, steps_per_epoch: int, epochs: int, cfg: FinetuneConfig):
    """A stage's schedule: ``warmup_epochs`` of linear warm-up (at most half the stage), then
    cosine decay to 0 at the stage's last step."""
    total = steps_per_epoch * epochs
    return torch.optim.lr_scheduler.LambdaLR(
        opt, warmup_cosine(total, min(round(cfg.warmup_epochs * steps_per_epoch), total // 2)))

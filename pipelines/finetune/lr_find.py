"""``cnncodes lr-find``: the learning-rate range test for one fine-tuning stage.

Smith ("Cyclical Learning Rates for Training Neural Networks", 2017) and fastai's ``lr_find``:
train a throwaway copy of the run for a hundred or so steps while the learning rate grows
exponentially from tiny to huge, watch the (smoothed) training loss, and read the rate off the
curve: where it falls fastest, or, as fastai's default ``valley`` does, two thirds of the way
down the longest stretch over which it keeps falling. The run is set up exactly as ``finetune``
would set it up (the head started from the probe, the stage's frozen layers, the optimiser and
its groups, ``--head-lr-mult`` and ``--lr-decay`` ratios kept, ``--mix`` and ``--clip-grad``
applied), so the rate it suggests is a ``--lr`` for that run. Nothing of the run is kept.

Reliable for CNNs; for transformers the curve is often flat then sudden (fastai and timm
practitioners report the suggestion as unreliable there): read the plot.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import time
from dataclasses import dataclass, field

import numpy as np
from torch import nn

from cnncodes.pipelines.finetune.config import FinetuneConfig, make_optimizer
from cnncodes.pipelines.finetune.freezing import FinetuneError, apply_stage, frozen_modules, set_train_mode
from cnncodes.pipelines.reports import plain_text_plot, pyplot

SMOOTHING = 0.98      # the loss's exponential moving average (bias-corrected), as fastai's
DIVERGED = 4.0        # stop once the smoothed loss is this many times its minimum


@dataclass
class LrFindResult:
    """The range test's curve and what it suggests for ``--lr``."""

    stage: str
    lrs: list[float]
    losses: list[float]            # smoothed
    raw_losses: list[float]
    suggestion: float              # fastai's valley
    steepest: float                # where the smoothed loss falls fastest
    minimum_tenth: float           # a tenth of the rate at the lowest loss
    stopped: str                   # "diverged" or "steps"
    seconds: float = 0.0
    files: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def valley(losses) -> int:
    """The index two thirds of the way down the longest decreasing run of ``losses`` (as a
    subsequence, not necessarily contiguous: fastai's ``valley`` suggestion)."""
    n = len(losses)
    if n < 3:
        return 0
    run = [1] * n
    end = 0
    for i in range(1, n):
        run[i] = 1 + max((run[j] for j in range(i) if losses[j] > losses[i]), default=0)
        if run[i] > run[end]:
            end = i
    start = end - run[end] + 1
    third = (end - start) / 3
    return min(n - 1, start + int(third) + int(third / 2))


def steepest(lrs, losses) -> int:
    """The index where the smoothed loss falls fastest against log(rate)."""
    if len(losses) < 3:
        return 0
    slope = np.gradient(np.asarray(losses), np.log(np.asarray(lrs)))
    return int(np.argmin(slope))


def lr_find(config: FinetuneConfig, start: str = "all", *, min_lr: float = 1e-7, max_lr: float = 1.0,
            steps: int = 100, progress: bool = True) -> LrFindResult:
    """Run the range test for the stage that trains ``start`` and everything after it."""
    from tqdm import tqdm

    from cnncodes.pipelines.finetune.epochs import batch_mixer
    from cnncodes.pipelines.finetune.training import _Dist, _Run
    if not 0 < min_lr < max_lr:
        raise FinetuneError(f"--min-lr must be below --max-lr and positive, got {min_lr} and {max_lr}.")
    if steps < 5:
        raise FinetuneError(f"--steps must be at least 5, got {steps}.")
    t0 = time.perf_counter()
    cfg = dataclasses.replace(config, stages=f"{start}:1", accumulate=1)  # a step per batch
    run = _Run(cfg, _Dist(), progress)
    run.head_init = run._start_head()
    run.model.to(run.dev, memory_format=run._memory_format)  # as finetune's
    train_ds, loader, _ = run._loaders()
    stage = run.stages[0]
    frozen = frozen_modules(run.model, run.probe, stage, run.head)
    apply_stage(run.model, frozen)
    opt = make_optimizer(run.model, run.head, cfg, run.depth)
    ratios = [g["lr"] / cfg.lr for g in opt.param_groups]  # the head's multiple, the decayed stages
    crit = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    scaler = run._scaler(None)  # fp16's loss scaling, as finetune; a no-op otherwise
    mixer = batch_mixer(cfg.mix, len(run.splits.classes))  # the run's batches, mixed as it would

    def batches():
        for epoch in itertools.count():
            train_ds.set_epoch(epoch)
            loader.sampler.set_epoch(epoch)
            yield from loader

    lrs, raw, smooth = [], [], []
    avg, best, stopped = 0.0, math.inf, "steps"
    bar = tqdm(total=steps, desc="lr-find", unit="step", leave=False, disable=None if progress else True)
    for i, (x, y, _, _) in enumerate(batches()):
        if i >= steps:
            break
        if x is None:
            continue
        lr = min_lr * (max_lr / min_lr) ** (len(lrs) / (steps - 1))
        for g, r in zip(opt.param_groups, ratios):
            g["lr"] = lr * r
        set_train_mode(run.model, frozen, cfg.bn)
        x, y = run._to_device(x, y)
        if mixer is not None:
            x, y = mixer(x, y)
        opt.zero_grad(set_to_none=True)
        _, loss = run._backward(run.model, x, y, crit, scaler, contextlib.nullcontext())  # finetune's step
        if cfg.clip_grad:
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.clip_grad)
        scaler.step(opt)
        scaler.update()
        value = float(loss.detach())
        avg = SMOOTHING * avg + (1 - SMOOTHING) * value
        smoothed = avg / (1 - SMOOTHING ** (len(lrs) + 1))
        lrs.append(lr)
        raw.append(value)
        smooth.append(smoothed)
        best = min(best, smoothed)
        bar.update(1)
        if not math.isfinite(smoothed) or smoothed > DIVERGED * best:
            stopped = "diverged"
            break
    bar.close()
    if len(lrs) < 3:
        raise FinetuneError("the range test took fewer than 3 steps: give it more training images.")
    lowest = int(np.nanargmin(smooth))
    return LrFindResult(stage=start, lrs=lrs, losses=smooth, raw_losses=raw,
                        suggestion=lrs[valley(smooth[:lowest + 1] if lowest >= 2 else smooth)],
                        steepest=lrs[steepest(lrs, smooth)], minimum_tenth=lrs[lowest] / 10,
                        stopped=stopped, seconds=round(time.perf_counter() - t0, 2))


@plain_text_plot
def plot_lr_find(result: LrFindResult, path) -> None:
    """The smoothed loss against the rate (log scale), with the suggestions marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    ax.plot(result.lrs, result.raw_losses, color="0.8", lw=1, label="loss")
    ax.plot(result.lrs, result.losses, color="C0", lw=2, label="smoothed")
    for value, name, color in ((result.suggestion, "valley", "C3"), (result.steepest, "steepest", "C2"),
                               (result.minimum_tenth, "minimum / 10", "C1")):
        ax.axvline(value, color=color, ls="--", lw=1, label=f"{name}: {value:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (--lr)")
    ax.set_ylabel("training loss")
    ax.set_title(f"lr-find, stage {result.stage}")
    top = float(np.nanmax(result.losses[: max(3, len(result.losses) // 2)])) * 1.5
    if math.isfinite(top):
        ax.set_ylim(top=top)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


__all__ = ["LrFindResult", "lr_find", "plot_lr_find", "steepest", "valley"]

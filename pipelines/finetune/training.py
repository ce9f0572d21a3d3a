"""Staged fine-tuning: a new head, freeze/unfreeze stages, discriminative learning rates,
early stopping, exact resume and DistributedDataParallel.

The recipe is the seeds' (d2l.ai's hot-dog chapter, CS231n's transfer-learning notes): replace
the classifier with one sized to the data's classes, train it alone, then unfreeze more of the
network from the top down with a small learning rate while the new head learns 10x faster.

A run (:class:`_Run`) goes: start or resume (:meth:`_Run._start_state`, :meth:`_Run._resume`),
then per stage :meth:`_Run._setup_stage` and :meth:`_Run._epoch` until :meth:`_Run._stage_ends`,
each epoch checkpointed (:meth:`_Run._save`), and finally the best epoch's weights scored
(:meth:`_Run._finish`). The passes themselves are in :mod:`.epochs`, the settings in
:mod:`.config`.

Examples
--------
>>> cfg = FinetuneConfig("data/digits", "runs/digits", stages="head:2,stage5:2,all:2")  # doctest: +SKIP
>>> result = finetune(cfg)                                                                # doctest: +SKIP
>>> result.test_accuracy                                                                  # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from cnncodes.extractor.backbones.loading import load_backbone
from cnncodes.extractor.batching import tune_cpu_allocator
from cnncodes.extractor.decoding import decode_min_size, requested_decode, resolve_decode
from cnncodes.extractor.devices import resolve_device, resolve_precision
from cnncodes.extractor.layers import Probe
from cnncodes.extractor.provenance import library_versions

from cnncodes.pipelines.finetune.checkpoints import (
    RUN_FILES,
    Progress,
    checkpoint_to_resume,
    clear_run,
    load_checkpoint,
    remove_stale_temporaries,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from cnncodes.pipelines.finetune.config import (
    FinetuneConfig,
    default_run_dir,
    make_optimizer,
    make_scheduler,
    recipe_settings,
    warmup_cosine,
)
from cnncodes.pipelines.finetune.data import (
    AUGMENTS,
    ImageDataset,
    make_loader,
    make_splits,
    train_min_size,
    train_transform,
)
from cnncodes.pipelines.finetune.epochs import (
    MIXES,
    Dist,
    Passes,
    epoch_line,
    init_distributed,
    rank_digests,
    state_digest,
)
from cnncodes.pipelines.finetune.freezing import (
    FinetuneError,
    Stage,
    apply_stage,
    depth_groups,
    frozen_modules,
    parse_stages,
    replace_head,
    resolve_stages,
)
from cnncodes.pipelines.finetune.head_init import INIT_HEADS, HeadInit, apply_head, fit_probe_head
from cnncodes.pipelines.finetune.prepared import make_stores, store_exclude
from cnncodes.pipelines.finetune.report import write_finetune_report
from cnncodes.pipelines.finetune.result import FinetuneResult, stage_summary

# Also importable from here, where they lived before config.py, epochs.py and result.py.
__all__ = ["RUN_FILES", "FinetuneConfig", "FinetuneResult", "default_run_dir", "finetune", "make_optimizer",
           "recipe_settings", "state_digest", "warmup_cosine"]
_Dist = Dist

log = logging.getLogger(__name__)


@dataclass
class _StageRun:
    """One stage, set up for its epochs."""

    stage: Stage
    frozen: set
    trainable: int
    net: nn.Module  # the model, or its DDP wrapper
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    bad: int = 0  # epochs in a row without a new best val accuracy


def default_workers(dev: torch.device) -> int:
    """Decoding worker processes when ``--workers`` is not given: none on a CPU, where the cores
    are the training step's (2 workers beside its threads made Lite0's epochs 1.5-3x slower on 2
    cores, most of it the kernel's time: processes fighting the step's threads and batches
    copied through shared memory), and ``min(4, cores)`` beside an accelerator."""
    return 0 if dev.type == "cpu" else min(4, os.cpu_count() or 1)


class _Run(Passes):
    """One fine-tuning run; ``finetune`` is its public face."""

    def __init__(self, cfg: FinetuneConfig, ctx: Dist, progress: bool):
        if requested_decode(cfg.decode) == "gpu":  # `cpu` is `exact`; `auto` resolves with the backbone
            raise FinetuneError("fine-tuning decodes with Pillow: decode must be reduced or exact, not gpu.")
        if cfg.from_scratch and cfg.bn != "train":  # a random network's statistics mean nothing
            cfg = dataclasses.replace(cfg, bn="train")
        if cfg.init_head not in INIT_HEADS:
            raise FinetuneError(f"init_head must be one of {', '.join(INIT_HEADS)}, got {cfg.init_head!r}.")
        if cfg.augment not in AUGMENTS:
            raise FinetuneError(f"augment must be one of {', '.join(AUGMENTS)}, got {cfg.augment!r}.")
        if not 0 <= cfg.ema < 1:
            raise FinetuneError(f"ema must be 0 (off) or a decay in (0, 1), got {cfg.ema!r}.")
        if cfg.mix not in MIXES:
            raise FinetuneError(f"mix must be one of {', '.join(MIXES)}, got {cfg.mix!r}.")
        if not cfg.clip_grad >= 0:
            raise FinetuneError(f"clip_grad must be 0 (off) or a positive norm, got {cfg.clip_grad!r}.")
        self.cfg, self.ctx, self.progress = cfg, ctx, progress
        self.out = Path(cfg.out)
        self.dev = resolve_device(cfg.device)
        if self.dev.type == "cuda" and ctx.world > 1:
            self.dev = torch.device("cuda", ctx.local_rank)
            torch.cuda.set_device(self.dev)
        self.prec = resolve_precision(cfg.precision, self.dev)
        self.splits = make_splits(cfg.data, cfg.val_fraction, cfg.seed,
                                  exclude=store_exclude(cfg) if cfg.prepare else None)
        torch.manual_seed(cfg.seed)  # random initialisation (from scratch) and the new head
        self.bb = load_backbone(cfg.model, "none" if cfg.from_scratch else cfg.weights, seed=cfg.seed)
        # `auto` is the backbone's default (exact for hf: and openclip: models)
        self.cfg = cfg = dataclasses.replace(cfg, decode=resolve_decode(cfg.decode, None, self.bb.decode))
        self.probe = Probe(self.bb.model, self.bb.input_size, cfg.model)
        self.stages = resolve_stages(self.probe, parse_stages(cfg.stages))
        self.model = self.bb.model
        self.head = replace_head(self.model, self.probe, len(self.splits.classes))
        self.depth = depth_groups(self.model, self.probe) if cfg.lr_decay < 1 else None
        self.recipe = self._recipe()
        self.workers = cfg.workers if cfg.workers is not None else default_workers(self.dev)
        if self.dev.type == "cpu":
            tune_cpu_allocator(heap_only=True)

    def _recipe(self) -> dict:
        r = recipe_settings(self.cfg)
        r.update({"weights": self.bb.weights, "classes": self.splits.classes,
                  "data_fingerprint": self.splits.table.fingerprint(), "world_size": self.ctx.world,
                  "stages": [s.as_dict() for s in self.stages], "head": ",".join(self.head),
                  "splits": self.splits.sizes()})
        if next(self.model.parameters(recurse=False), None) is not None:
            # a ViT's class token and positional embeddings: frozen with its first module since
            # token models arrived (they always trained before), so older runs are not resumed
            r["root_parameters"] = "frozen with the first module"
        return r

    # --- files ---------------------------------------------------------------------------------
    def _start_state(self, resume: bool, overwrite: bool) -> dict | None:
        """The checkpoint to resume from, or None after clearing the folder for a new run."""
        if self.ctx.main:
            remove_stale_temporaries(self.out)
        ckpt = checkpoint_to_resume(self.out, self.recipe, resume=resume, overwrite=overwrite)
        if ckpt is None:
            if self.ctx.main:
                clear_run(self.out)
            self._barrier()
        return ckpt

    def _barrier(self):
        if self.ctx.world > 1:
            torch.distributed.barrier()

    def _save(self, state: dict, improved: bool) -> None:
        """``best.pt`` on a new best, then ``last.pt`` every epoch; both atomically. In that order:
        a kill between the two leaves a ``last.pt`` whose best epoch has its ``best.pt``."""
        if not self.ctx.main:
            return
        if improved:  # the weights validation scored: the average under --ema
            best = state if self.ema is None else {**state, "model": self.ema.module.state_dict()}
            save_checkpoint(best, self.out / "best.pt")
        save_checkpoint(state, self.out / "last.pt")

    def _write_metrics(self, history: list[dict], mode: str = "w") -> None:
        """``w``: the whole history (on resume: drops lines of epochs the checkpoint lacks);
        ``a``: append the newest epoch."""
        if self.ctx.main:
            with open(self.out / "metrics.jsonl", mode) as f:
                f.writelines(json.dumps(h) + "\n" for h in history)

    # --- start ---------------------------------------------------------------------------------
    def _loaders(self):
        cfg, ctx, pin = self.cfg, self.ctx, self.dev.type == "cuda"
        size = decode_min_size(cfg.decode, self.bb.preprocessing)
        train_store, eval_store = self._prepared()
        train_ds = ImageDataset(self.splits.table, self.splits.train,
                                train_transform(self.bb.preprocessing, cfg.augment), seed=cfg.seed,
                                min_size=train_min_size(cfg.decode, self.bb.preprocessing, cfg.augment),
                                store=train_store)
        kw = dict(rank=ctx.rank, world=ctx.world, workers=self.workers, pin_memory=pin, seed=cfg.seed)
        train = make_loader(train_ds, cfg.batch_size, shuffle=True, **kw)
        evals = {part: make_loader(ImageDataset(self.splits.table, rows, self.bb.split or self.bb.transform,
                                                min_size=size, store=eval_store),
                                   cfg.batch_size, shuffle=False, **kw)
                 for part, rows in (("val", self.splits.val), ("test", self.splits.test)) if len(rows)}
        return train_ds, train, evals

    def _prepared(self):
        """``--prepare``: the stores of training and evaluation copies, filled by rank 0 (one
        pass over the images the first time, a ``stat`` per file after), or (None, None)."""
        if not self.cfg.prepare:
            return None, None
        train, evals = make_stores(self.cfg, self.bb, self.splits.table)
        eval_rows = np.concatenate([self.splits.val, self.splits.test])

        def fill():
            return (train.prepare(self.splits.train, progress=self.progress),
                    evals.prepare(eval_rows, progress=self.progress) if evals else {})
        train.shas, eval_shas = self.ctx.decide(fill, "preparing images")
        if evals:
            evals.shas = eval_shas
        return train, evals

    def _resume(self, ckpt: dict | None) -> Progress:
        """A new run's progress, or the checkpoint's: weights, history, best, position, RNG."""
        if ckpt is None:
            return Progress()
        self.model.load_state_dict(ckpt["model"])
        p = Progress.from_checkpoint(ckpt)
        if ckpt.get("extended") and p.stage_i >= len(self.stages):
            # a finished run with more epochs of its last stage: back into that stage, after the
            # epochs it ran (fewer than planned when --patience ended it), its schedule stretched
            # to the new length from where it stands (not bitwise a run planned that long)
            last = self.stages[-1].name
            p.stage_i, p.stage_ep = len(self.stages) - 1, sum(h["stage"] == last for h in p.history)
        set_rng_state(ckpt["rng"])
        self._write_metrics(p.history)
        return p

    def _start_head(self) -> dict:
        """A new run's head: the softmax probe of the training images' codes (``init_head``
        ``probe``, the default; :mod:`.head_init`), else as ``replace_head`` left it (random).
        Rank 0 fits the probe, every rank starts from its weights."""
        cfg = self.cfg
        why = ("asked for" if cfg.init_head == "random" else "from scratch" if cfg.from_scratch
               else f"{len(self.head)} heads" if len(self.head) != 1 else "")
        module = self.model.get_submodule(self.head[0])
        if not why and not isinstance(module, nn.Linear):
            why = f"the head is a {type(module).__name__}, not a Linear layer"
        if why:
            return HeadInit("random", why=why).as_dict()
        init = self.ctx.decide(lambda: fit_probe_head(
            cfg.model, cfg.weights, self.splits.table, self.splits.train, len(self.splits.classes),
            decode=cfg.decode, seed=cfg.seed, device=cfg.device, val_rows=self.splits.val,
            batch_size=cfg.batch_size),
            "fitting the probe that starts the head")
        apply_head(module, init)
        return init.as_dict()

    def _ema(self, ckpt: dict | None):
        """``--ema D``: torch's AveragedModel keeping ``D * average + (1 - D) * weights`` after
        every optimiser step (batch-norm statistics averaged too), restored from the checkpoint
        when resuming; None without ``--ema``."""
        if not self.cfg.ema:
            return None
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
        ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(self.cfg.ema), use_buffers=True)
        if ckpt is not None and ckpt.get("ema") is not None:
            ema.load_state_dict(ckpt["ema"])
        return ema

    def _scaler(self, ckpt: dict | None):
        scaler = torch.amp.GradScaler("cuda", enabled=self.prec == "fp16")
        if ckpt is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        return scaler

    # --- stages and epochs ---------------------------------------------------------------------
    def run(self, resume: bool = False, overwrite: bool = False) -> FinetuneResult:
        ckpt = self._start_state(resume, overwrite)
        t0 = time.perf_counter()
        p = self._resume(ckpt)
        self.head_init = self._start_head() if ckpt is None else ckpt.get("head_init") or \
            HeadInit("random", why="a run made before --init-head").as_dict()
        self.model.to(self.dev, memory_format=self._memory_format)
        self.ema = self._ema(ckpt)
        loaders = self._loaders()
        scaler = self._scaler(ckpt)
        status = "up to date" if p.stage_i >= len(self.stages) else \
            ("extended" if ckpt and ckpt.get("extended") else "resumed" if ckpt else "trained")
        while p.stage_i < len(self.stages):
            st = self._setup_stage(p, loaders[1])
            stage_over = False
            while not stage_over:
                stage_over = self._epoch(p, st, loaders, scaler)
        return self._finish(p.history, p.best, loaders[2], status, time.perf_counter() - t0)

    def _setup_stage(self, p: Progress, train_loader) -> _StageRun:
        """Freeze what stage ``p.stage_i`` keeps fixed; a fresh optimiser and schedule (those of
        the checkpoint when resuming inside the stage); DDP wraps the model per stage, since
        which parameters train changes."""
        stage = self.stages[p.stage_i]
        frozen = frozen_modules(self.model, self.probe, stage, self.head)
        trainable = apply_stage(self.model, frozen)
        net = self.model
        if self.ctx.world > 1:
            net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.dev.index] if self.dev.type == "cuda" else None)
        opt = make_optimizer(self.model, self.head, self.cfg, self.depth)
        steps_per_epoch = math.ceil(len(train_loader) / self.cfg.accumulate)
        sched = make_scheduler(opt, steps_per_epoch, stage.epochs, self.cfg)
        if p.ckpt is not None and p.stage_ep > 0:
            opt.load_state_dict(p.ckpt["optimizer"])
            sched.load_state_dict(p.ckpt["scheduler"])
        p.ckpt = None
        bad = 0 if p.stage_ep == 0 else p.best.get("bad", 0)
        return _StageRun(stage, frozen, trainable, net, opt, sched, bad)

    def _epoch(self, p: Progress, st: _StageRun, loaders, scaler) -> bool:
        """One epoch of the stage with its bookkeeping: train, validate, record, checkpoint,
        report. Returns whether the stage has ended."""
        train_ds, train_loader, evals = loaders
        epoch, stage = len(p.history), st.stage
        train_ds.set_epoch(epoch)
        train_loader.sampler.set_epoch(epoch)
        lrs = {g["name"]: g["lr"] for g in st.opt.param_groups}
        t_ep = time.perf_counter()
        tr = self.train_epoch(st.net, train_loader, st.opt, st.sched, scaler, st.frozen,
                              f"{stage.name} {p.stage_ep + 1}/{stage.epochs}")
        train_s = time.perf_counter() - t_ep
        va = self.evaluate(evals["val"])
        improved = self._update_best(p, st, va["accuracy"], epoch)
        p.stage_ep += 1
        stop = self._stage_ends(p, st)
        p.history.append({"epoch": epoch, "stage": stage.name, "stage_epoch": p.stage_ep,
                          "train_loss": tr["loss"], "train_accuracy": tr["accuracy"],
                          "val_loss": va["loss"], "val_accuracy": va["accuracy"], "lr": lrs,
                          "trainable_params": st.trainable, "train_seconds": round(train_s, 3),
                          "seconds": round(time.perf_counter() - t_ep, 3),
                          "failed_images": sorted(set(tr["failed"]) | set(va["failed"])),
                          "early_stop": bool(stop and p.stage_ep < stage.epochs)})
        if stop:
            p.stage_i, p.stage_ep = p.stage_i + 1, 0
        self._save(self._checkpoint(p, st, scaler, epoch), improved)
        self._write_metrics(p.history[-1:], "a")
        self._report_epoch(p.history[-1], stage, tr, va, improved)
        self._barrier()
        return stop

    def _update_best(self, p: Progress, st: _StageRun, accuracy: float, epoch: int) -> bool:
        """Whether ``accuracy`` is a new best val accuracy; counts the epochs without one."""
        improved = accuracy > p.best["accuracy"]
        st.bad = 0 if improved else st.bad + 1
        if improved:
            p.best = {"accuracy": accuracy, "epoch": epoch}
        p.best["bad"] = st.bad  # saved with the best, so a resume inside the stage goes on counting
        return improved

    def _stage_ends(self, p: Progress, st: _StageRun) -> bool:
        """The early-stop rule: a stage ends after its epochs, or after ``patience`` epochs in a
        row without a new best val accuracy (``patience`` 0: only after its epochs)."""
        return p.stage_ep >= st.stage.epochs or bool(self.cfg.patience and st.bad >= self.cfg.patience)

    def _checkpoint(self, p: Progress, st: _StageRun, scaler, epoch: int) -> dict:
        """All an exact resume needs, after ``epoch``: weights, optimiser, schedule, loss scale,
        where to go on, the best so far, the history, every RNG and the recipe."""
        return {"model": self.model.state_dict(), "optimizer": st.opt.state_dict(),
                "scheduler": st.sched.state_dict(), "scaler": scaler.state_dict(),
                "epoch": epoch + 1, "stage": st.stage.name, "frozen": sorted(st.frozen),
                "next_stage": p.stage_i, "next_stage_epoch": p.stage_ep, "best": p.best,
                "history": p.history, "rng": rng_state(), "recipe": self.recipe,
                "head_init": self.head_init, "ema": None if self.ema is None else self.ema.state_dict()}

    def _report_epoch(self, h: dict, stage: Stage, tr: dict, va: dict, improved: bool) -> None:
        if not self.ctx.main:
            return
        if self.progress:
            tqdm.write(epoch_line(h, stage, tr, va, improved), file=sys.stderr)
        else:
            log.info(epoch_line(h, stage, tr, va, improved))

    # --- end -----------------------------------------------------------------------------------
    def _finish(self, history, best, evals, status, seconds) -> FinetuneResult:
        """Score the best epoch's weights on test (val without a test split); write the report."""
        digests = rank_digests(self.model, self.ctx)
        self.eval_model().load_state_dict(load_checkpoint(self.out / "best.pt")["model"])
        part = "test" if "test" in evals else "val"
        ev = self.evaluate(evals[part], keep=True)
        truth = [int(self.splits.table.labels[r]) for r in ev["rows"]]
        paths = self.splits.table.paths
        failed = {paths[r] for h in history for r in h["failed_images"]} | {paths[r] for r in ev["failed"]}
        result = FinetuneResult(
            run_dir=str(self.out), status=status, model=self.cfg.model, from_scratch=self.cfg.from_scratch,
            evaluated_on=part, accuracy=ev["accuracy"], best_epoch=best["epoch"],
            best_val_accuracy=best["accuracy"], epochs_run=len(history), seconds=round(seconds, 2),
            train_seconds=round(sum(h["train_seconds"] for h in history), 2),
            seconds_per_epoch=round(sum(h["seconds"] for h in history) / max(1, len(history)), 2),
            stages=stage_summary(self.stages, history), images=self.splits.sizes(),
            failed_images=sorted(failed), device=str(self.dev), precision=self.prec,
            world_size=self.ctx.world, rank_digests=digests, recipe=self.recipe,
            versions=library_versions(), classes=list(self.splits.classes), head_init=self.head_init)
        if self.ctx.main:
            write_finetune_report(result, history, truth, ev["preds"], self.out)
        self._barrier()
        if not result.ranks_agree:
            raise FinetuneError(f"DDP ranks ended with different weights: {digests}")
        return result


def finetune(config: FinetuneConfig, *, resume: bool = False, overwrite: bool = False,
             progress: bool = True) -> FinetuneResult:
    """Fine-tune ``config.model`` on ``config.data`` into ``config.out``; returns the summary
    whose :meth:`~FinetuneResult.as_dict` is also written to ``result.json``.

    An existing run in ``config.out`` is refused unless ``resume`` (continue it; its recipe must
    match) or ``overwrite`` (start again); both together resume a matching run and restart any
    other.

    Under ``torchrun`` (WORLD_SIZE > 1) every rank calls this; the model is wrapped in
    DistributedDataParallel per stage, rank 0 writes the files, and the summary records a digest
    of every rank's final weights.
    """
    ctx = init_distributed(config.device)
    try:
        return _Run(config, ctx, progress).run(resume=resume, overwrite=overwrite)
    finally:
        if ctx.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

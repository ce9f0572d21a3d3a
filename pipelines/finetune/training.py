"""Staged fine-tuning: a new head, freeze/unfreeze stages, discriminative learning rates,
early stopping, exact resume and DistributedDataParallel.

The recipe is the seeds' (d2l.ai's hot-dog chapter, CS231n's transfer-learning notes): replace
the classifier with one sized to the data's classes, train it alone, then unfreeze more of the
network from the top down with a small learning rate while the new head learns 10x faster.

Examples
--------
>>> cfg = FinetuneConfig("data/digits", "runs/digits", stages="head:2,stage5:2,all:2")  # doctest: +SKIP
>>> result = finetune(cfg)                                                                # doctest: +SKIP
>>> result["test_accuracy"]                                                               # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from cnncodes.extractor.backbones import DEFAULT_MODEL, load_backbone
from cnncodes.extractor.devices import autocast, resolve_device, resolve_precision
from cnncodes.extractor.provenance import library_versions
from cnncodes.extractor.layers import Probe

from cnncodes.pipelines.finetune.checkpoints import load_checkpoint, recipe_differences, rng_state, save_checkpoint, set_rng_state
from cnncodes.pipelines.finetune.data import ImageDataset, make_loader, make_splits, train_transform
from cnncodes.pipelines.finetune.report import write_finetune_report
from cnncodes.pipelines.finetune.freezing import (FinetuneError, apply_stage, frozen_modules, parse_stages, replace_head,
                       resolve_stages, set_train_mode)

log = logging.getLogger(__name__)
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "result.json", "curves.png", "confusion.png")


@dataclass
class FinetuneConfig:
    """Every setting of a fine-tuning run; all but ``out``, ``device`` and ``workers`` are part
    of the recipe a resume must match."""

    data: str
    out: str
    model: str = DEFAULT_MODEL
    weights: str = "DEFAULT"
    stages: str = "head:2,all:3"
    lr: float = 5e-3
    head_lr_mult: float = 10.0
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.5
    label_smoothing: float = 0.0
    batch_size: int = 32
    accumulate: int = 1
    val_fraction: float = 0.1
    patience: int = 3
    bn: str = "frozen"
    from_scratch: bool = False
    seed: int = 0
    precision: str = "auto"
    device: str = "auto"
    workers: int | None = None


_NOT_RECIPE = {"data", "out", "device", "workers"}


def recipe_settings(cfg: FinetuneConfig) -> dict:
    """The settings that decide a run's result (all but where it reads and writes, and which
    device and how many decoding workers it uses)."""
    return {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in _NOT_RECIPE}


def default_run_dir(data, model: str, from_scratch: bool = False) -> Path:
    """``runs/<data>-<model>``, with ``-scratch`` for a from-scratch run."""
    return Path("runs") / (f"{Path(data).name}-{model.replace(':', '-')}" + ("-scratch" if from_scratch else ""))


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device: str) -> _Dist:
    """torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; gloo on CPU, NCCL on GPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    import torch.distributed as dist
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
        # NCCL for the CUDA tensors (gradients, buffers), gloo for the small CPU ones (sums,
        # flags, objects): NCCL alone refuses CPU tensors.
        dist.init_process_group("cpu:gloo,cuda:nccl" if use_cuda else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def warmup_cosine(total: int, warmup: int):
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return factor


def make_optimizer(model: nn.Module, head: str, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    """Two parameter groups: the trainable backbone at ``lr`` and the head at ``lr *
    head_lr_mult``. From scratch every parameter is new, so all train at the head's rate (as
    d2l's scratch baseline does: 10x the fine-tuned backbone's rate)."""
    head_lr = cfg.lr * cfg.head_lr_mult
    body_lr = head_lr if cfg.from_scratch else cfg.lr
    body = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith(head + ".")]
    groups = [{"params": body, "lr": body_lr, "name": "backbone"}] if body else []
    groups.append({"params": list(model.get_submodule(head).parameters()), "lr": head_lr, "name": "head"})
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=head_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=head_lr, weight_decay=cfg.weight_decay)
    raise FinetuneError(f"--optimizer must be sgd or adamw, not '{cfg.optimizer}'.")


def state_digest(model: nn.Module) -> str:
    """sha256 over every parameter and buffer, to show DDP ranks agree bit for bit."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _logits(out):
    if isinstance(out, torch.Tensor):
        return out
    return getattr(out, "logits", None) if not isinstance(out, (tuple, list)) else out[0]


class _Run:
    """One fine-tuning run; ``finetune`` is its public face."""

    def __init__(self, cfg: FinetuneConfig, ctx: _Dist, progress: bool):
        self.cfg, self.ctx, self.progress = cfg, ctx, progress
        self.out = Path(cfg.out)
        self.dev = resolve_device(cfg.device)
        if self.dev.type == "cuda" and ctx.world > 1:
            self.dev = torch.device("cuda", ctx.local_rank)
            torch.cuda.set_device(self.dev)
        self.prec = resolve_precision(cfg.precision, self.dev)
        self.splits = make_splits(cfg.data, cfg.val_fraction, cfg.seed)
        torch.manual_seed(cfg.seed)  # random initialisation (from scratch) and the new head
        self.bb = load_backbone(cfg.model, "none" if cfg.from_scratch else cfg.weights)
        self.probe = Probe(self.bb.model, self.bb.input_size, cfg.model)
        self.stages = resolve_stages(self.probe, parse_stages(cfg.stages))
        self.model = self.bb.model
        self.head = replace_head(self.model, self.probe, len(self.splits.classes))
        self.recipe = self._recipe()
        self.workers = cfg.workers if cfg.workers is not None else min(4, os.cpu_count() or 1)

    def _recipe(self) -> dict:
        r = recipe_settings(self.cfg)
        r.update({"weights": self.bb.weights, "classes": self.splits.classes,
                  "data_fingerprint": self.splits.table.fingerprint(), "world_size": self.ctx.world,
                  "stages": [s.as_dict() for s in self.stages], "head": self.head,
                  "splits": self.splits.sizes()})
        return r

    # --- files ---------------------------------------------------------------------------------
    def _start_state(self, resume: bool, overwrite: bool) -> dict | None:
        last = self.out / "last.pt"
        if last.exists() and resume:
            ckpt = load_checkpoint(last)
            diffs = recipe_differences(ckpt["recipe"], self.recipe)
            if not diffs:
                return ckpt
            if not overwrite:
                raise FinetuneError(f"cannot resume {self.out}: it was made by a different recipe: "
                                    f"{'; '.join(diffs)}. Use another --out, or --overwrite to start again.")
            log.info("%s was made by another recipe (%s): starting again", self.out, "; ".join(diffs))
        elif last.exists() and not overwrite:
            raise FinetuneError(f"{self.out} already holds a run; pass --resume to continue it or "
                                f"--overwrite to start again.")
        elif resume:
            log.info("nothing to resume in %s: starting a new run", self.out)
        if self.ctx.main:
            self.out.mkdir(parents=True, exist_ok=True)
            for name in RUN_FILES:
                (self.out / name).unlink(missing_ok=True)
        self._barrier()
        return None

    def _barrier(self):
        if self.ctx.world > 1:
            torch.distributed.barrier()

    def _save(self, state: dict, improved: bool) -> None:
        if not self.ctx.main:
            return
        save_checkpoint(state, self.out / "last.pt")
        if improved:
            shutil.copyfile(self.out / "last.pt", self.out / "best.pt.tmp")
            os.replace(self.out / "best.pt.tmp", self.out / "best.pt")

    def _write_metrics(self, history: list[dict], mode: str = "w") -> None:
        """``w``: the whole history (on resume: drops lines of epochs the checkpoint lacks);
        ``a``: append the newest epoch."""
        if self.ctx.main:
            with open(self.out / "metrics.jsonl", mode) as f:
                f.writelines(json.dumps(h) + "\n" for h in history)

    # --- training ------------------------------------------------------------------------------
    @property
    def _memory_format(self):
        return torch.channels_last if self.dev.type == "cuda" else torch.contiguous_format

    def _autocast(self):
        if self.prec == "fp32":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=torch.bfloat16 if self.prec == "bf16" else torch.float16)

    def _to_device(self, x, y):
        return (x.to(self.dev, non_blocking=True, memory_format=self._memory_format),
                y.to(self.dev, non_blocking=True))

    def _loaders(self):
        cfg, ctx, pin = self.cfg, self.ctx, self.dev.type == "cuda"
        train_ds = ImageDataset(self.splits.table, self.splits.train, train_transform(self.bb.preprocessing),
                                seed=cfg.seed)
        kw = dict(rank=ctx.rank, world=ctx.world, workers=self.workers, pin_memory=pin, seed=cfg.seed)
        train = make_loader(train_ds, cfg.batch_size, shuffle=True, **kw)
        evals = {part: make_loader(ImageDataset(self.splits.table, rows, self.bb.split or self.bb.transform), cfg.batch_size,
                                   shuffle=False, **kw)
                 for part, rows in (("val", self.splits.val), ("test", self.splits.test)) if len(rows)}
        return train_ds, train, evals

    def evaluate(self, loader, keep: bool = False) -> dict:
        """Loss and accuracy over a split, summed over the ranks' shares; with ``keep``, the
        table rows and predictions of every image (gathered from all ranks).

        The plain model, not the DDP wrapper, runs here: DDP's forward broadcasts buffers, a
        collective the ranks would have to call equally often, and their shares may differ by
        a batch."""
        self.model.eval()
        loss_sum, correct, n, rows, preds, failed = 0.0, 0, 0, [], [], []
        crit = nn.CrossEntropyLoss(reduction="sum")
        with torch.inference_mode():
            for x, y, batch_rows, bad in loader:
                failed += bad
                if x is None:
                    continue
                x, y = self._to_device(x, y)
                with self._autocast():
                    logits = _logits(self.model(x)).float()
                loss_sum += float(crit(logits, y))
                p = logits.argmax(1)
                correct += int((p == y).sum())
                n += len(y)
                if keep:
                    rows += batch_rows
                    preds += p.cpu().tolist()
        totals = torch.tensor([loss_sum, correct, n], dtype=torch.float64)
        if self.ctx.world > 1:
            import torch.distributed as dist
            dist.all_reduce(totals)
            gathered = [None] * self.ctx.world
            dist.all_gather_object(gathered, (rows, preds, failed))
            rows, preds, failed = ([x for g in gathered for x in g[k]] for k in range(3))
        loss_sum, correct, n = totals.tolist()
        return {"loss": loss_sum / max(n, 1), "accuracy": correct / max(n, 1), "n": int(n),
                "rows": rows, "preds": preds, "failed": failed}

    def _all_skip(self, empty: bool) -> bool:
        """Whether this training batch is skipped: on every rank as soon as one has nothing in
        it (every image failed to decode), since DDP's backward is a collective that all ranks
        must join. Gradients kept without a step carry over to the next step, on all ranks."""
        if self.ctx.world == 1:
            return empty
        import torch.distributed as dist
        flag = torch.tensor([1.0 if empty else 0.0])
        dist.all_reduce(flag)
        return bool(flag.item())

    def train_epoch(self, net, loader, opt, sched, scaler, frozen, epoch_label: str) -> dict:
        cfg = self.cfg
        set_train_mode(self.model, frozen, cfg.bn)
        crit = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        loss_sum, correct, n, failed = 0.0, 0, 0, []
        batches = tqdm(loader, desc=epoch_label, unit="batch", leave=False,
                       disable=None if self.progress and self.ctx.main else True)
        opt.zero_grad(set_to_none=True)
        for i, (x, y, _, bad) in enumerate(batches):
            failed += bad
            if self._all_skip(x is None):
                continue
            x, y = self._to_device(x, y)
            step_now = (i + 1) % cfg.accumulate == 0 or i + 1 == len(loader)
            sync = net.no_sync() if self.ctx.world > 1 and not step_now else contextlib.nullcontext()
            try:
                with sync:
                    with self._autocast():
                        logits = _logits(net(x))
                        loss = crit(logits.float(), y)
                    scaler.scale(loss / cfg.accumulate).backward()
            except torch.cuda.OutOfMemoryError:
                raise FinetuneError(
                    f"{self.dev} ran out of memory at --batch-size {cfg.batch_size}: try --batch-size "
                    f"{max(1, cfg.batch_size // 2)} --accumulate {cfg.accumulate * 2} (the same effective "
                    f"batch){', or --precision bf16' if self.prec == 'fp32' else ''}.") from None
            if step_now:
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
                sched.step()
            loss_sum += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            n += len(y)
            batches.set_postfix(loss=f"{loss_sum / n:.3f}", acc=f"{correct / n:.3f}")
        totals = torch.tensor([loss_sum, correct, n], dtype=torch.float64)
        if self.ctx.world > 1:
            import torch.distributed as dist
            dist.all_reduce(totals)
            # DDP averages gradients, not batch-norm statistics: take rank 0's so every rank
            # evaluates and saves the same network.
            for b in self.model.buffers():
                dist.broadcast(b, 0)
        loss_sum, correct, n = totals.tolist()
        return {"loss": loss_sum / max(n, 1), "accuracy": correct / max(n, 1), "failed": failed}

    def run(self, resume: bool = False, overwrite: bool = False) -> dict:
        cfg, ctx = self.cfg, self.ctx
        ckpt = self._start_state(resume, overwrite)
        t0 = time.perf_counter()
        history: list[dict] = []
        stage_i, stage_ep, best = 0, 0, {"accuracy": -1.0, "epoch": None}
        if ckpt is not None:
            self.model.load_state_dict(ckpt["model"])
            history, best = ckpt["history"], ckpt["best"]
            stage_i, stage_ep = ckpt["next_stage"], ckpt["next_stage_epoch"]
            set_rng_state(ckpt["rng"])
            self._write_metrics(history)
        self.model.to(self.dev, memory_format=self._memory_format)
        train_ds, train_loader, evals = self._loaders()
        scaler = torch.amp.GradScaler("cuda", enabled=self.prec == "fp16")
        if ckpt is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        status = "up to date" if stage_i >= len(self.stages) else ("resumed" if ckpt else "trained")
        while stage_i < len(self.stages):
            stage = self.stages[stage_i]
            frozen = frozen_modules(self.model, self.probe, stage, self.head)
            trainable = apply_stage(self.model, frozen)
            net = self.model
            if ctx.world > 1:
                net = nn.parallel.DistributedDataParallel(
                    self.model, device_ids=[self.dev.index] if self.dev.type == "cuda" else None)
            opt = make_optimizer(self.model, self.head, cfg)
            per_epoch = math.ceil(len(train_loader) / cfg.accumulate)
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, warmup_cosine(per_epoch * stage.epochs, min(round(cfg.warmup_epochs * per_epoch),
                                                                  per_epoch * stage.epochs // 2)))
            if ckpt is not None and stage_ep > 0:
                opt.load_state_dict(ckpt["optimizer"])
                sched.load_state_dict(ckpt["scheduler"])
            ckpt = None
            bad = 0 if stage_ep == 0 else best.get("bad", 0)
            while stage_ep < stage.epochs:
                epoch = len(history)
                train_ds.set_epoch(epoch)
                train_loader.sampler.set_epoch(epoch)
                lrs = {g["name"]: g["lr"] for g in opt.param_groups}
                t_ep = time.perf_counter()
                tr = self.train_epoch(net, train_loader, opt, sched, scaler, frozen,
                                      f"{stage.name} {stage_ep + 1}/{stage.epochs}")
                train_s = time.perf_counter() - t_ep
                va = self.evaluate(evals["val"])
                improved = va["accuracy"] > best["accuracy"]
                bad = 0 if improved else bad + 1
                if improved:
                    best = {"accuracy": va["accuracy"], "epoch": epoch}
                best["bad"] = bad
                stage_ep += 1
                stop = stage_ep >= stage.epochs or (cfg.patience and bad >= cfg.patience)
                history.append({"epoch": epoch, "stage": stage.name, "stage_epoch": stage_ep,
                                "train_loss": tr["loss"], "train_accuracy": tr["accuracy"],
                                "val_loss": va["loss"], "val_accuracy": va["accuracy"], "lr": lrs,
                                "trainable_params": trainable, "train_seconds": round(train_s, 3),
                                "seconds": round(time.perf_counter() - t_ep, 3),
                                "failed_images": sorted(set(tr["failed"]) | set(va["failed"])),
                                "early_stop": bool(stop and stage_ep < stage.epochs)})
                if stop:
                    stage_i, stage_ep = stage_i + 1, 0
                state = {"model": self.model.state_dict(), "optimizer": opt.state_dict(),
                         "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                         "epoch": epoch + 1, "stage": stage.name, "frozen": sorted(frozen),
                         "next_stage": stage_i, "next_stage_epoch": stage_ep, "best": best,
                         "history": history, "rng": rng_state(), "recipe": self.recipe}
                self._save(state, improved)
                self._write_metrics(history[-1:], "a")
                if ctx.main:
                    line = (f"epoch {epoch + 1} ({stage.name} {history[-1]['stage_epoch']}/{stage.epochs}): train loss "
                            f"{tr['loss']:.4f} acc {tr['accuracy']:.4f}, val loss {va['loss']:.4f} acc "
                            f"{va['accuracy']:.4f}{' (best)' if improved else ''}, {history[-1]['seconds']:.1f} s"
                            f"{', stage ends early' if history[-1]['early_stop'] else ''}")
                    if self.progress:
                        tqdm.write(line, file=sys.stderr)
                    else:
                        log.info(line)
                self._barrier()
                if stop:
                    break
        return self._finish(history, best, evals, status, time.perf_counter() - t0)

    def _finish(self, history, best, evals, status, seconds) -> dict:
        digest = state_digest(self.model)
        digests = [digest]
        if self.ctx.world > 1:
            digests = [None] * self.ctx.world
            torch.distributed.all_gather_object(digests, digest)
        best_ckpt = load_checkpoint(self.out / "best.pt")
        self.model.load_state_dict(best_ckpt["model"])
        part = "test" if "test" in evals else "val"
        ev = self.evaluate(evals[part], keep=True)
        truth = [int(self.splits.table.labels[r]) for r in ev["rows"]]
        failed_rows = set(ev["failed"])
        result = {"run_dir": str(self.out), "status": status, "model": self.cfg.model,
                  "from_scratch": self.cfg.from_scratch, "evaluated_on": part,
                  f"{part}_accuracy": ev["accuracy"], "test_accuracy": ev["accuracy"] if part == "test" else None,
                  "best_epoch": best["epoch"], "best_val_accuracy": best["accuracy"],
                  "epochs_run": len(history), "seconds": round(seconds, 2),
                  "train_seconds": round(sum(h["train_seconds"] for h in history), 2),
                  "seconds_per_epoch": round(sum(h["seconds"] for h in history) / max(1, len(history)), 2),
                  "stages": _stage_summary(self.stages, history), "images": self.splits.sizes(),
                  "failed_images": sorted({self.splits.table.paths[r] for h in history
                                           for r in h["failed_images"]} |
                                          {self.splits.table.paths[r] for r in failed_rows}),
                  "device": str(self.dev), "precision": self.prec, "world_size": self.ctx.world,
                  "rank_digests": digests, "ranks_agree": len(set(digests)) == 1,
                  "recipe": self.recipe, "versions": library_versions()}
        if self.ctx.main:
            write_finetune_report(result, history, truth, ev["preds"], self.splits.classes, self.out)
        self._barrier()
        if not result["ranks_agree"]:
            raise FinetuneError(f"DDP ranks ended with different weights: {digests}")
        return result


def _stage_summary(stages, history) -> list[dict]:
    out = []
    for s in stages:
        hs = [h for h in history if h["stage"] == s.name]
        out.append({**s.as_dict(), "epochs_run": len(hs),
                    "trainable_params": hs[0]["trainable_params"] if hs else None,
                    "seconds_per_epoch": round(sum(h["seconds"] for h in hs) / len(hs), 2) if hs else None,
                    "best_val_accuracy": max((h["val_accuracy"] for h in hs), default=None)})
    return out


def finetune(config: FinetuneConfig, *, resume: bool = False, overwrite: bool = False,
             progress: bool = True) -> dict:
    """Fine-tune ``config.model`` on ``config.data`` into ``config.out``; returns the summary
    that is also written to ``result.json``.

    An existing run in ``config.out`` is refused unless ``resume`` (continue it; its recipe must
    match) or ``overwrite`` (start again); both together resume a matching run and restart any
    other.

    Under ``torchrun`` (WORLD_SIZE > 1) every rank calls this; the model is wrapped in
    DistributedDataParallel per stage, rank 0 writes the files, and the summary records a digest
    of every rank's final weights.
    """
    ctx = _init_distributed(config.device)
    try:
        return _Run(config, ctx, progress).run(resume=resume, overwrite=overwrite)
    finally:
        if ctx.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

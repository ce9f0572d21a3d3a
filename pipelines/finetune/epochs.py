"""One pass over a split: a training epoch or an evaluation, on one process or one DDP rank.

Under ``torchrun`` every rank sees its share of each split; the sums of loss, hits and images
are all-reduced, and evaluations gather every rank's predictions, so each rank ends a pass with
the same figures.
"""
from __future__ import annotations

import contextlib
import hashlib

import torch
from torch import nn
from tqdm import tqdm

from cnncodes.extractor.devices import autocast
from cnncodes.extractor.distributed import Dist, init_distributed  # noqa: F401 - the run's ranks

from cnncodes.pipelines.finetune.freezing import FinetuneError, set_train_mode


def state_digest(model: nn.Module) -> str:
    """sha256 over every parameter and buffer, to show DDP ranks agree bit for bit."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def rank_digests(model: nn.Module, ctx: Dist) -> list[str]:
    """The :func:`state_digest` of every rank's ``model``, gathered on every rank."""
    digest = state_digest(model)
    if ctx.world == 1:
        return [digest]
    digests = [None] * ctx.world
    torch.distributed.all_gather_object(digests, digest)
    return digests


def epoch_line(h: dict, stage, tr: dict, va: dict, improved: bool) -> str:
    """The line a finished epoch logs: its history entry ``h``, training and val figures."""
    return (f"epoch {h['epoch'] + 1} ({stage.name} {h['stage_epoch']}/{stage.epochs}): train loss "
            f"{tr['loss']:.4f} acc {tr['accuracy']:.4f}, val loss {va['loss']:.4f} acc "
            f"{va['accuracy']:.4f}{' (best)' if improved else ''}, {h['seconds']:.1f} s"
            f"{', stage ends early' if h['early_stop'] else ''}")


def _logits(out):
    if isinstance(out, torch.Tensor):
        return out
    return getattr(out, "logits", None) if not isinstance(out, (tuple, list)) else out[0]


# Batch-level augmentation (``--mix``): torchvision's MixUp and CutMix (alpha 1, their default),
# or one of the two at random per batch, as timm's and torchvision's reference recipes do.
MIXES = ("none", "mixup", "cutmix", "both")


def batch_mixer(mix: str, n_classes: int):
    """A callable ``(images, labels) -> (images, soft labels)``, or None for ``none``. It draws
    from torch's global generator, whose state every checkpoint saves, so a resumed run mixes
    the same batches the same way."""
    if mix == "none":
        return None
    from torchvision.transforms import v2  # mix is one of MIXES: the run's settings were checked
    mixup, cutmix = v2.MixUp(num_classes=n_classes), v2.CutMix(num_classes=n_classes)
    return {"mixup": mixup, "cutmix": cutmix, "both": v2.RandomChoice([mixup, cutmix])}[mix]


class Passes:
    """Training and evaluation passes of ``self.model``.

    A base of the run (``training._Run``), which sets ``cfg``, ``ctx`` (:class:`Dist`), ``dev``,
    ``prec`` (a resolved precision), ``model`` and ``progress`` before the first pass.
    """

    @property
    def _memory_format(self):
        # channels_last on CPUs too: oneDNN's convolutions in that layout made Lite0's training
        # step 1.6x faster on 2 cores (67-78 -> 42-49 ms an image, batch 32, forward + backward
        # + AdamW)
        return torch.channels_last

    def _autocast(self):
        return autocast(self.prec)

    def _to_device(self, x, y):
        return (x.to(self.dev, non_blocking=True, memory_format=self._memory_format),
                y.to(self.dev, non_blocking=True))

    def _sum_over_ranks(self, loss_sum: float, correct: int, n: int) -> tuple[float, float, float]:
        totals = torch.tensor([loss_sum, correct, n], dtype=torch.float64)
        if self.ctx.world > 1:
            torch.distributed.all_reduce(totals)
        return tuple(totals.tolist())

    ema = None  # torch's AveragedModel of the weights (--ema), or None

    def eval_model(self) -> nn.Module:
        """What validation and test score: the exponential moving average of the weights under
        ``--ema``, else the model itself."""
        return self.ema.module if self.ema is not None else self.model

    def evaluate(self, loader, keep: bool = False) -> dict:
        """Loss and accuracy over a split, summed over the ranks' shares; with ``keep``, the
        table rows and predictions of every image (gathered from all ranks).

        The plain model, not the DDP wrapper, runs here: DDP's forward broadcasts buffers, a
        collective the ranks would have to call equally often, and their shares may differ by
        a batch."""
        net = self.eval_model()
        net.eval()
        loss_sum, correct, n, rows, preds, failed = 0.0, 0, 0, [], [], []
        crit = nn.CrossEntropyLoss(reduction="sum")
        with torch.inference_mode():
            for x, y, batch_rows, bad in loader:
                failed += bad
                if x is None:
                    continue
                x, y = self._to_device(x, y)
                with self._autocast():
                    logits = _logits(net(x)).float()
                loss_sum += float(crit(logits, y))
                p = logits.argmax(1)
                correct += int((p == y).sum())
                n += len(y)
                if keep:
                    rows += batch_rows
                    preds += p.cpu().tolist()
        loss_sum, correct, n = self._sum_over_ranks(loss_sum, correct, n)
        if self.ctx.world > 1:
            gathered = [None] * self.ctx.world
            torch.distributed.all_gather_object(gathered, (rows, preds, failed))
            rows, preds, failed = ([x for g in gathered for x in g[k]] for k in range(3))
        return {"loss": loss_sum / max(n, 1), "accuracy": correct / max(n, 1), "n": int(n),
                "rows": rows, "preds": preds, "failed": failed}

    def _all_skip(self, empty: bool) -> bool:
        """Whether this training batch is skipped: on every rank as soon as one has nothing in
        it (every image failed to decode), since DDP's backward is a collective that all ranks
        must join. Gradients kept without a step carry over to the next step, on all ranks."""
        if self.ctx.world == 1:
            return empty
        flag = torch.tensor([1.0 if empty else 0.0])
        torch.distributed.all_reduce(flag)
        return bool(flag.item())

    def _backward(self, net, x, y, crit, scaler, sync):
        """Forward and backward of one batch (gradients scaled for accumulation); an out-of-memory
        error becomes advice on the batch size."""
        cfg = self.cfg
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
        return logits, loss

    def train_epoch(self, net, loader, opt, sched, scaler, frozen, epoch_label: str) -> dict:
        """One epoch over ``loader``: a step every ``accumulate`` batches (and at the end)."""
        cfg = self.cfg
        set_train_mode(self.model, frozen, cfg.bn)
        crit = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        mixer = batch_mixer(cfg.mix, len(self.splits.classes))
        loss_sum, correct, n, failed = 0.0, 0, 0, []
        batches = tqdm(loader, desc=epoch_label, unit="batch", leave=False,
                       disable=None if self.progress and self.ctx.main else True)
        opt.zero_grad(set_to_none=True)
        for i, (x, y, _, bad) in enumerate(batches):
            failed += bad
            if self._all_skip(x is None):
                continue
            x, y = self._to_device(x, y)
            # mixed images train against mixed (soft) labels; training accuracy is counted
            # against each image's own label (an approximation under mixing)
            target = y
            if mixer is not None:
                x, target = mixer(x, y)
            step_now = (i + 1) % cfg.accumulate == 0 or i + 1 == len(loader)
            sync = net.no_sync() if self.ctx.world > 1 and not step_now else contextlib.nullcontext()
            logits, loss = self._backward(net, x, target, crit, scaler, sync)
            if step_now:
                if cfg.clip_grad:  # on the true gradients: unscaled first (a no-op without fp16)
                    scaler.unscale_(opt)
                    params = [p for g in opt.param_groups for p in g["params"]]
                    nn.utils.clip_grad_norm_(params, cfg.clip_grad)
                scaler.step(opt)
                if self.ema is not None:
                    self.ema.update_parameters(self.model)
                scaler.update()
                opt.zero_grad(set_to_none=True)
                sched.step()
            loss_sum += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            n += len(y)
            batches.set_postfix(loss=f"{loss_sum / n:.3f}", acc=f"{correct / n:.3f}")
        loss_sum, correct, n = self._sum_over_ranks(loss_sum, correct, n)
        if self.ctx.world > 1:
            # DDP averages gradients, not batch-norm statistics: take rank 0's so every rank
            # evaluates and saves the same network.
            for b in self.model.buffers():
                torch.distributed.broadcast(b, 0)
            if self.ema is not None:  # the average of each rank's statistics: rank 0's too
                for b in self.ema.module.buffers():
                    torch.distributed.broadcast(b, 0)
        return {"loss": loss_sum / max(n, 1), "accuracy": correct / max(n, 1), "failed": failed}

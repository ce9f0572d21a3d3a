"""Fine-tuning: ``finetune``, and ``compare`` (linear probe vs fine-tuning vs from scratch)."""
from __future__ import annotations

import json
import os

import click

from cnncodes.extractor.devices import PRECISIONS

from .options import DEVICE, OFFLINE, RUNTIME, echo_json, existing_data, fail_cleanly


# Fine-tuning settings: shared by finetune and compare.
def _train_options(fn):
    options = [
        click.option("--model", "-m", default="efficientnet_lite0", show_default=True,
                     help="Backbone (see list-models)."),
        click.option("--weights", "-w", default="DEFAULT", show_default=True,
                     help="As for extract; a fine-tuning checkpoint (best.pt) works too."),
        click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-4, show_default=True,
                     help="Learning rate of the unfrozen backbone (AdamW; with --optimizer sgd try "
                          "1e-3: SGD's 5e-3 diverged on Lite0)."),
        click.option("--head-lr-mult", type=click.FloatRange(min=0, min_open=True), default=10.0,
                     show_default=True, help="The new head's learning rate as a multiple of --lr."),
        click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), default="adamw", show_default=True,
                     help="AdamW, or SGD with momentum."),
        click.option("--momentum", type=click.FloatRange(0, 1), default=0.9, show_default=True,
                     help="SGD's momentum."),
        click.option("--weight-decay", type=click.FloatRange(min=0), default=1e-4, show_default=True),
        click.option("--warmup-epochs", type=click.FloatRange(min=0), default=0.5, show_default=True,
                     help="Linear warm-up at the start of every stage, then cosine decay."),
        click.option("--label-smoothing", type=click.FloatRange(0, 1, max_open=True), default=0.0,
                     show_default=True),
        click.option("--batch-size", "-b", type=click.IntRange(min=1), default=32, show_default=True),
        click.option("--accumulate", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Sum gradients over N batches per step (an N times larger batch on a small GPU)."),
        click.option("--val-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.1,
                     show_default=True,
                     help="Without a val split: this stratified share of train validates."),
        click.option("--patience", type=click.IntRange(min=0), default=3, show_default=True,
                     help="End a stage after N epochs without a new best val accuracy (0: never)."),
        click.option("--bn", type=click.Choice(["eval", "frozen", "train"]), default="eval",
                     show_default=True,
                     help="Batch norm while training: eval = every layer in eval mode, its statistics "
                          "kept (its scale and shift train where unfrozen); frozen = only frozen layers; "
                          "train = statistics re-estimated from the batches (always from scratch). "
                          "LayerNorm (ViT, Swin) has no statistics: no effect there."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--decode", type=click.Choice(["reduced", "exact"]), default="reduced",
                     show_default=True,
                     help="reduced: each image decoded at the smallest scale that keeps the pixels the "
                          "weights' resize needs (JPEG DCT scaling), as extract's default; "
                          "exact: full size."),
        click.option("--augment", type=click.Choice(["none", "light", "standard", "trivialaugment",
                                                     "randaugment"]), default="light", show_default=True,
                     help="Training images: standard = random resized crop (8-100% of the area) and flip; "
                          "light = crops of 35-100%; trivialaugment / randaugment = standard plus that "
                          "policy; none = the weights' resize and centre crop."),
        click.option("--lr-decay", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True,
                     help="Layer-wise learning-rate decay: each stage below the top trains at this "
                          "multiple of the rate of the one above (1: one rate for the backbone)."),
        click.option("--mix", type=click.Choice(["none", "mixup", "cutmix", "both"]), default="none",
                     show_default=True,
                     help="Mix training images in each batch (torchvision's MixUp or CutMix, alpha 1; "
                          "both = one of the two per batch), trained against mixed labels."),
        click.option("--ema", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
                     help="Keep an exponential moving average of the weights with this decay (e.g. "
                          "0.999) and validate, test and save best.pt with it (0: off)."),
        click.option("--clip-grad", type=click.FloatRange(min=0), default=0.0, show_default=True,
                     help="Largest gradient norm per step (0: no clipping)."),
        click.option("--init-head", type=click.Choice(["probe", "random"]), default="probe",
                     show_default=True,
                     help="probe: the new head starts as the softmax probe of the training images' "
                          "penultimate codes (probe, then fine-tune; one extraction pass first); "
                          "random: a fresh Linear layer."),
        click.option("--prepare/--no-prepare", default=True, show_default=True,
                     help="Decode once: every image larger than a run reads is decoded and resized "
                          "once into --prepared-dir (training copies at training resolution, "
                          "evaluation copies as the network sees them) and read from there every "
                          "epoch, by every run on the same photos."),
        click.option("--prepared-dir", type=click.Path(file_okay=False), default="cache/prepared",
                     show_default=True, help="Where prepared images are kept."),
        click.option("--device", type=DEVICE, default="auto", show_default=True),
        click.option("--precision", type=click.Choice(PRECISIONS), default="auto",
                     show_default=True, help="auto: bf16 autocast on CUDA (AMP), fp32 elsewhere."),
        click.option("--workers", "-j", type=click.IntRange(min=0), default=None,
                     help="Decoding worker processes [default: 0 on a CPU (decoded in turn with the steps), "
                          "min(4, cores) beside a GPU]."),
        click.option("--quiet", "-q", is_flag=True, help="No progress bars."),
        click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _config(data, out, **kw):
    from cnncodes.pipelines.finetune.training import FinetuneConfig
    return FinetuneConfig(str(data), str(out), **kw)


@click.command("finetune")
@OFFLINE
@click.argument("data", callback=existing_data)
@click.option("--out", "-o", type=click.Path(file_okay=False),
              help="Run folder [default: runs/<data>-<model>, -scratch with --from-scratch].")
@click.option("--stages", help="START:EPOCHS,... with START = head, a layer or alias, or all "
                               "[default: head:2,all:3].")
@click.option("--freeze-until",
              help="One stage: freeze everything before LAYER, train the rest for --epochs.")
@click.option("--epochs", type=click.IntRange(min=1), default=5, show_default=True,
              help="With --freeze-until.")
@click.option("--from-scratch", is_flag=True, help="The same schedule from random initialisation.")
@click.option("--resume", is_flag=True, help="Continue the run in --out exactly where it stopped.")
@click.option("--overwrite", is_flag=True, help="Start again, replacing the run in --out.")
@_train_options
@fail_cleanly
def finetune_cmd(data, out, stages, freeze_until, epochs, from_scratch, resume, overwrite, quiet, as_json,
                 **kw) -> None:
    """Fine-tune a pretrained network on DATA in stages, freezing the early layers.

    DATA is what extract reads: an image folder, a CSV manifest or WebDataset tar shards.

    The classifier is replaced by a new head sized to DATA's classes. Each stage START:EPOCHS
    trains START and everything after it (head = the head alone, a module or block:K = that
    module on, stage5 = the whole last stage, all = everything) with --lr, the head at --lr x
    --head-lr-mult. Stages unfreeze from the top down. Transformers work the same way
    (stage4 of a ViT = its last quarter of blocks; its class token and positional embeddings
    train with all); they have LayerNorm, not batch norm, so --bn changes nothing for them.
    Writes metrics.jsonl, curves.png, confusion.png, result.json, best.pt and last.pt into --out;
    best.pt is a valid --weights for extract and finetune. Kill it and rerun with --resume: it
    continues from the last finished epoch and ends with the same weights.

    \b
    Examples:
      cnncodes finetune data/birds --stages head:3,stage5:3,all:4 --out runs/birds
      cnncodes finetune data/birds --freeze-until layer4 --epochs 5 --model resnet50
      cnncodes finetune data/birds --stages all:10 --from-scratch --lr 0.01
      cnncodes finetune data/birds -m timm:deit_small_patch16_224.fb_in1k --stages head:2,block:-4:3
      torchrun --nproc_per_node 4 -m cnncodes finetune data/birds --out runs/birds-ddp
      cnncodes extract data/birds --weights runs/birds/best.pt --layer penultimate
    """
    from cnncodes.pipelines.finetune.training import default_run_dir, finetune
    if stages and freeze_until:
        raise click.UsageError("--stages and --freeze-until are two ways to say the same; give one.")
    stages = f"{freeze_until}:{epochs}" if freeze_until else (stages or "head:2,all:3")
    out = out or default_run_dir(data, kw["model"], from_scratch)
    r = finetune(_config(data, out, stages=stages, from_scratch=from_scratch, **kw), resume=resume,
                 overwrite=overwrite, progress=not quiet)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if as_json:
        echo_json({k: v for k, v in r.as_dict().items() if k != "confusion"})
        return
    for s in r.stages:
        click.echo(f"  {s['name']:<10} {s['epochs_run']}/{s['epochs']} epochs, "
                   f"{s['trainable_params'] or 0:>11,} trainable, {s['seconds_per_epoch'] or 0:.1f} s/epoch, "
                   f"best val "
                   f"{s['best_val_accuracy'] if s['best_val_accuracy'] is not None else float('nan'):.4f}")
    for path in r.failed_images[:10]:
        click.echo(f"failed: {path}", err=True)
    click.echo(f"{r.run_dir}: {r.status}; {r.evaluated_on} accuracy {r.accuracy:.4f} with the best epoch "
               f"({r.best_epoch + 1}, val {r.best_val_accuracy:.4f}); {r.epochs_run} epochs, "
               f"{r.seconds_per_epoch:.1f} s/epoch on {r.device} ({r.precision})")


@click.command("compare")
@OFFLINE
@click.argument("data", callback=existing_data)
@click.option("--layer", "-l",
              help="The linear probe's layer [default: best of --sweep-report, else penultimate].")
@click.option("--sweep-report", type=click.Path(exists=True),
              help="A sweep report folder to take the best layer from.")
@click.option("--strategies", default="probe,top,all,scratch", show_default=True,
              help="Which of probe, top, all, scratch to run.")
@click.option("--head-epochs", type=click.IntRange(min=1), default=2, show_default=True,
              help="Epochs of the head-only stage (scratch trains head-epochs + epochs in all).")
@click.option("--epochs", type=click.IntRange(min=1), default=3, show_default=True,
              help="Epochs of the unfrozen stage.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False),
              help="Report folder [default: reports/compare-<data>-<model>].")
@RUNTIME
@_train_options
@fail_cleanly
def compare_cmd(data, layer, sweep_report, strategies, head_epochs, epochs, report_dir, runtime, quiet,
                as_json, **kw) -> None:
    """Linear probe vs fine-tuning the top stage vs fine-tuning everything vs from scratch.

    Runs the strategies on the same splits and seed, and writes index.html, compare.md/.csv/.json
    and compare.png (accuracy, training time, trainable parameters) with a reading of what the
    measured gaps show: a fine-tuning run that had not converged (validation accuracy still
    rising at its last epoch) is called inconclusive, with the --epochs to rerun with, never
    read as a verdict. Each strategy is kept when finished: rerun to resume.

    \b
    Examples:
      cnncodes compare data/birds
      cnncodes compare data/birds --sweep-report reports/birds-efficientnet_lite0 --epochs 5
      cnncodes compare data/birds --strategies probe,top --layer stage4
    """
    from cnncodes.pipelines.compare.strategies import compare
    model, weights = kw.pop("model"), kw.pop("weights")
    result = compare(data, model, weights=weights, layer=layer, sweep_report=sweep_report, out=report_dir,
                     head_epochs=head_epochs, epochs=epochs,
                     strategies=[s.strip() for s in strategies.split(",") if s.strip()],
                     config=_config(data, "", **kw), progress=not quiet, runtime=runtime)
    if as_json:
        echo_json({"rows": json.loads(result.table.to_json(orient="records")),
                   "conclusion": result.conclusion, "files": result.files, "seconds": result.seconds})
        return
    from cnncodes.pipelines.compare.report import HEAD, table_rows
    rows = table_rows(result.table)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(HEAD)]
    click.echo("  ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in enumerate(zip(HEAD, widths))))
    for r in rows:
        click.echo("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    click.echo("")
    for line in result.conclusion:
        click.echo(line)
    click.echo(f"report: {result.files['html']} ({result.seconds:.0f}s)")


@click.command("lr-find")
@OFFLINE
@click.argument("data", callback=existing_data)
@click.option("--start", default="all", show_default=True,
              help="The stage to test: it trains START and everything after it (head, a stage alias, a "
                   "module, or all), as in --stages.")
@click.option("--min-lr", type=click.FloatRange(min=0, min_open=True), default=1e-7, show_default=True)
@click.option("--max-lr", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True)
@click.option("--steps", type=click.IntRange(min=5), default=100, show_default=True,
              help="Training steps (batches) from --min-lr to --max-lr; the test stops sooner when the "
                   "loss diverges.")
@click.option("--out", "-o", type=click.Path(file_okay=False),
              help="Folder for lr-find.json and lr-find.png [default: runs/lr-find-<data>-<model>].")
@click.option("--overwrite", is_flag=True, help="Replace the files of an earlier test in --out.")
@_train_options
@fail_cleanly
def lr_find_cmd(data, start, min_lr, max_lr, steps, out, overwrite, quiet, as_json, **kw) -> None:
    """The learning-rate range test for a fine-tuning stage (fastai's lr_find).

    Trains a throwaway copy of the run, set up as finetune would set it up (the probe-started
    head, the stage's frozen layers, the optimiser, --head-lr-mult and --lr-decay kept), for
    --steps batches while the rate grows from --min-lr to --max-lr, and suggests a --lr from the
    smoothed loss: fastai's valley (two thirds down the longest fall), beside the steepest fall
    and a tenth of the minimum's rate. Writes lr-find.json and lr-find.png. Reliable for CNNs;
    for transformers read the plot rather than the suggestion.

    \b
    Examples:
      cnncodes lr-find data/birds
      cnncodes lr-find data/birds --start stage5 --steps 60 --json
      cnncodes lr-find data/birds --optimizer sgd --max-lr 0.1 --out runs/birds-lr
    """
    from pathlib import Path

    from cnncodes.extractor.files import dataset_name, slug

    from cnncodes.pipelines.finetune.lr_find import lr_find, plot_lr_find
    from cnncodes.pipelines.records import write_json
    out = Path(out or Path("runs") / f"lr-find-{dataset_name(data)}-{slug(kw['model'])}")
    files = {"json": out / "lr-find.json", "plot": out / "lr-find.png"}
    present = [str(p) for p in files.values() if p.exists()]
    if present and not overwrite:
        raise click.ClickException(f"{', '.join(present)} exist: pass --overwrite to replace them, or "
                                   f"choose another --out.")
    out.mkdir(parents=True, exist_ok=True)  # a folder that cannot be made fails before the test runs
    result = lr_find(_config(data, "", **kw), start, min_lr=min_lr, max_lr=max_lr, steps=steps,
                     progress=not quiet)
    result.files = {k: str(v) for k, v in files.items()}
    write_json(files["json"], result.as_dict(), indent=2)
    plot_lr_find(result, files["plot"])
    if as_json:
        echo_json(result.as_dict())
        return
    click.echo(f"stage {start}: {len(result.lrs)} steps from {result.lrs[0]:.1e} to {result.lrs[-1]:.1e} "
               f"({result.stopped}), lowest smoothed loss {min(result.losses):.3f}")
    click.echo(f"suggested --lr {result.suggestion:.2g} (valley); steepest fall at {result.steepest:.2g}, "
               f"a tenth of the minimum's rate {result.minimum_tenth:.2g}")
    click.echo(f"plot: {files['plot']} ({result.seconds:.0f}s)")

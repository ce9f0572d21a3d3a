"""Layer sweeps: ``sweep``, and ``demo`` (a sweep of the embedded default on sample data)."""
from __future__ import annotations

import click

from .options import (
    CV_OPTIONS,
    DEVICE,
    OFFLINE,
    POOL,
    RUNTIME,
    SELECT_OPTIONS,
    echo_json,
    existing_data,
    fail_cleanly,
)


def _sweep_options(fn):
    """Options shared by sweep and demo (what to fit and how)."""
    options = [
        *CV_OPTIONS,
        click.option("--solver", type=click.Choice(["auto", "sklearn", "batched", "torch"]), default="auto",
                     show_default=True, help="As for fit-svm."),
        click.option("--device", type=DEVICE, default="auto", show_default=True),
        click.option("--batch-size", "-b", type=click.IntRange(min=1), default=32, show_default=True),
        click.option("--quiet", "-q", is_flag=True, help="No progress bars."),
        click.option("--json", "as_json", is_flag=True, help="Print every row and the conclusion as JSON."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _print_sweep(result, extra: dict | None = None, as_json: bool = False) -> None:
    """A :class:`~cnncodes.pipelines.sweep.report.SweepResult` as a table and its reading, or
    as JSON; ``extra`` adds labelled lines (entries of the JSON)."""
    from cnncodes.pipelines.sweep.report import table_rows
    if as_json:
        echo_json({"rows": result.table.drop(columns=["model_file"]).to_dict("records"),
                   "conclusion": result.conclusion, "best": result.best, "kendall_tau": result.kendall_tau,
                   "report": result.report, "files": result.files, "seconds": result.seconds,
                   **({"few_shot": result.few_shot} if getattr(result, "few_shot", None) else {}),
                   **(extra or {})})
        return
    head, rows = table_rows(result.table, getattr(result.settings, "select", "accuracy"))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    click.echo("  ".join(h.rjust(w) if i > 2 else h.ljust(w) for i, (h, w) in enumerate(zip(head, widths))))
    for r in rows:
        click.echo("  ".join(c.rjust(w) if i > 2 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    click.echo("")
    for line in result.conclusion:
        click.echo(line)
    tau = {k: v for k, v in result.kendall_tau.items() if v is not None}
    if tau:
        click.echo("LogME ranked the layers with Kendall's tau " +
                   ", ".join(f"{v:+.2f} ({k})" for k, v in tau.items()) + " against CV accuracy.")
    if getattr(result, "few_shot", None):
        click.echo("few-shot test accuracy (mean +- std over the episodes):")
        for f in result.few_shot:
            click.echo(f"  {f['classifier']} on {f['layer']} of {f['model']}, {f['shots']} a class: "
                       f"{f['test_accuracy_mean']:.4f} +- {f['test_accuracy_std']:.4f}")
    for label, value in (extra or {}).items():
        click.echo(f"{label}: {value}")
    click.echo(f"report: {result.files['html']} ({result.seconds:.0f}s)")


@click.command("sweep")
@OFFLINE
@click.argument("data", callback=existing_data)
@click.option("--model", "-m", "models", multiple=True, default=["efficientnet_lite0"], show_default=True,
              help="Backbone; repeat to compare several.")
@click.option("--weights", "-w", multiple=True, default=["DEFAULT"], show_default=True,
              help="As for extract: once for every --model, or once per --model in the same order.")
@click.option("--layers", "-l", default="all-stages", show_default=True,
              help="all-stages (stage1..stage5, and penultimate when it differs) or a comma list of layers.")
@click.option("--classifier", "classifiers", default="svm,softmax", show_default=True,
              help="svm, softmax and/or knn (comma-separated; knn: cosine k-NN, k cross-validated "
                   "over 1..200, T 0.07).")
@click.option("--cache", "-c", type=click.Path(dir_okay=False),
              help="Cache to reuse and extend (one --model) [default: cache/<data>-<model>.h5].")
@click.option("--report", "report_dir", type=click.Path(file_okay=False),
              help="Report folder [default: reports/<data>-<model>].")
@click.option("--prescreen", type=click.IntRange(min=1),
              help="Score every layer with LogME; cross-validate only the K best of each backbone.")
@click.option("--holdout", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Without a test split: keep this stratified share as the test.")
@click.option("--pool", default="avg", show_default=True, callback=POOL,
              help="Pooling of feature maps and token layers, as for extract (cls, mean, cls+mean ...).")
@RUNTIME
@_sweep_options
@SELECT_OPTIONS[0]
@SELECT_OPTIONS[1]
@click.option("--shots", help="Also the few-shot protocol on every fitted layer (linear probes): K training "
              "images a class, comma-separated K values; few_shot.csv in the report.")
@click.option("--episodes", type=click.IntRange(min=1), default=5, show_default=True,
              help="Draws per K of --shots.")
@fail_cleanly
def sweep_cmd(data, models, weights, layers, classifiers, cache, report_dir, prescreen, holdout, pool,
              runtime, c_grid, folds, seed, norm, solver, device, batch_size, quiet, as_json, select,
              class_weight, shots, episodes) -> None:
    """Which layer should the classifier read? Depth vs accuracy across layers and backbones.

    Extracts every requested layer in one forward pass per backbone (an existing cache gains
    only the layers it lacks), scores each layer with LogME (training-free), cross-validates a
    linear classifier on each, and writes index.html, sweep.md/.csv/.json, sweep.png and the
    best layer's confusion matrix. Interrupt and rerun: finished extractions and fits are kept.
    DATA is what extract reads: an image folder, a CSV manifest or WebDataset tar shards.

    \b
    Examples:
      cnncodes sweep data/digits
      cnncodes sweep data/birds --model resnet50 --model efficientnet_lite0 --classifier svm
      cnncodes sweep data/birds --layers layer2,layer3,layer4 --prescreen 2 --json
      cnncodes sweep data/sketches --class-weight balanced --select balanced_accuracy
      cnncodes sweep data/birds --layers stage3,stage4,stage5 --shots 1,5,10
    """
    from cnncodes.pipelines.sweep.runner import sweep
    result = sweep(data, list(models), layers, [c.strip() for c in classifiers.split(",") if c.strip()],
               weights=list(weights), cache=cache, report=report_dir, c_grid=c_grid, folds=folds, seed=seed,
               norm=norm, solver=solver, holdout=holdout, prescreen=prescreen, pool=pool,
               batch_size=batch_size, device=device, progress=False if quiet else None, runtime=runtime,
               select=select, class_weight=class_weight, shots=shots, episodes=episodes)
    _print_sweep(result, as_json=as_json)


@click.command("demo")
@OFFLINE
@click.option("--data", default="data/digits", show_default=True, type=click.Path(file_okay=False),
              help="Where the digits image folder is (generated when missing).")
@click.option("--report", "report_dir", type=click.Path(file_okay=False),
              help="Report folder [default: reports/digits-efficientnet_lite0].")
@_sweep_options
@fail_cleanly
def demo(data, report_dir, c_grid, folds, seed, norm, solver, device, batch_size, quiet, as_json) -> None:
    """The whole recipe on the embedded default; nothing to download.

    Writes scikit-learn's handwritten digits as an image folder (if missing), sweeps every
    stage of efficientnet_lite0 with a linear SVM and softmax, saves the best layer's SVM for
    `cnncodes predict`, and writes the report. About a minute on 2 CPU cores.

    \b
    Example:
      cnncodes demo && cnncodes predict --model reports/digits-efficientnet_lite0/best-svm.joblib \
data/digits/test/3
    """
    from cnncodes.pipelines.demo import run_demo
    r = run_demo(data, report_dir, c_grid=c_grid, folds=folds, seed=seed, norm=norm, solver=solver,
                 device=device, batch_size=batch_size, progress=False if quiet else None)
    extra = {"saved SVM": f"{r.model_file} ({r.model_layer})"}
    if r.data_written:
        extra = {"data": f"{data} ({r.data_written} images generated)", **extra}
    _print_sweep(r.sweep, extra, as_json)

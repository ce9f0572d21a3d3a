"""``advise``: measure a data set on the transfer rule's two axes and say what to run."""
from __future__ import annotations

import click

from .options import DEVICE, OFFLINE, RUNTIME, echo_json, existing_data, fail_cleanly


@click.command("advise")
@OFFLINE
@click.argument("data", callback=existing_data)
@click.option("--model", "-m", default="efficientnet_lite0", show_default=True, help="Backbone.")
@click.option("--weights", "-w", default="DEFAULT", show_default=True, help="As for extract.")
@click.option("--sample", type=click.IntRange(min=20), default=800, show_default=True,
              help="Training images measured (a stratified sample; all of them when fewer).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sample and the folds.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False),
              help="Report folder [default: reports/advise-<data>-<model>].")
@click.option("--device", type=DEVICE, default="auto", show_default=True)
@RUNTIME
@click.option("--decode", type=click.Choice(["reduced", "exact"]), default="reduced", show_default=True,
              help="As for extract.")
@click.option("--batch-size", "-b", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--quiet", "-q", is_flag=True, help="No progress messages.")
@click.option("--json", "as_json", is_flag=True, help="Print every figure and the advice as JSON.")
@fail_cleanly
def advise_cmd(data, model, weights, sample, seed, report_dir, device, runtime, decode, batch_size, quiet,
               as_json) -> None:
    """Measure where DATA sits on the transfer rule's two axes, and recommend what to run.

    In about a minute on 2 CPU cores (a stratified sample of the training images; the codes of
    a matching complete cache are read instead when there is one): the size (images per
    class), how ImageNet's own head reads the images (normalised entropy, LEEP), and how well
    each stage's codes separate the classes (softmax probe and k-NN, cross-validated; LogME).
    Then the recommendation - linear probe on layer L, probe-then-fine-tune the top stage, or
    fine-tune everything - with the exact command line and the reasons, every figure printed
    (and in --json), and a report (index.html, advice.md/.json, advise.png) with the data's
    place on the size x similarity plane beside the data sets cnncodes was checked on.

    \b
    Examples:
      cnncodes advise data/digits
      cnncodes advise ../shared/datasets/caltech101-mini --json
    """
    from pathlib import Path

    from cnncodes.extractor.files import dataset_name, slug

    from cnncodes.pipelines.advise.report import figures, layer_table, write_advice_report
    from cnncodes.pipelines.advise.runner import advise
    if not quiet:
        click.echo(f"measuring a sample of {data} ...", err=True)
    result = advise(data, model, weights=weights, sample=sample, seed=seed, device=device, runtime=runtime,
                    decode=decode, batch_size=batch_size)
    out = Path(report_dir) if report_dir else Path("reports") / f"advise-{dataset_name(data)}-{slug(model)}"
    write_advice_report(result, out)
    if as_json:
        echo_json(result.as_dict())
        return
    for line in figures(result):
        click.echo(line)
    head, rows = layer_table(result)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    click.echo("")
    click.echo("  ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths))))
    for r in rows:
        click.echo("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    rec = result.recommendation
    click.echo("")
    click.echo(f"Recommendation: {rec.headline()}")
    for reason in rec.reasons:
        click.echo(f"  {reason}")
    click.echo(f"  $ {rec.command}")
    click.echo(f"report: {result.files['html']} ({result.seconds:.0f}s)")

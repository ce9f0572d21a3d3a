"""Report files of ``cnncodes compare``: ``compare.csv``, ``compare.json``, ``compare.md``,
``compare.png`` (accuracy and training time per strategy) and a self-contained ``index.html``."""
from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from cnncodes.extractor.files import write_text_atomic
from cnncodes.extractor.provenance import library_versions

from cnncodes.pipelines.reports import (
    embed_png,
    fmt_cell,
    html_page,
    html_table,
    markdown_table,
    plain_text_plot,
    pyplot,
)

HEAD = ["strategy", "what", "test acc", "best val/CV acc", "train time (s)", "s/epoch", "epochs",
        "trainable params"]


@dataclass
class CompareResult:
    """What :func:`~.strategies.compare` found.

    Attributes
    ----------
    table : pandas.DataFrame
        One row per strategy (columns ``strategies.COLUMNS``, and a strategy's extras such as
        the fine-tuning runs' ``stages``).
    conclusion : list of str
        The reading of the table in sentences (:func:`~.strategies.conclude`).
    settings : dict
        The ``settings`` entry of ``compare.json``: data, model, layer, epochs, split sizes...
    seconds : float
        Wall time of all strategies (finished ones are read back, not redone).
    report : str
        The report folder.
    files : dict
        The report's files by kind (``csv``, ``json``, ``markdown``, ``plot``, ``html``).
    """

    table: pd.DataFrame
    conclusion: list
    settings: dict
    seconds: float
    report: str
    files: dict = field(default_factory=dict)


def table_rows(df: pd.DataFrame) -> list[list[str]]:
    return [[r["strategy"], r["what"], fmt_cell(r["test_accuracy"]), fmt_cell(r["best_val_accuracy"]),
             fmt_cell(r["train_seconds"], ".1f"), fmt_cell(r["seconds_per_epoch"], ".1f"),
             fmt_cell(r["epochs"], ".0f"), fmt_cell(r["trainable_params"], ",.0f")] for _, r in df.iterrows()]


@plain_text_plot
def plot_compare(df: pd.DataFrame, path: Path, title: str) -> None:
    """Test accuracy per strategy (bars) beside its training time (bars, log scale)."""
    plt = pyplot()
    fig, (ax_acc, ax_t) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    names = list(df["strategy"])
    acc = [0 if v is None or pd.isna(v) else v for v in df["test_accuracy"]]
    bars = ax_acc.bar(names, acc, color=["#4c72b0", "#55a868", "#c44e52", "#8172b2"][:len(names)])
    ax_acc.bar_label(bars, fmt="%.3f", fontsize=9)
    ax_acc.set_ylim(0, 1.05)
    ax_acc.set_ylabel("test accuracy")
    secs = [0 if v is None or pd.isna(v) else v for v in df["train_seconds"]]
    bars = ax_t.bar(names, secs, color="#999999")
    ax_t.bar_label(bars, fmt="%.0f s", fontsize=9)
    ax_t.set_yscale("log")
    ax_t.set_ylabel("training time (s, log scale)")
    for ax in (ax_acc, ax_t):
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_compare_report(result: CompareResult) -> dict[str, Path]:
    """Write ``compare.csv``, ``compare.json``, ``compare.md``, ``compare.png`` and
    ``index.html`` into ``result.report``."""
    df, settings, conclusion = result.table, result.settings, result.conclusion
    out = Path(result.report)
    files = {"csv": out / "compare.csv", "json": out / "compare.json", "markdown": out / "compare.md",
             "plot": out / "compare.png", "html": out / "index.html"}
    df[[c for c in df.columns if c != "stages"]].to_csv(files["csv"], index=False)
    plot_compare(df, files["plot"], f"{settings.get('model')} on {Path(str(settings.get('data'))).name}")
    summary = {"rows": json.loads(df.to_json(orient="records")), "conclusion": conclusion,
               "settings": settings, "seconds": result.seconds, "versions": library_versions()}
    write_text_atomic(files["json"], json.dumps(summary, indent=2) + "\n")
    rows = table_rows(df)
    md = ["# Transfer-learning strategies", "", *[f"- {c}" for c in conclusion], "",
          markdown_table(HEAD, rows),
          "", "![accuracy and training time](compare.png)", ""]
    files["markdown"].write_text("\n".join(md))
    files["html"].write_text(html_page("cnncodes compare", f"<h1>Transfer-learning strategies: "
                                       f"{html.escape(str(settings.get('model')))} on "
                                       f"""{html.escape(str(settings.get('data')))}</h1>
<ul id="conclusion">{''.join(f'<li>{html.escape(c)}</li>' for c in conclusion)}</ul>
{html_table("compare-table", HEAD, rows)}
<p class="small">Every strategy is scored on the same test split. The probe's "val" column is its
cross-validated accuracy on train; fine-tuning holds out a stratified share of train for
validation (seed {settings.get('seed')}). Training time of the probe includes extracting its codes.</p>
<div id="compare-plot">{embed_png(files['plot'], 'accuracy and training time per strategy')}</div>
<p class="small">Made by cnncodes in {result.seconds} s; settings in compare.json.</p>""", left_columns=2))
    return files

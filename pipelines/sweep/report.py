"""A sweep's result and its report: the table (CSV, Markdown, JSON), the depth-vs-accuracy plot,
the best layer's confusion matrix, a conclusion in words, and one self-contained ``index.html``."""
from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
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
    plot_confusion,
    pyplot,
)
from cnncodes.pipelines.sweep.settings import SweepSettings


@dataclass
class SweepResult:
    """What :func:`~.runner.sweep` found.

    Attributes
    ----------
    table : pandas.DataFrame
        One row per backbone x layer x classifier (columns ``runner.COLUMNS``).
    settings : SweepSettings
        The sweep's settings; ``settings.as_dict()`` is the ``settings`` entry of ``sweep.json``.
    report : str
        The report folder.
    conclusion : list of str
        The reading of the table in sentences (:func:`conclude`).
    best : dict or None
        The best row (None when no layer was cross-validated).
    kendall_tau : dict
        Kendall's tau of LogME against CV accuracy, per classifier (:func:`kendall_taus`).
    caches : dict
        Per backbone: its cache's path, state, extraction seconds and image fingerprint.
    seconds : float
        Wall time of the sweep up to its report.
    files : dict
        The report's files by kind (``csv``, ``json``, ``markdown``, ``plot``, ``html``,
        ``confusion``).
    """

    table: pd.DataFrame
    settings: SweepSettings
    report: str
    conclusion: list = field(default_factory=list)
    best: dict | None = None
    kendall_tau: dict = field(default_factory=dict)
    caches: dict = field(default_factory=dict)
    seconds: float | None = None
    files: dict = field(default_factory=dict)
    few_shot: list = field(default_factory=list)   # with --shots: per layer, probe and K

def _fitted(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["fitted"] & df["cv_accuracy"].notna()]


def kendall_taus(df: pd.DataFrame) -> dict:
    """Kendall's tau between LogME and CV accuracy over the fitted layers, per classifier
    (None with fewer than 2 layers): how well the training-free score ranked the layers."""
    from scipy.stats import kendalltau
    out = {}
    for clf, part in _fitted(df).groupby("classifier", sort=False):
        if len(part) >= 2:
            tau = kendalltau(part["logme"], part["cv_accuracy"]).statistic
            out[clf] = None if tau is None or math.isnan(tau) else round(float(tau), 4)
        else:
            out[clf] = None
    return out


def _name(row) -> str:
    return f"{row['classifier']} on {row['layer']} of {row['model']}"


def conclude(df: pd.DataFrame, select: str = "accuracy") -> tuple[list[str], dict | None]:
    """The best layer, the cheapest within 1 point of it, and whether accuracy still rises at
    the top: ``(sentences, best row)`` of a sweep's table, by the mean CV score ``select``
    (accuracy, balanced_accuracy or macro_f1: what chose each fit's C)."""
    col = "cv_accuracy" if select == "accuracy" else f"cv_{select}"
    what = "CV " + select.replace("_", " ").replace("macro f1", "macro-F1")
    fitted = _fitted(df)
    if fitted.empty:
        return ["No layer was cross-validated."], None
    order = fitted.assign(_cost=fitted["gflops"].fillna(np.inf))
    best = order.sort_values([col, "_cost"], ascending=[False, True]).iloc[0]
    test = "" if pd.isna(best["test_accuracy"]) else f", test accuracy {best['test_accuracy']:.3f}"
    lines = [f"Best: {_name(best)} (module {best['module']}, {best['relative_depth']:.0%} of the "
             f"forward pass): {what} {best[col]:.3f}"
             + (f" +- {best['cv_std']:.3f}" if col == "cv_accuracy" else "") + f"{test}."]
    near = order[order[col] >= best[col] - 0.01].sort_values(["_cost", col],
                                                                                   ascending=[True, False])
    cheap = near.iloc[0]
    if cheap["layer"] == best["layer"] and cheap["model"] == best["model"]:
        lines.append("No cheaper layer comes within 1 point of it.")
    else:
        lines.append(f"Cheapest within 1 point: {_name(cheap)} ({cheap['relative_depth']:.0%} of the "
                     f"forward pass, {cheap['gflops']:.2f} GFLOPs per image), {what} "
                     f"{cheap[col]:.3f}.")
    line = fitted[(fitted["model"] == best["model"]) & (fitted["classifier"] == best["classifier"])]
    line = line.sort_values("relative_depth")
    if len(line) >= 2:
        top, below = line.iloc[-1], line.iloc[-2]
        delta = top[col] - below[col]
        # What the curve shows is which *fixed* layer reads this data best; it does not say how
        # much the data resembles ImageNet (dissimilar data can rise to the top too, as PACS
        # sketches do), so no sentence here names a quadrant of the seeds' rule.
        if delta > 0.005:
            trend = (f"{what[3:].capitalize()} still rises at the top ({below['layer']} {below[col]:.3f} -> "
                     f"{top['layer']} {top[col]:.3f}): the deepest codes are the best fixed "
                     f"features here. That alone does not make the data similar to ImageNet's; whether "
                     f"fine-tuning pays is measured by `cnncodes compare`.")
        elif delta < -0.005:
            trend = (f"{what[3:].capitalize()} falls at the top ({below['layer']} {below[col]:.3f} -> "
                     f"{top['layer']} {top[col]:.3f}): an earlier layer's codes read this data "
                     f"better than the top's, whose features are the most specific to ImageNet's classes.")
        else:
            trend = (f"{what[3:].capitalize()} levels off at the top ({below['layer']} {below[col]:.3f}, "
                     f"{top['layer']} {top[col]:.3f}).")
        lines.append(trend)
    return lines, _plain(best.drop(labels="_cost").to_dict())


def _plain(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, (np.generic,)):
            v = v.item()
        if isinstance(v, float) and math.isnan(v):
            v = None
        out[k] = v
    return out


@plain_text_plot
def plot_sweep(df: pd.DataFrame, path: Path) -> None:
    """CV accuracy (error bars: std over folds) against relative depth, one line per backbone x
    classifier, test accuracy as open markers, LogME on a second axis."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    fitted = _fitted(df)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, ((model, clf), part) in enumerate(fitted.groupby(["model", "classifier"], sort=False)):
        part = part.sort_values("relative_depth")
        color = colors[i % len(colors)]
        ax.errorbar(part["relative_depth"], part["cv_accuracy"], yerr=part["cv_std"], marker="o",
                    capsize=3, color=color, label=f"{model} {clf} (CV)")
        if part["test_accuracy"].notna().any():
            ax.plot(part["relative_depth"], part["test_accuracy"], marker="o", linestyle="none",
                    markerfacecolor="none", color=color, label=f"{model} {clf} (test)")
        for _, r in part.iterrows():
            ax.annotate(r["layer"], (r["relative_depth"], r["cv_accuracy"]), textcoords="offset points",
                        xytext=(4, -12), fontsize=7, color=color)
    ax.set_xlabel("relative depth (share of the forward pass's FLOPs)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1.05)
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    for model, part in df.drop_duplicates(["model", "layer"]).groupby("model", sort=False):
        part = part.sort_values("relative_depth")
        ax2.plot(part["relative_depth"], part["logme"], linestyle=":", marker="s", markersize=4,
                 color="grey", alpha=0.8, label=f"{model} LogME")
    ax2.set_ylabel("LogME (dotted)")
    handles = ax.get_legend_handles_labels()
    handles2 = ax2.get_legend_handles_labels()
    ax.legend(handles[0] + handles2[0], handles[1] + handles2[1], fontsize=8, loc="lower right")
    ax.set_title("Which layer to read: accuracy vs depth", fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def table_rows(df: pd.DataFrame, select: str = "accuracy") -> tuple[list[str], list[list[str]]]:
    """The table a person reads: the main columns, formatted (with ``select`` other than
    accuracy, its CV score too: what chose C and the best layer)."""
    extra = None if select == "accuracy" else f"cv_{select}"
    head = ["model", "layer", "classifier", "dim", "depth", "LogME", "CV acc", "+-",
            *([f"CV {select.replace('_accuracy', ' acc').replace('macro_f1', 'macro-F1')}"] if extra else []),
            "C (k for knn)", "test acc", "fit s"]
    rows = []
    for _, r in df.iterrows():
        rows.append([r["model"], r["layer"], r["classifier"], str(r["dim"]), f"{r['relative_depth']:.0%}",
                     fmt_cell(r["logme"], ".3f"),
                     fmt_cell(r["cv_accuracy"]) if r["fitted"] else "(pre-screened out)",
                     fmt_cell(r["cv_std"]), *([fmt_cell(r.get(extra))] if extra else []),
                     fmt_cell(r["C"], "g"), fmt_cell(r["test_accuracy"]), fmt_cell(r["fit_seconds"], ".1f")])
    return head, rows


def _markdown(df: pd.DataFrame, select: str = "accuracy") -> str:
    return markdown_table(*table_rows(df, select))


def write_sweep_report(result: SweepResult, fit_records: dict) -> dict[str, Path]:
    """Write ``sweep.csv``, ``sweep.json``, ``sweep.md``, ``sweep.png``, ``confusion.png``
    (best layer) and ``index.html`` into ``result.report``.

    ``fit_records`` maps (model, layer, classifier) to the stored record of each fit; the best
    one's predictions make the confusion matrix.
    """
    df, best = result.table, result.best
    out = Path(result.report)
    out.mkdir(parents=True, exist_ok=True)
    files = {"csv": out / "sweep.csv", "json": out / "sweep.json", "markdown": out / "sweep.md",
             "plot": out / "sweep.png", "html": out / "index.html"}
    df.to_csv(files["csv"], index=False)
    if result.few_shot:
        files["few_shot"] = out / "few_shot.csv"
        pd.DataFrame(result.few_shot).to_csv(files["few_shot"], index=False)
    plot_sweep(df, files["plot"])
    if best:
        files["confusion"] = out / "confusion.png"
        _plot_best_confusion(best, fit_records[(best["model"], best["layer"], best["classifier"])],
                             files["confusion"])
    tau_text = ", ".join(f"{k}: {'-' if v is None else f'{v:+.2f}'}" for k, v in result.kendall_tau.items())
    summary = {"rows": [_plain(r) for r in df.to_dict("records")], "conclusion": result.conclusion,
               "best": best, "kendall_tau_logme_vs_cv": result.kendall_tau,
               "settings": result.settings.as_dict(), "caches": result.caches, "seconds": result.seconds,
               **({"few_shot": result.few_shot} if result.few_shot else {}),
               "versions": library_versions()}
    write_text_atomic(files["json"], json.dumps(summary, indent=2, default=str) + "\n")
    md = ["# Layer sweep", "", *[f"- {c}" for c in result.conclusion], "",
          f"LogME vs CV accuracy, Kendall's tau: {tau_text or '-'}", "",
          _markdown(df, result.settings.select), "",
          "![accuracy vs depth](sweep.png)", ""]
    if "confusion" in files:
        md += ["![confusion matrix of the best layer](confusion.png)", ""]
    files["markdown"].write_text("\n".join(md))
    files["html"].write_text(_html(df, files, result.conclusion, tau_text, summary))
    return files


def _plot_best_confusion(best: dict, record: dict, path: Path) -> None:
    from sklearn.metrics import confusion_matrix
    classes = record["classes"]
    cm = confusion_matrix(record["truth"], record["pred"], labels=np.arange(len(classes)))
    plot_confusion(cm, classes, path, f"{_name(best)}, C={best['C']:g} ({record['evaluated_on']})")


def _html(df, files, conclusion, tau_text, summary) -> str:
    head, rows = table_rows(df, (summary.get("settings") or {}).get("select", "accuracy"))
    best = summary.get("best") or {}
    marks = ["best" if (r["model"], r["layer"], r["classifier"]) ==
             (best.get("model"), best.get("layer"), best.get("classifier")) else None
             for _, r in df.iterrows()]
    settings = summary.get("settings") or {}
    confusion = embed_png(files["confusion"],
                          "confusion matrix of the best layer") if "confusion" in files else ""
    return html_page("cnncodes layer sweep",
                     f"""<h1>Layer sweep: {html.escape(str(settings.get('data', '')))}</h1>
<ul id="conclusion">{''.join(f'<li>{html.escape(c)}</li>' for c in conclusion)}</ul>
<p>LogME vs CV accuracy, Kendall's tau: {html.escape(tau_text or '-')}</p>
{html_table("sweep-table", head, rows, marks)}
<p class="small">CV: {settings.get('folds')}-fold stratified cross-validation \
(seed {settings.get('seed')}) over
C = {html.escape(', '.join(f'{c:g}' for c in settings.get('c_grid', [])))}, \
norm {html.escape(str(settings.get('norm')))};
depth: share of the forward pass's FLOPs spent up to the layer; the best row is highlighted.</p>
<h2>Accuracy vs depth</h2>
<div id="sweep-plot">{embed_png(files['plot'], 'accuracy vs relative depth')}</div>
<h2>Best layer: confusion matrix</h2>
{confusion}
<p class="small">Made by cnncodes in {summary.get('seconds')} s; every figure with its settings is in \
sweep.json.</p>""",
                     left_columns=3)

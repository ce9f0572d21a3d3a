"""The advice as files: ``advice.json``, ``advice.md``, ``advise.png`` and a self-contained
``index.html``, like the sweep's report.

The plot has two panels: what each stage's codes do (probe and k-NN accuracy against depth),
and where the data sits on the rule's plane (images per class against how sure ImageNet's head
is of the images) beside the data sets cnncodes was checked on (:data:`.reference.REFERENCE`).
"""
from __future__ import annotations

import html
import json
from pathlib import Path

from cnncodes.extractor.files import atomic_write

from cnncodes.pipelines.advise.reference import REFERENCE
from cnncodes.pipelines.advise.rule import LARGE_PER_CLASS, SMALL_PER_CLASS, UNSURE_ENTROPY
from cnncodes.pipelines.reports import (
    embed_png,
    fmt_cell,
    html_page,
    html_table,
    markdown_table,
    plain_text_plot,
)


def layer_table(advice) -> tuple[list[str], list[list[str]]]:
    head = ["layer", "module", "depth", "dim", "probe CV acc", "+-", "k-NN CV acc", "k", "LogME"]
    rows = [[r["layer"], str(r["module"]), f"{r['relative_depth']:.0%}", str(r["dim"]),
             fmt_cell(r["probe_accuracy"]), fmt_cell(r["probe_std"]), fmt_cell(r["knn_accuracy"]),
             str(r["knn_k"]), fmt_cell(r["logme"], ".3f")] for r in advice.layers]
    return head, rows


def figures(advice) -> list[str]:
    """Every figure the rule read, one line each."""
    s, m, h = advice.size, advice.sample, advice.imagenet_head
    lines = [f"Training images: {s['train_images']} in {s['classes']} classes; per class: median "
             f"{s['per_class_median']:g}, smallest {s['per_class_min']}, largest {s['per_class_max']}.",
             f"Measured on {m['images']} of them (up to {m['per_class']} per class, seed {m['seed']}; "
             f"codes from {m['codes_from']})."
             + (f" Left out, with fewer than 2 images that decode: {', '.join(m['classes_left_out'][:10])}."
                if m.get("classes_left_out") else "")]
    if h:
        lines.append(f"ImageNet's head ({h['layer']}): normalised entropy {h['normalised_entropy']:.3f}, "
                     f"LEEP {h['leep']:.3f}, LEEP gain {h['leep_gain']:.3f}.")
    else:
        lines.append("No ImageNet-1k head to read (random weights, or a head of another label set): "
                     "similarity is read from the layers alone.")
    return lines


@plain_text_plot
def plot_advice(advice, path: Path) -> None:
    from cnncodes.pipelines.reports import pyplot
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=110)
    depth = [r["relative_depth"] for r in advice.layers]
    a.plot(depth, [r["probe_accuracy"] for r in advice.layers], marker="o", label="softmax probe (CV)")
    a.plot(depth, [r["knn_accuracy"] for r in advice.layers], marker="s", label="k-NN (CV)")
    for r in advice.layers:
        a.annotate(r["layer"], (r["relative_depth"], r["probe_accuracy"]), textcoords="offset points",
                   xytext=(4, -12), fontsize=7)
    a.set_xlabel("relative depth (share of the forward pass's FLOPs)")
    a.set_ylabel("accuracy on the sample")
    a.set_xlim(0, 1.05)
    a.grid(alpha=0.3)
    a.legend(fontsize=8, loc="lower right")
    a.set_title("What each stage's codes separate", fontsize=10)
    b.set_xscale("log")
    b.axvspan(1, SMALL_PER_CLASS, color="#eef", zorder=0)
    b.axvspan(LARGE_PER_CLASS, 1e5, color="#efe", zorder=0)
    b.axhline(1 - UNSURE_ENTROPY, color="grey", linestyle=":", linewidth=1)
    for name, ref in REFERENCE.items():
        b.scatter(ref["per_class_median"], 1 - ref["normalised_entropy"], color="grey", marker="o")
        b.annotate(f"{name}: {ref['best']}", (ref["per_class_median"], 1 - ref["normalised_entropy"]),
                   textcoords="offset points", xytext=(5, 4), fontsize=7, color="grey")
    if advice.imagenet_head:
        x, y = advice.size["per_class_median"], 1 - advice.imagenet_head["normalised_entropy"]
        b.scatter(x, y, color="C3", marker="*", s=160, zorder=3)
        b.annotate("this data", (x, y), textcoords="offset points", xytext=(6, -12), color="C3", fontsize=9)
    b.set_xlim(2, 1e5)
    b.set_ylim(0, 1)
    from matplotlib.ticker import FuncFormatter, NullFormatter
    b.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # plain text: no mathtext here
    b.xaxis.set_minor_formatter(NullFormatter())
    for x, label in ((10, "small"), (300, "medium"), (10000, "large")):
        b.text(x, 0.97, label, ha="center", va="top", fontsize=8, color="#555")
    b.text(2.5, 1 - UNSURE_ENTROPY + 0.02, "ImageNet's head sure", fontsize=7, color="#555")
    b.text(2.5, 1 - UNSURE_ENTROPY - 0.05, "unsure", fontsize=7, color="#555")
    b.set_xlabel("training images per class (median; small | medium | large)")
    b.set_ylabel("1 - normalised entropy of ImageNet's head")
    b.set_title("Where the data sits: size x similarity", fontsize=10)
    b.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_advice_report(advice, directory) -> dict[str, Path]:
    """Write the report into ``directory``; returns the files by kind."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "advice.json", "markdown": out / "advice.md", "plot": out / "advise.png",
             "html": out / "index.html"}
    plot_advice(advice, files["plot"])
    rec = advice.recommendation
    head, rows = layer_table(advice)
    md = ["# cnncodes advise", "", f"**Recommendation: {rec.headline()}**", "", "```bash", rec.command, "```",
          "", *[f"- {r}" for r in rec.reasons], "", "## Figures", "", *[f"- {f}" for f in figures(advice)],
          "", markdown_table(head, rows), "", "![advice](advise.png)", ""]
    _write(files["markdown"], "\n".join(md))
    body = f"""<h1>Advice: {html.escape(advice.data)} with {html.escape(advice.model)}</h1>
<p id="recommendation"><b>{html.escape(rec.headline())}</b> &mdash;
<code>{html.escape(rec.command)}</code></p>
<ul id="reasons">{''.join(f'<li>{html.escape(r)}</li>' for r in rec.reasons)}</ul>
<h2>Figures</h2>
<ul>{''.join(f'<li>{html.escape(f)}</li>' for f in figures(advice))}</ul>
{html_table("advise-table", head, rows)}
<div id="advise-plot">{embed_png(files['plot'], 'per-stage accuracy and the size x similarity plane')}</div>
<p class="small">Thresholds and the reference points: docs/advise.md.</p>"""
    _write(files["html"], html_page("cnncodes advise", body, left_columns=2))
    advice.files = {k: str(v) for k, v in files.items()}
    advice.report = str(out)
    _write(files["json"], json.dumps(advice.as_dict(), indent=2) + "\n")
    return files


def _write(path: Path, text: str) -> None:
    with atomic_write(path) as tmp:
        Path(tmp).write_text(text)

"""Report files of a fit (per-class metrics, confusion matrix as CSV and PNG, JSON), and the
pieces every report shares: cell formatting, Markdown tables, self-contained HTML pages."""
from __future__ import annotations

import base64
import csv
import functools
import html
import json
import math
from pathlib import Path

import numpy as np
from sklearn.metrics import precision_recall_fscore_support

from cnncodes.extractor.files import write_text_atomic
from cnncodes.extractor.provenance import library_versions


def write_fit_report(result, directory: str | Path) -> dict[str, Path]:
    """Write ``per_class.csv``, ``confusion.csv``, ``confusion.png`` and ``fit.json``.

    The metrics are on the test rows, or on out-of-fold predictions when there is no test part
    (``fit.json`` says which).
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    what, truth, pred = result.evaluated()
    labels = np.arange(len(result.classes))
    p, r, f, n = precision_recall_fscore_support(truth, pred, labels=labels, zero_division=0)
    files = {"per_class": out / "per_class.csv", "confusion_csv": out / "confusion.csv",
             "confusion_png": out / "confusion.png", "json": out / "fit.json"}
    with open(files["per_class"], "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["class", "precision", "recall", "f1", "support"])
        for i, name in enumerate(result.classes):
            w.writerow([name, f"{p[i]:.6f}", f"{r[i]:.6f}", f"{f[i]:.6f}", int(n[i])])
    cm = result.confusion()
    with open(files["confusion_csv"], "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["true \\ predicted"] + list(result.classes))
        for name, row in zip(result.classes, cm):
            w.writerow([name] + row.tolist())
    plot_confusion(cm, result.classes, files["confusion_png"],
                   f"{result.classifier} on {result.layer}, {result.chosen()} ({what})")
    summary = result.as_dict()
    summary.update({"evaluated_on": what, f"{result.hyper.lower()}_grid": [g["C"] for g in result.grid],
                    "fold_of_train_row": dict(zip(map(int, result.train_rows), map(int, result.fold_of_row))),
                    "test_rows": [int(r) for r in result.test_rows], "versions": library_versions(),
                    "recipe": result.cache})
    write_text_atomic(files["json"], json.dumps(summary, indent=2, default=str) + "\n")
    return files


def pyplot():
    """matplotlib's pyplot, drawing into files (the Agg backend)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plain_text_plot(fn):
    """Run a plotting function with every string drawn as plain text.

    Class and layer names are user data: a class named ``price_$1_to_$2`` must not be read
    as mathtext (which raised inside matplotlib, after the fit, before the model was saved).
    The setting holds for the call only (``rc_context``), not for the caller's session.
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import matplotlib
        with matplotlib.rc_context({"text.parse_math": False}):
            return fn(*args, **kwargs)
    return wrapper


@plain_text_plot
def plot_confusion(cm: np.ndarray, classes: list[str], path: Path, title: str) -> None:
    """A row-normalised confusion matrix; class names on the axes while they stay legible."""
    plt = pyplot()
    k = len(classes)
    size = min(14, max(5, 3 + 0.25 * k))
    fig, ax = plt.subplots(figsize=(size, size), dpi=100)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if k <= 40:
        ax.set_xticks(range(k), classes, rotation=90, fontsize=8)
        ax.set_yticks(range(k), classes, fontsize=8)
    if k <= 15:
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def fmt_cell(v, spec: str = ".4f") -> str:
    """A table cell: numbers with ``spec``, ``-`` for missing values, yes/no for booleans."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, float, np.integer, np.floating)):
        return format(v, spec)
    return str(v)


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def html_table(table_id: str, head: list[str], rows: list[list[str]], row_classes=None) -> str:
    """A ``<table>`` with escaped cells; ``row_classes`` gives a CSS class per row (or None)."""
    trs = []
    for i, cells in enumerate(rows):
        mark = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        trs.append(f"<tr{mark}>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return (f'<table id="{table_id}"><thead><tr>{"".join(f"<th>{html.escape(h)}</th>" for h in head)}'
            f'</tr></thead>\n<tbody>{"".join(trs)}</tbody></table>')


def embed_png(path: Path, alt: str) -> str:
    """An <img> tag carrying the PNG itself, so an HTML report is one self-contained file."""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def html_page(title: str, body: str, left_columns: int = 1) -> str:
    """One self-contained page in the reports' common style; the first ``left_columns`` table
    columns are left-aligned (names), the rest right-aligned (figures)."""
    n = left_columns
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; font-size: 14px; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th {{ background: #f0f0f0; }} td:nth-child(-n+{n}), th:nth-child(-n+{n}) {{ text-align: left; }}
tr.best td {{ background: #e6f4e6; font-weight: 600; }}
img {{ max-width: 100%; border: 1px solid #ddd; margin: 1em 0; }}
.small {{ color: #666; font-size: 13px; }}
</style></head><body>
{body}
</body></html>
"""

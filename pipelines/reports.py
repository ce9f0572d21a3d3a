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

# Suspected label errors shown as thumbnails in a fit's index.html (all are in suspects.csv).
THUMBNAILS = 24


def write_fit_report(result, directory: str | Path) -> dict[str, Path]:
    """Write ``per_class.csv``, ``confusion.csv``, ``confusion.png``, ``fit.json`` and
    ``index.html``; for the linear probes also ``reliability.png`` (calibration) and
    ``suspects.csv`` (the training images ranked by how unlikely their given label is).

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
    suspects = result.suspects()
    if suspects is not None:
        from cnncodes.pipelines.probes.suspects import write_suspects_csv
        files["suspects"] = write_suspects_csv(
            out / "suspects.csv", suspects, result.classes, result.pipeline.classes_,
            np.searchsorted(result.pipeline.classes_, result.y_train), result.train_rows, result.train_paths)
    if result.calibration is not None:
        files["reliability_png"] = out / "reliability.png"
        plot_reliability(result, files["reliability_png"])
    summary = result.as_dict()
    summary.update({"evaluated_on": what, f"{result.hyper.lower()}_grid": [g["C"] for g in result.grid],
                    "fold_of_train_row": dict(zip(map(int, result.train_rows), map(int, result.fold_of_row))),
                    "test_rows": [int(r) for r in result.test_rows], "versions": library_versions(),
                    "recipe": result.cache})
    write_text_atomic(files["json"], json.dumps(summary, indent=2, default=str) + "\n")
    files["html"] = out / "index.html"
    write_text_atomic(files["html"], _fit_html(result, files, suspects, what, p, r, f, n))
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


@plain_text_plot
def plot_reliability(result, path: Path) -> None:
    """The reliability diagram of the test rows (out-of-fold rows without them), before and
    after the temperature: accuracy against confidence per bin."""
    from cnncodes.pipelines.probes.calibration import reliability
    from cnncodes.pipelines.probes.linear_model import probabilities
    classes_ = result.pipeline.classes_
    if result.test_scores is not None and np.isin(result.y_test, classes_).any():
        known = np.isin(result.y_test, classes_)
        scores, where = result.test_scores[known], "test rows"
        y = np.searchsorted(classes_, result.y_test[known])
    else:
        scores, y, where = result.cv_scores, np.searchsorted(classes_, result.y_train), "out-of-fold rows"
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5), dpi=100)
    ax.plot([0, 1], [0, 1], color="#999", lw=1, ls="--", label="perfect calibration")
    t = result.calibration.temperature
    curves = (("before (ECE {ece:.3f})", probabilities(np.asarray(scores, np.float64)), "#d62728"),
              (f"after T = {t:.3g} (ECE {{ece:.3f}})", result.calibration.proba(scores), "#1f77b4"))
    for label, proba, color in curves:
        rel = reliability(proba, y)
        ax.plot(rel["confidence"], rel["accuracy"], marker="o", color=color,
                label=label.format(ece=rel["ece"]))
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{result.classifier} on {result.layer}: reliability ({where})", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def thumbnail(path: Path, size: int = 112) -> str:
    """An <img> tag carrying a small JPEG of the image at ``path`` (empty where it cannot be read)."""
    import io

    from PIL import Image
    try:
        with Image.open(path) as im:
            im.draft("RGB", (size, size))   # JPEG: decoded at a reduced scale
            im = im.convert("RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=80)
    except Exception:  # noqa: BLE001 - any image Pillow refuses (a decompression bomb too): no thumbnail
        return ""
    data = base64.b64encode(buf.getvalue()).decode()
    return f'<img class="thumb" src="data:image/jpeg;base64,{data}" alt="">'


def _fit_html(result, files, suspects, what, p, r, f, n) -> str:
    """A fit's ``index.html``: the summary, the C grid, per-class figures, the confusion matrix,
    the reliability diagram and the most suspect training images."""
    e = html.escape
    head = [f"<h1>{e(result.classifier)} on {e(result.layer)}</h1>",
            f'<p class="small">{result.n_train} training rows, {result.n_test} test rows; '
            f"{e(result.chosen())} "
            f"chosen by CV {e(result.select.replace('_', ' '))}; metrics on {e(what)}.</p>"]
    if result.test_accuracy is not None:
        head.append(f"<p>Test accuracy {result.test_accuracy:.4f}, balanced accuracy "
                    f"{result.balanced_accuracy:.4f}, macro-F1 {result.macro_f1:.4f}.</p>")
    grid = html_table("grid", [result.hyper, "CV accuracy", "+-", "balanced", "macro-F1"],
                      [[f"{g['C']:g}", fmt_cell(g["mean"]), fmt_cell(g["std"]),
                        fmt_cell(g.get("balanced_accuracy")), fmt_cell(g.get("macro_f1"))]
                       for g in result.grid],
                      ["best" if g["C"] == result.C else None for g in result.grid])
    per_class = html_table("per-class", ["class", "precision", "recall", "F1", "support"],
                           [[c, fmt_cell(p[i]), fmt_cell(r[i]), fmt_cell(f[i]), str(int(n[i]))]
                            for i, c in enumerate(result.classes)])
    body = head + ["<h2>C grid</h2>", grid, "<h2>Confusion matrix</h2>",
                   embed_png(files["confusion_png"], "confusion matrix")]
    if "reliability_png" in files:
        c = result.calibration
        test = "" if c.ece_test_before is None else \
            f"; on the test rows {c.ece_test_before:.3f} before, {c.ece_test_after:.3f} after"
        body += ["<h2>Calibration</h2>",
                 f"<p>Temperature {c.temperature:.3g}, fitted on the out-of-fold scores. "
                 f"Expected calibration "
                 f"error out-of-fold {c.ece_cv_before:.3f} before, {c.ece_cv_after:.3f} after{test}.</p>",
                 embed_png(files["reliability_png"], "reliability diagram")]
    if suspects is not None:
        root = Path(result.cache.get("data_root") or ".")
        cells = []
        for rank, i in enumerate(suspects.order[:THUMBNAILS], 1):
            given = result.classes[int(result.y_train[i])]
            pred = result.classes[int(result.pipeline.classes_[suspects.predicted[i]])]
            cells.append(f'<figure>{thumbnail(root / result.train_paths[i])}<figcaption>{rank}. '
                         f"{e(result.train_paths[i])}<br>given <b>{e(given)}</b> "
                         f"({suspects.p_given[i]:.2f}), predicted <b>{e(pred)}</b> "
                         f"({suspects.p_predicted[i]:.2f}){' - flagged' if suspects.flagged[i] else ''}"
                         f"</figcaption></figure>")
        body += ["<h2>Suspected label errors</h2>",
                 f"<p>The training images whose given label the out-of-fold model finds least likely "
                 f"({int(suspects.flagged.sum())} flagged by confident learning; all rows ranked in "
                 f"suspects.csv).</p>", '<div class="suspects">' + "".join(cells) + "</div>"]
    body += ["<h2>Per class</h2>", per_class]
    style = ("<style>.suspects{display:flex;flex-wrap:wrap;gap:8px}.suspects figure{width:150px;margin:0;"
             "font-size:11px}.thumb{max-width:140px;max-height:140px;margin:0}</style>")
    return html_page(f"{result.classifier} on {result.layer}", style + "\n".join(body))

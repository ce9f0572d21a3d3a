"""Report files of a fit: per-class metrics, confusion matrix (CSV and PNG), everything as JSON."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from sklearn.metrics import precision_recall_fscore_support

from extractor.engine import library_versions


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
                   f"{result.classifier} on {result.layer}, C={result.C:g} ({what})")
    summary = result.as_dict()
    summary.update({"evaluated_on": what, "c_grid": [g["C"] for g in result.grid],
                    "fold_of_train_row": dict(zip(map(int, result.train_rows), map(int, result.fold_of_row))),
                    "test_rows": [int(r) for r in result.test_rows], "versions": library_versions(),
                    "recipe": result.cache})
    files["json"].write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return files


def plot_confusion(cm: np.ndarray, classes: list[str], path: Path, title: str) -> None:
    """A row-normalised confusion matrix; class names on the axes while they stay legible."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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

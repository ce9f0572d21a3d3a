"""Report files of a fine-tuning run: ``result.json``, ``curves.png`` and ``confusion.png``."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cnncodes.pipelines.records import write_json
from cnncodes.pipelines.reports import plot_confusion


def plot_curves(history: list[dict], path: Path, title: str) -> None:
    """Loss and accuracy on train and val per epoch, with the stage boundaries marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [h["epoch"] + 1 for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    for ax, key, label in ((ax_loss, "loss", "cross-entropy"), (ax_acc, "accuracy", "accuracy")):
        ax.plot(epochs, [h[f"train_{key}"] for h in history], "o-", label="train")
        ax.plot(epochs, [h[f"val_{key}"] for h in history], "s-", label="val")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        for i, h in enumerate(history):
            if i == 0 or h["stage"] != history[i - 1]["stage"]:
                ax.axvline(h["epoch"] + 0.5, color="grey", ls=":", lw=1)
                ax.annotate(h["stage"], (h["epoch"] + 0.55, 0.98), xycoords=("data", "axes fraction"),
                            fontsize=8, va="top", color="dimgrey")
    ax_acc.legend(loc="lower right")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_finetune_report(result: dict, history: list[dict], truth, pred, classes, directory) -> dict:
    """Add the confusion matrix to ``result`` and write the report files; returns their paths."""
    from sklearn.metrics import confusion_matrix
    out = Path(directory)
    files = {"json": out / "result.json", "curves": out / "curves.png", "confusion": out / "confusion.png"}
    cm = confusion_matrix(truth, pred, labels=np.arange(len(classes)))
    result["confusion"] = cm.tolist()
    result["classes"] = list(classes)
    what = "from scratch" if result.get("from_scratch") else "fine-tuned"
    if history:
        plot_curves(history, files["curves"], f"{result['model']} {what}: {' -> '.join(s['name'] for s in result['stages'])}")
    plot_confusion(cm, list(classes), files["confusion"],
                   f"{result['model']} {what}, {result['evaluated_on']} accuracy "
                   f"{result[result['evaluated_on'] + '_accuracy']:.4f}")
    result["files"] = {k: str(v) for k, v in files.items()}
    write_json(files["json"], result, indent=2)
    return files

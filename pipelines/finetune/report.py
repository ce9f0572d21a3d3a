"""Report files of a fine-tuning run: ``result.json``, ``curves.png`` and ``confusion.png``."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cnncodes.pipelines.finetune.result import FinetuneResult
from cnncodes.pipelines.records import write_json
from cnncodes.pipelines.reports import plain_text_plot, plot_confusion, pyplot


@plain_text_plot
def plot_curves(history: list[dict], path: Path, title: str) -> None:
    """Loss and accuracy on train and val per epoch, with the stage boundaries marked."""
    plt = pyplot()
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


def write_finetune_report(result: FinetuneResult, history: list[dict], truth, pred, directory) -> dict:
    """Set ``result.confusion`` (of ``truth`` against ``pred``, on ``result.evaluated_on``) and
    ``result.files``, and write ``result.json``, ``curves.png`` and ``confusion.png``; returns
    the files' paths."""
    from sklearn.metrics import confusion_matrix
    out = Path(directory)
    files = {"json": out / "result.json", "curves": out / "curves.png", "confusion": out / "confusion.png"}
    classes = list(result.classes)
    cm = confusion_matrix(truth, pred, labels=np.arange(len(classes)))
    result.confusion = cm.tolist()
    what = "from scratch" if result.from_scratch else "fine-tuned"
    if history:
        schedule = " -> ".join(s["name"] for s in result.stages)
        plot_curves(history, files["curves"], f"{result.model} {what}: {schedule}")
    plot_confusion(cm, classes, files["confusion"],
                   f"{result.model} {what}, {result.evaluated_on} accuracy {result.accuracy:.4f}")
    result.files = {k: str(v) for k, v in files.items()}
    write_json(files["json"], result.as_dict(), indent=2)
    return files

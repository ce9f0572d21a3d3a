"""``cnncodes demo``: the whole recipe on the embedded default, nothing to download.

Digits (scikit-learn's 8x8 handwritten digits, upscaled) are about as unlike ImageNet's photos
as images get, so sweeping every stage of EfficientNet-Lite0 on them is a fair small test of
the advice "for data unlike ImageNet, an earlier layer may transfer better".
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cnncodes.extractor import DEFAULT_MODEL

from cnncodes.pipelines.probes.artifacts import copy_model
from cnncodes.pipelines.sample_data import write_digits
from cnncodes.pipelines.sweep.report import SweepResult
from cnncodes.pipelines.sweep.runner import sweep


@dataclass
class DemoResult:
    """What the demo did.

    Attributes
    ----------
    sweep : SweepResult
        The sweep of every stage with both classifiers.
    model_file : str
        The best layer's SVM, saved for ``cnncodes predict``.
    model_layer : str
        The layer that SVM reads.
    data_written : int
        How many images were generated (0 when the folder was there).
    """

    sweep: SweepResult
    model_file: str
    model_layer: str
    data_written: int


def run_demo(data: str | Path = "data/digits", report: str | Path | None = None, *,
             progress: bool | None = None, **sweep_options) -> DemoResult:
    """Generate the digits folder if missing, sweep every stage with both classifiers, and save
    the best layer's SVM as ``<report>/best-svm.joblib``."""
    data = Path(data)
    written = write_digits(data)["written"] if not data.exists() else 0
    result = sweep(data, [DEFAULT_MODEL], "all-stages", ["svm", "softmax"], report=report,
                   progress=progress, **sweep_options)
    table = result.table
    svm = table[(table["layer"] == result.best["layer"]) & (table["classifier"] == "svm")].iloc[0]
    saved = copy_model(svm["model_file"], Path(result.report) / "best-svm.joblib", overwrite=True)
    return DemoResult(sweep=result, model_file=str(saved), model_layer=svm["layer"], data_written=written)

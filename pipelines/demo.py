"""``cnncodes demo``: the whole recipe on the embedded default, nothing to download.

Digits (scikit-learn's 8x8 handwritten digits, upscaled) are about as unlike ImageNet's photos
as images get, so sweeping every stage of EfficientNet-Lite0 on them is a fair small test of
the advice "for data unlike ImageNet, an earlier layer may transfer better".
"""
from __future__ import annotations

from pathlib import Path

from cnncodes.extractor import DEFAULT_MODEL

from cnncodes.pipelines.probes.artifacts import copy_model
from cnncodes.pipelines.sample_data import write_digits
from cnncodes.pipelines.sweep.runner import sweep


def run_demo(data: str | Path = "data/digits", report: str | Path | None = None, *,
             progress: bool | None = None, **sweep_options):
    """Generate the digits folder if missing, sweep every stage with both classifiers, and save
    the best layer's SVM as ``<report>/best-svm.joblib``.

    Returns the sweep's DataFrame; ``df.attrs["model_file"]`` is the saved SVM and
    ``df.attrs["data_written"]`` how many images were generated (0 when the folder was there).
    """
    data = Path(data)
    written = write_digits(data)["written"] if not data.exists() else 0
    df = sweep(data, [DEFAULT_MODEL], "all-stages", ["svm", "softmax"], report=report,
               progress=progress, **sweep_options)
    best = df.attrs["best"]
    svm = df[(df["layer"] == best["layer"]) & (df["classifier"] == "svm")].iloc[0]
    df.attrs["model_file"] = str(copy_model(svm["model_file"], Path(df.attrs["report"]) / "best-svm.joblib",
                                            overwrite=True))
    df.attrs["model_layer"] = svm["layer"]
    df.attrs["data_written"] = written
    return df

"""The data sets cnncodes' advice was checked on: their place on the size x similarity plane
and the strategy ``compare`` found best, drawn in every advice report for comparison.

Measured with ``cnncodes advise`` (EfficientNet-Lite0, ImageNet weights) and, for "best", with
``cnncodes compare`` (docs/benchmarks.md); updated by hand when those figures change.
"""
REFERENCE: dict[str, dict] = {
    # cnncodes advise data/digits (800 of 1,437 training images; 2026-12-06)
    "digits": {"per_class_median": 144.5, "normalised_entropy": 0.794, "leep_gain": 0.036,
               "best": "stage4 probe (compare not run yet)"},
    # cnncodes advise caltech101-mini (707 of 1,515; 2026-12-06); compare: probe best (1+2 epochs)
    "Caltech-101 mini": {"per_class_median": 15.0, "normalised_entropy": 0.405, "leep_gain": 0.693,
                         "best": "probe"},
}

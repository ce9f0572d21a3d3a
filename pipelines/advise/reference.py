"""The data sets cnncodes' advice was checked on: their place on the size x similarity plane
and the strategy ``compare`` found best, drawn in every advice report for comparison.

Measured with ``cnncodes advise`` (EfficientNet-Lite0, ImageNet weights) and, for "best", with
``benchmarks/advise.py`` (docs/advise.md); updated by hand when those figures change.
"""
REFERENCE: dict[str, dict] = {
    # cnncodes advise data/digits (800 of 1,437 training images; 2026-12-06)
    "digits": {"per_class_median": 144.5, "normalised_entropy": 0.794, "leep_gain": 0.036,
               "best": "stage4 probe"},
    # benchmarks/advise.py (2026-12-07): fine-tuning everything 6.2 points above the best probe
    "Omniglot alphabets": {"per_class_median": 375.0, "normalised_entropy": 0.695, "leep_gain": 0.103,
                           "best": "fine-tune everything"},
    # cnncodes advise caltech101-mini (707 of 1,515; 2026-12-06); benchmarks/advise.py: the top
    # stage fine-tuned 0.8 points above the probe (1 + 2 epochs), the probe the advice
    "Caltech-101 mini": {"per_class_median": 15.0, "normalised_entropy": 0.405, "leep_gain": 0.693,
                         "best": "fine-tune the top stage (probe within 0.8)"},
}

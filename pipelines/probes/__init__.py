"""Linear probes on cached codes: reading them, fitting, scoring, saving, predicting.

``codes`` and ``classifiers`` never import torch on a CPU; with the batched solver (the default)
nor scikit-learn.
"""
from cnncodes._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    **dict.fromkeys(["Codes", "CodesError", "load_codes"], ".codes"),
    **dict.fromkeys(["FitResult", "fit_linear_probe", "make_pipeline"], ".classifiers"),
    **dict.fromkeys(["SavedModel", "load_model", "save_model"], ".artifacts"),
    **dict.fromkeys(["evaluate_model", "predict_images"], ".predict"),
})

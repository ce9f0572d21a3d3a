"""Layer sweeps: which layer of which backbone should a linear classifier read?"""
from cnncodes._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    **dict.fromkeys(["sweep", "run_sweep", "sweep_layers"], ".runner"),
    **dict.fromkeys(["SweepSettings", "default_report_dir"], ".settings"),
    "SweepResult": ".report",
})

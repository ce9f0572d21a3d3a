"""Transfer-learning strategies side by side: probe, fine-tune top / all, from scratch."""
from cnncodes._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    **dict.fromkeys(["compare", "STRATEGIES", "default_compare_dir"], ".strategies"),
    "CompareResult": ".report",
})

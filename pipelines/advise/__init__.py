"""``cnncodes advise``: where a data set sits on the transfer rule's two axes, measured, and
what to run."""
from cnncodes._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    **dict.fromkeys(["advise", "Advice"], ".runner"),
    **dict.fromkeys(["recommend", "Recommendation"], ".rule"),
    "write_advice_report": ".report",
})

"""Staged fine-tuning: new head, freeze/unfreeze, discriminative learning rates, checkpoints."""
from cnncodes._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    **dict.fromkeys(["FinetuneConfig", "default_run_dir", "recipe_settings"], ".config"),
    "finetune": ".training",
    "FinetuneResult": ".result",
    "FinetuneError": ".freezing",
})

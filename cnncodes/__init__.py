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
from ._lazy import lazy_exports

_exports_getattr, __dir__ = lazy_exports(__name__, {
    "extract": ".extractor", "open_cache": ".extractor", "list_layers": ".extractor",
    "list_models": ".extractor", "load_backbone": ".extractor", "Recipe": ".extractor",
    "CnnCodesError": ".extractor",
})


def __getattr__(name: str):
    if name == "__version__":  # looked up when asked for: importlib.metadata costs 35 ms
        from importlib import metadata
        try:
            version = metadata.version("cnncodes")
        except metadata.PackageNotFoundError:  # run from a source tree that was never installed
            version = "0+unknown"
        globals()["__version__"] = version
        return version
    return _exports_getattr(name)

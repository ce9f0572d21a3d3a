"""cnncodes' extractor: pretrained CNN layers over an image folder into an HDF5 cache.

Names are exported lazily (PEP 562): ``cnncodes.extractor.open_cache`` needs numpy and h5py
only, and torch is imported the first time something that runs a network is used.

Examples
--------
>>> from cnncodes import extractor
>>> result = extractor.extract("data/digits", layers=["stage3", "penultimate"])  # doctest: +SKIP
>>> with extractor.open_cache(result.path) as cache:                            # doctest: +SKIP
...     X, y = cache.codes("penultimate"), cache.labels
"""
from cnncodes._lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(["DEFAULT_MODEL", "Backbone"], ".backbones.backbone"),
    **dict.fromkeys(["list_models", "load_backbone", "list_layers"], ".backbones.loading"),
    **dict.fromkeys(["Cache", "open_cache"], ".cache"),
    **dict.fromkeys(["ExtractionPlan", "plan_extraction"], ".plan"),
    **dict.fromkeys(["ExtractResult", "ExtractionInterrupted"], ".cache_run"),
    "extract": ".engine",
    "encode_images": ".encoding",
    **dict.fromkeys(["CacheError", "CacheLockedError", "CnnCodesError", "ImageDecodeError",
                     "ImageSourceError",
                     "IncompatibleCacheError", "LayerNotFoundError", "ModelNotFoundError", "PoolingError",
                     "SettingsError", "WeightsNotFoundError"], ".errors"),
    **dict.fromkeys(["ImageTable", "load_rgb"], ".images"),
    "find_images": ".sources",
    **dict.fromkeys(["Probe", "Tapper"], ".layers"),
    "parse_pooling": ".pooling",
    "Recipe": ".recipe",
    **dict.fromkeys(["library_versions", "sha256_of"], ".provenance"),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)

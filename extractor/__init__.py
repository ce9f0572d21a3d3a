"""cnncodes' extractor: pretrained CNN layers over an image folder into an HDF5 cache.

Examples
--------
>>> import extractor
>>> result = extractor.extract("data/digits", layers=["stage3", "penultimate"])  # doctest: +SKIP
>>> with extractor.open_cache(result.path) as cache:                            # doctest: +SKIP
...     X, y = cache.codes("penultimate"), cache.labels
"""
from .backbones import DEFAULT_MODEL, Backbone, list_models, load_backbone
from .cache import Cache, open_cache
from .engine import ExtractResult, ExtractionInterrupted, encode_images, extract
from .errors import (CacheError, CacheLockedError, CnnCodesError, ImageDecodeError, ImageSourceError,
                     IncompatibleCacheError, LayerNotFoundError, ModelNotFoundError, PoolingError,
                     WeightsNotFoundError)
from .images import ImageTable, find_images, load_rgb
from .layers import Probe, Tapper
from .pooling import parse_pooling


def list_layers(model: str = DEFAULT_MODEL, weights: str | None = "none") -> tuple[list, dict]:
    """Every tappable layer of ``model`` (name, type, shape, stride) and what each alias means.

    Weights do not change shapes, so the default builds the architecture without loading any.
    """
    bb = load_backbone(model, weights)
    probe = Probe(bb.model, bb.input_size, model)
    return probe.layers, probe.aliases()


__all__ = ["DEFAULT_MODEL", "Backbone", "Cache", "CacheError", "CacheLockedError", "CnnCodesError",
           "ExtractResult", "ExtractionInterrupted", "encode_images", "ImageDecodeError", "ImageSourceError",
           "ImageTable", "IncompatibleCacheError", "LayerNotFoundError", "ModelNotFoundError",
           "PoolingError", "Probe", "Tapper", "WeightsNotFoundError", "extract", "find_images",
           "list_layers", "list_models", "load_backbone", "load_rgb", "open_cache", "parse_pooling"]

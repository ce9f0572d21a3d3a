"""How images are decoded and resized before the network sees them: one recipe key, ``decode``.

- ``reduced`` (the default for new caches): Pillow decodes each image at the smallest scale
  that still has the pixels the weights' resize needs (a JPEG at 1/2, 1/4 or 1/8 through
  libjpeg's DCT scaling; other formats box-reduced by an integer factor after decoding, see
  :func:`.images.decode_rgb`), then the weights' exact resize and crop. On a 12-megapixel phone
  photo that skips nearly all of the decoding and resampling; on an image smaller than twice
  the resize it changes nothing (bitwise the exact path).
- ``exact``: Pillow at full size and the weights' own transform, bitwise (called ``cpu``
  before ``reduced`` existed: caches and commands that say ``cpu`` mean this).
- ``gpu``: nvJPEG and tensor resizing on a CUDA device (:mod:`.device_decode`).

``auto`` resolves before the recipe is written: an existing cache keeps the path it was made
with (as ``--runtime auto`` keeps a cache's runtime), a new one is the backbone's own default:
``reduced``, except for models whose preprocessing is a library's own processor (``hf:``,
``openclip:``), whose codes users compare with that library's and which stay ``exact``. No
torch here: readers of caches use it.
"""
from __future__ import annotations

from .errors import SettingsError

DECODES = ("reduced", "exact", "gpu")
DEFAULT_DECODE = "reduced"
# The exact path's name before `reduced` existed, in caches and on command lines.
_FORMER_NAMES = {"cpu": "exact"}


def canonical_decode(name: str | None) -> str:
    """A decode path's current name (``cpu`` -> ``exact``); caches that name none are ``exact``."""
    return _FORMER_NAMES.get(name or "exact", name or "exact")


def requested_decode(name: str | None) -> str:
    """``auto`` or one of :data:`DECODES` for a ``decode`` argument; a one-line error otherwise."""
    name = "auto" if name is None else canonical_decode(name)
    if name != "auto" and name not in DECODES:
        raise SettingsError(f"decode must be auto or one of {', '.join(DECODES)}, got {name!r}.")
    return name


def resolve_decode(name: str | None, cached: str | None = None, default: str = DEFAULT_DECODE) -> str:
    """The decode path of a run: the one named, else the existing cache's, else ``default``
    (the backbone's, ``Backbone.decode``)."""
    name = requested_decode(name)
    if name != "auto":
        return name
    return canonical_decode(cached) if cached else default


def decode_min_size(decode: str, preprocessing: dict) -> tuple[int, int] | None:
    """The ``min_size`` of :func:`.images.decode_rgb` for ``decode`` (None: full size).

    The weights' preprocessing resizes the short side to ``resize`` (and crops): a decode with
    at least ``resize`` pixels on both sides holds everything that resize reads.
    """
    if decode != "reduced":
        return None
    size = preprocessing.get("resize") if preprocessing else None
    return (int(size), int(size)) if isinstance(size, (int, float)) and size > 0 else None

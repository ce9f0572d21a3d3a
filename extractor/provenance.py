"""What produced a file: library versions and content hashes. Standard library only, so that
reading a cache or a saved model's metadata never imports torch."""
from __future__ import annotations

import hashlib
import os
from importlib import metadata

_DISTRIBUTIONS = ("cnncodes", "torch", "torchvision", "timm", "h5py", "numpy", "pillow", "scikit-learn",
                  "transformers", "open_clip_torch")


def library_versions() -> dict[str, str]:
    """Installed versions of cnncodes and the libraries whose versions change its results."""
    out = {}
    for dist in _DISTRIBUTIONS:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def sha256_of(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

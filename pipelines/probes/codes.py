"""Reading a cache's codes for a classifier: the rows that can be used, and why others cannot."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from cnncodes.extractor.cache import DONE, FAILED, content_digest, open_cache
from cnncodes.extractor.errors import CacheError


class CodesError(CacheError):
    """The codes of a cache cannot feed a classifier as asked (incomplete, bad values...)."""


@dataclass
class Codes:
    """Usable rows of one layer of a cache.

    Attributes
    ----------
    X : numpy.ndarray
        n x D float32 codes.
    y : numpy.ndarray
        int64 class indices.
    splits : numpy.ndarray
        ``train``/``val``/``test``/``""`` per row.
    rows : numpy.ndarray
        Row index of each sample in the cache.
    """

    path: Path
    layer: str
    X: np.ndarray
    y: np.ndarray
    splits: np.ndarray
    rows: np.ndarray
    paths: list[str]
    classes: list[str]
    attrs: dict
    layer_attrs: dict
    excluded: dict = field(default_factory=dict)  # reason -> count

    @property
    def has_test_split(self) -> bool:
        return bool((self.splits == "test").any())

    def take(self, keep, splits=None) -> Codes:
        """The codes of the rows ``keep`` (positions or a boolean mask), optionally with other
        ``splits`` for them."""
        keep = np.flatnonzero(keep) if np.asarray(keep).dtype == bool else np.asarray(keep)
        return replace(self, X=self.X[keep], y=self.y[keep], rows=self.rows[keep],
                       splits=self.splits[keep] if splits is None else np.asarray(splits, dtype=object),
                       paths=[self.paths[i] for i in keep])


def load_codes(path: str | Path, layer: str | None = None, allow_incomplete: bool = False,
               before_read=None) -> Codes:
    """Codes of ``layer`` (default: the cache's only layer, or ``penultimate``) ready for fitting.

    Failed and unlabelled rows are excluded and counted; an incomplete cache is refused unless
    ``allow_incomplete``; NaN or infinite codes are an error naming the rows. ``before_read(n,
    d)`` is called with the shape of the codes before they are read (to start work that the
    read then overlaps).
    """
    path = Path(path)
    with open_cache(path) as c:
        layers = c.layers
        if layer is None:
            if len(layers) == 1:
                layer = layers[0]
            elif "penultimate" in layers:
                layer = "penultimate"
            else:
                raise CodesError(f"{path} holds several layers ({', '.join(layers)}): "
                                 f"choose one with --layer.")
        if layer not in layers:
            raise CodesError(f"layer '{layer}' is not in {path}; it holds: {', '.join(layers)}.")
        status = c.status
        if not c.complete and not allow_incomplete:
            pending = int((status == 0).sum())
            raise CodesError(
                f"{path} is incomplete ({pending} of {len(status)} images not extracted yet): rerun "
                f"'cnncodes extract' to finish it, or pass --allow-incomplete to use the finished rows.")
        labels = c.labels
        keep = (status == DONE) & (labels >= 0)
        excluded = {"failed": int((status == FAILED).sum()), "pending": int((status == 0).sum()),
                    "unlabelled": int(((status == DONE) & (labels < 0)).sum())}
        rows = np.flatnonzero(keep)
        if before_read is not None:
            before_read(len(rows), c.dim(layer))
        X = c.codes(layer, rows, dtype=np.float32)
        all_paths = c.paths
        step = max(1, (16 << 20) // max(1, X[:1].nbytes))  # blocks: no n x D mask of booleans
        bad = np.concatenate([~np.isfinite(X[lo:lo + step]).all(axis=1) for lo in range(0, len(X), step)]
                             or [np.zeros(0, bool)])
        if bad.any():
            names = [all_paths[r] for r in rows[bad][:5]]
            raise CodesError(f"{int(bad.sum())} rows of layer '{layer}' hold NaN or infinite codes "
                             f"(e.g. {', '.join(names)}); re-extract them (--overwrite) or remove them.")
        attrs = {**c.attrs, "content_digest": content_digest(c.content)}  # what records built on it key on
        return Codes(path, layer, X, labels[rows], c.splits[rows], rows, [all_paths[r] for r in rows],
                     c.classes, attrs, c.layer_attrs(layer), {k: v for k, v in excluded.items() if v})

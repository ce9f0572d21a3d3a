"""Pooling a layer's N x C x H x W activations into N x D codes.

``avg`` | ``max`` | ``avgmax`` (both, concatenated) | ``grid:K`` (K x K average grid) |
``spp:1,2,4`` (spatial pyramid of max pools, He et al. 2014) | ``none`` (flattened C*H*W).
Flattened outputs are channel-major (C, then the grid cells). Inputs that are already vectors
(N x D, such as ``penultimate``) pass through unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import PoolingError

_HELP = "expected avg, max, avgmax, grid:K, spp:1,2,4 or none"


@dataclass(frozen=True)
class Pooling:
    """A parsed pooling specification; ``str(p)`` gives it back in canonical form."""

    kind: str
    sizes: tuple[int, ...] = ()

    def __str__(self) -> str:
        return f"{self.kind}:{','.join(map(str, self.sizes))}" if self.sizes else self.kind

    def dim(self, shape: tuple[int, ...]) -> int:
        """Code length for one unpooled activation of ``shape`` (C, H, W) or (D,)."""
        if len(shape) == 1:
            return shape[0]
        c, h, w = shape
        return {"avg": c, "max": c, "avgmax": 2 * c, "none": c * h * w,
                "grid": c * sum(k * k for k in self.sizes),
                "spp": c * sum(k * k for k in self.sizes)}[self.kind]

    def check(self, shape: tuple[int, ...], layer: str) -> None:
        """Refuse a grid or pyramid finer than the feature map of ``layer`` (adaptive pooling
        would upsample it: ``grid:30`` on a 7x7 map makes 900 copies of 49 values)."""
        if len(shape) != 3 or self.kind not in ("grid", "spp"):
            return
        _, h, w = shape
        if max(self.sizes) > min(h, w):
            raise PoolingError(f"'{self}' asks for {max(self.sizes)}x{max(self.sizes)} cells, "
                               f"but '{layer}' is "
                               f"a {h}x{w} map: use sizes up to {min(h, w)}, or another layer.")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 2:
            return x
        if x.ndim != 4:
            raise PoolingError(f"cannot pool a {x.ndim}-d activation {tuple(x.shape)}: only "
                               f"N x C x H x W feature maps and N x D vectors are supported.")
        if self.kind == "avg":
            return x.mean(dim=(2, 3))
        if self.kind == "max":
            return x.amax(dim=(2, 3))
        if self.kind == "avgmax":
            return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)
        if self.kind == "grid":
            return F.adaptive_avg_pool2d(x, self.sizes[0]).flatten(1)
        if self.kind == "spp":
            return torch.cat([F.adaptive_max_pool2d(x, k).flatten(1) for k in self.sizes], dim=1)
        return x.flatten(1)


def parse_pooling(spec: str | Pooling) -> Pooling:
    """Parse ``avg``, ``grid:2``, ``spp:1,2,4`` ...

    Examples
    --------
    >>> str(parse_pooling("spp:1, 2,4"))
    'spp:1,2,4'
    """
    if isinstance(spec, Pooling):
        return spec
    text = str(spec).strip().lower()
    kind, _, arg = text.partition(":")
    if kind in ("avg", "max", "avgmax", "none") and not arg:
        return Pooling(kind)
    if kind in ("grid", "spp") and arg:
        try:
            sizes = tuple(int(a) for a in arg.split(","))
        except ValueError:
            raise PoolingError(f"'{spec}': sizes must be integers, {_HELP}.") from None
        if not sizes or any(s < 1 for s in sizes) or (kind == "grid" and len(sizes) != 1):
            raise PoolingError(
                f"'{spec}': {'grid takes one size K >= 1' if kind == 'grid' else 'spp sizes must be >= 1'}.")
        return Pooling(kind, sizes)
    raise PoolingError(f"'{spec}' is not a pooling: {_HELP}.")

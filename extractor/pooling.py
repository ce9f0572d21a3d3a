"""Pooling a layer's activations into one code per image.

``avg`` | ``max`` | ``avgmax`` (both, concatenated) | ``grid:K`` (K x K average grid) |
``spp:1,2,4`` (spatial pyramid of max pools, He et al. 2014) | ``none`` (flattened), and for
token sequences ``cls`` (the first prefix token), ``mean`` (the mean of the patch tokens) and
``cls+mean`` (both concatenated, as DINOv2's linear evaluation does).

What each means depends on the layer's kind (:class:`~.layer_kinds.Layout`):

- feature maps (N x C x H x W) pool over H x W; channels-last maps (N x H x W x C) pool exactly
  like them (``none`` flattens both channel-major: C, then the cells); ``mean`` is ``avg``;
- token sequences (N x T x D): ``avg``/``mean``, ``max`` and ``avgmax`` reduce the patch tokens
  only (the prefix tokens are left out), ``grid``/``spp`` pool the patch tokens laid out on their
  grid, ``none`` flattens every token (token-major);
- vectors (N x D, such as ``penultimate``) pass through unchanged, whatever the pooling.

A combination that means nothing (``cls`` of a feature map, ``cls`` of tokens without a prefix
token, anything of an attention module's internals) is refused by :meth:`Pooling.refusal`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import PoolingError
from .layer_kinds import INTERNAL, MAP, MAP_NHWC, TOKENS, VECTOR, Layout, layout_of_shape

_HELP = "expected avg, max, avgmax, mean, cls, cls+mean, grid:K, spp:1,2,4 or none"
_TOKEN_ONLY = ("cls", "cls+mean")


@dataclass(frozen=True)
class Pooling:
    """A parsed pooling specification; ``str(p)`` gives it back in canonical form."""

    kind: str
    sizes: tuple[int, ...] = ()

    def __str__(self) -> str:
        return f"{self.kind}:{','.join(map(str, self.sizes))}" if self.sizes else self.kind

    def dim(self, layout: Layout | tuple) -> int:
        """Code length for one unpooled activation of this layout (or a (C, H, W) / (D,) shape)."""
        layout = _layout(layout)
        if layout.kind == VECTOR:
            return layout.channels
        c = layout.channels
        cells = sum(k * k for k in self.sizes)
        if layout.kind == TOKENS:
            t = layout.shape[0]
            return {"none": t * c, "avgmax": 2 * c, "cls+mean": 2 * c, "grid": c * cells,
                    "spp": c * cells}.get(self.kind, c)
        h, w = layout.grid
        return {"avg": c, "mean": c, "max": c, "avgmax": 2 * c, "none": c * h * w,
                "grid": c * cells, "spp": c * cells}.get(self.kind, c)

    def refusal(self, layout: Layout | tuple) -> str | None:
        """Why this pooling cannot apply to a layer of ``layout``; None when it can."""
        layout = _layout(layout)
        if layout.kind == INTERNAL:
            dims = "x".join(map(str, layout.shape))
            return f"an internal tensor ({dims}), {layout.why}: it has no per-image pooling"
        if layout.kind == VECTOR:
            return None
        if self.kind in _TOKEN_ONLY:
            if layout.kind != TOKENS:
                return f"a feature map ({layout.describe()}): '{self}' needs a token layer"
            if layout.prefix < 1:
                return f"{layout.describe()} with no prefix (CLS) token: '{self}' needs one; use mean"
            if not layout.class_token:
                return (f"{layout.describe()} whose prefix tokens are registers, with no class token: "
                        f"'{self}' needs one; use mean")
        if self.kind in ("grid", "spp"):
            if layout.grid is None:
                return f"{layout.describe()} whose patch tokens form no grid: '{self}' needs one"
            h, w = layout.grid
            if max(self.sizes) > min(h, w):
                # adaptive pooling would upsample: grid:30 on a 7x7 map makes 900 copies of 49 values
                return (f"a {h}x{w} {'token grid' if layout.kind == TOKENS else 'map'}, but '{self}' asks "
                        f"for {max(self.sizes)}x{max(self.sizes)} cells: use sizes up to {min(h, w)}")
        return None

    def check(self, layout: Layout | tuple, layer: str) -> None:
        """Raise :class:`PoolingError` when this pooling cannot apply to ``layer``."""
        why = self.refusal(layout)
        if why:
            raise PoolingError(f"'{layer}' is {why}.")

    def __call__(self, x: torch.Tensor, layout: Layout | None = None) -> torch.Tensor:
        layout = layout or layout_of_shape(x.shape[1:])
        if layout.kind == VECTOR or x.ndim == 2:
            return x.flatten(1).clone()  # a later in-place op (ReLU(inplace=True)) must not change it
        if layout.kind == TOKENS:
            return self._tokens(x, layout)
        if layout.kind == MAP_NHWC:
            x = x.permute(0, 3, 1, 2)
        if layout.kind not in (MAP, MAP_NHWC) or x.ndim != 4:
            raise PoolingError(f"cannot pool a {x.ndim}-d activation {tuple(x.shape)}: "
                               f"{self.refusal(layout)}.")
        return self._map(x)

    def _map(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind in ("avg", "mean"):
            return x.mean(dim=(2, 3))
        if self.kind == "max":
            return x.amax(dim=(2, 3))
        if self.kind == "avgmax":
            return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)
        if self.kind == "grid":
            return F.adaptive_avg_pool2d(x, self.sizes[0]).flatten(1)
        if self.kind == "spp":
            return torch.cat([F.adaptive_max_pool2d(x, k).flatten(1) for k in self.sizes], dim=1)
        if self.kind == "none":
            return x.flatten(1).clone()  # a copy: a later in-place op must not change the codes
        raise PoolingError(f"'{self}' does not apply to feature maps: it needs a token layer.")

    def _tokens(self, x: torch.Tensor, layout: Layout) -> torch.Tensor:
        patches = x[:, layout.prefix:]
        if self.kind in ("avg", "mean"):
            return patches.mean(dim=1)
        if self.kind == "max":
            return patches.amax(dim=1)
        if self.kind == "avgmax":
            return torch.cat([patches.mean(dim=1), patches.amax(dim=1)], dim=1)
        if self.kind == "cls":
            return x[:, 0].clone()
        if self.kind == "cls+mean":
            return torch.cat([x[:, 0], patches.mean(dim=1)], dim=1)
        if self.kind == "none":
            return x.flatten(1).clone()
        h, w = layout.grid
        return self._map(patches.reshape(x.shape[0], h, w, x.shape[2]).permute(0, 3, 1, 2))


def _layout(layout: Layout | tuple) -> Layout:
    return layout if isinstance(layout, Layout) else layout_of_shape(layout)


def parse_pooling(spec: str | Pooling) -> Pooling:
    """Parse ``avg``, ``cls+mean``, ``grid:2``, ``spp:1,2,4`` ...

    Examples
    --------
    >>> str(parse_pooling("spp:1, 2,4"))
    'spp:1,2,4'
    """
    if isinstance(spec, Pooling):
        return spec
    text = str(spec).strip().lower().replace(" ", "")
    kind, _, arg = text.partition(":")
    if kind in ("avg", "max", "avgmax", "mean", "cls", "cls+mean", "none") and not arg:
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

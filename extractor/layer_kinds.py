"""What each layer's activation is, read from the model: a feature map, a channels-last map, a
token sequence with its prefix tokens, a vector, or an internal tensor with no per-image pooling.

The probe (:mod:`.layers`) runs the model once at a square input and records every module's
output shape; this module turns those shapes into :class:`Layout` s, with what the model says
about itself taking precedence over what a shape suggests:

- the batch dimension: an output whose first dimension is not the images' (Swin's window
  attention runs on windows) is internal;
- attention modules (``Attention``, ``WindowAttention``, ``nn.MultiheadAttention`` ...): what
  runs inside one (q/k/v projections and splits, attention weights) is internal, the module's
  own output is a layer like any other;
- timm's ``num_prefix_tokens`` and ``patch_embed.grid_size`` (torchvision's ``class_token`` and
  the patch convolution's map elsewhere) say how many of a sequence's tokens are prefix
  tokens (CLS, distillation, registers) and which grid the patch tokens form;
- for 4-d outputs, the module's type (a ``Conv2d``/``BatchNorm2d``/``LayerNorm2d`` writes
  N x C x H x W, a ``Linear``/``LayerNorm`` on a 4-d tensor writes N x H x W x C), then the
  one reading a square input leaves (the two spatial sides are equal), then, for a container
  whose output is a cube (C = H = W), what its own last module of that shape wrote, then
  timm's ``output_fmt``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

MAP, MAP_NHWC, TOKENS, VECTOR, INTERNAL = "map", "map-channels-last", "tokens", "vector", "internal"
POOLABLE = (MAP, MAP_NHWC, TOKENS, VECTOR)

_PREFIX_PARAMS = ("cls_token", "class_token", "dist_token", "reg_token", "register_tokens")


@dataclass(frozen=True)
class Layout:
    """The kind of one layer's activation, per image.

    Examples
    --------
    >>> Layout(TOKENS, (197, 192), prefix=1, grid=(14, 14)).describe()
    '1+196 tokens x 192'
    >>> Layout(MAP_NHWC, (7, 7, 768), grid=(7, 7)).describe()
    '7x7x768 (channels-last)'
    """

    kind: str
    shape: tuple           # the output's shape without the batch dimension
    prefix: int = 0        # tokens: leading prefix tokens (CLS, distillation, registers)
    grid: tuple | None = None  # maps: (H, W); tokens: the patch tokens' (h, w) when they form a grid
    why: str = ""          # internal: why no pooling applies
    class_token: bool = True  # tokens: whether the first prefix token is a class token (not a register)

    @property
    def channels(self) -> int:
        """C of a map, D of tokens or of a vector."""
        return int(self.shape[0] if self.kind == MAP else self.shape[-1])

    @property
    def patches(self) -> int:
        """Tokens after the prefix (the patch tokens)."""
        return int(self.shape[0]) - self.prefix if self.kind == TOKENS else 0

    def describe(self) -> str:
        dims = "x".join(map(str, self.shape))
        if self.kind == TOKENS:
            count = f"{self.prefix}+{self.patches}" if self.prefix else f"{self.patches}"
            return f"{count} tokens x {self.channels}"
        if self.kind == MAP_NHWC:
            return f"{dims} (channels-last)"
        if self.kind == INTERNAL:
            return f"{dims} (internal)"
        return dims

    def stride(self, input_size: int) -> int | None:
        """The nominal stride (a power of two) of a map or of a token grid; None for vectors,
        1x1 maps (global pools) and tokens that form no grid."""
        if self.kind in (MAP, MAP_NHWC, TOKENS) and self.grid and self.grid[1] > 1:
            return 2 ** round(math.log2(input_size / self.grid[1]))
        return None

    def to_attrs(self) -> dict:
        out = {"kind": self.kind}
        if self.kind == TOKENS:
            out.update(prefix_tokens=self.prefix, patch_tokens=self.patches, class_token=self.class_token)
        if self.grid:
            out["grid"] = list(self.grid)
        return out


def layout_of_shape(shape) -> Layout:
    """The layout a bare shape stands for where no probe said more: (C, H, W) is a feature map,
    (D,) a vector, anything else internal."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 1:
        return Layout(VECTOR, shape)
    if len(shape) == 3:
        return Layout(MAP, shape, grid=shape[1:])
    return Layout(INTERNAL, shape, why="neither a feature map nor a vector")


@dataclass
class Record:
    """What the probe saw of one module: its output and input shapes with the batch dimension."""

    name: str
    module: nn.Module
    out_shape: tuple
    in_shape: tuple | None
    order: int
    start: int


def is_attention(module: nn.Module) -> bool:
    """Attention modules by their class: timm's ``Attention``, ``WindowAttention``, ``ClassAttn``
    ..., torchvision's ``ShiftedWindowAttention``, ``nn.MultiheadAttention``."""
    name = type(module).__name__
    return isinstance(module, nn.MultiheadAttention) or "Attention" in name or name.endswith("Attn")


def prefix_tokens(model: nn.Module) -> int:
    """How many tokens a sequence carries before its patch tokens: timm's ``num_prefix_tokens``,
    else the learned prefix parameters of the model's root (torchvision's ``class_token``)."""
    n = getattr(model, "num_prefix_tokens", None)
    if isinstance(n, int):
        return n
    return sum(int(p.shape[1]) for name, p in model.named_parameters(recurse=False)
               if name in _PREFIX_PARAMS and p.ndim == 3)


def patch_grid(model: nn.Module) -> tuple[int, int] | None:
    """timm's patch grid (``patch_embed.grid_size``) at the model's input size, if it has one."""
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is not None and len(grid) == 2:
        return int(grid[0]), int(grid[1])
    return None


_NCHW_NORMS = (nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


def _evidence(module: nn.Module) -> str | None:
    """The 4-d layout a module's type implies, if any."""
    name = type(module).__name__
    if name.endswith("2d") or isinstance(module, _NCHW_NORMS):  # Conv2d, LayerNorm2d, MaxPool2d...
        return MAP
    if isinstance(module, (nn.Linear, nn.LayerNorm)) or name in ("RmsNorm", "LayerNorm"):
        return MAP_NHWC  # they act on the last dimension: a 4-d input is N x H x W x C
    return None


def _square(kind: str, shape: tuple) -> bool:
    return shape[1] == shape[2] if kind == MAP else shape[0] == shape[1]


class Classifier:
    """Layouts of one probe's records, in execution order."""

    def __init__(self, model: nn.Module, records: list[Record], batch: int):
        self.records = records
        self.batch = batch
        self.prefix = prefix_tokens(model)
        self.class_token = getattr(model, "has_class_token", True) is not False  # timm's ViT without CLS
        self.grid = patch_grid(model)
        self.output_fmt = str(getattr(model, "output_fmt", "") or "").upper()
        modules = dict(model.named_modules())
        self.attention = [n for n, m in modules.items() if n and is_attention(m)]
        self.layouts: dict[str, Layout] = {}
        self._last_map: tuple[int, int] | None = None
        for r in records:
            self.layouts[r.name] = self._classify(r)

    def _inside_attention(self, name: str) -> str | None:
        return next((a for a in self.attention if name.startswith(a + ".")), None)

    def _classify(self, r: Record) -> Layout:
        shape = tuple(int(s) for s in r.out_shape[1:])
        if not r.out_shape or r.out_shape[0] != self.batch:
            return Layout(INTERNAL, shape, why="not one row per image (its first dimension is "
                                               f"{r.out_shape[0] if r.out_shape else '-'}: windows or heads)")
        attn = self._inside_attention(r.name)
        if attn:
            return Layout(INTERNAL, shape, why=f"inside the attention module '{attn}' (tap '{attn}' itself)")
        if len(shape) == 1:
            return Layout(VECTOR, shape)
        if len(shape) == 2 and shape[-1] == 1:  # (C, 1): a 1-d pool's output (Swin's pooler), not C tokens
            return Layout(INTERNAL, shape,
                          why="a (C, 1) pooled tensor, not tokens (tap the layer that reads it)")
        if len(shape) == 2:
            return self._tokens(shape)
        if len(shape) == 3:
            kind = self._map_kind(r, shape)
            if kind is None:
                return Layout(INTERNAL, shape, why="neither a feature map nor a token sequence")
            grid = shape[1:] if kind == MAP else shape[:2]
            self._last_map = grid
            return Layout(kind, shape, grid=tuple(grid))
        return Layout(INTERNAL, shape, why=f"a {len(shape)}-d activation per image")

    def _tokens(self, shape: tuple) -> Layout:
        t = shape[0]
        grid = self.grid or self._last_map  # torchvision's ViT: the patch convolution's map
        n_patch = grid[0] * grid[1] if grid else None
        if not self.prefix or t <= self.prefix:
            prefix = 0
        elif n_patch and t in (n_patch, n_patch + self.prefix):
            prefix = self.prefix if t == n_patch + self.prefix else 0
        else:  # another grid than timm's (a dynamic input size): prefix + a square, or no prefix
            side = math.isqrt(t - self.prefix)
            prefix = self.prefix if side * side == t - self.prefix else 0
        patches = t - prefix
        if grid and patches == n_patch:
            g = tuple(grid)
        else:
            side = math.isqrt(patches)
            g = (side, side) if side * side == patches and patches > 1 else None
        return Layout(TOKENS, shape, prefix=prefix, grid=g, class_token=self.class_token or not prefix)

    def _map_kind(self, r: Record, shape: tuple) -> str | None:
        told = _evidence(r.module)
        if told and _square(told, shape):
            return told
        nchw, nhwc = _square(MAP, shape), _square(MAP_NHWC, shape)
        if nchw != nhwc:
            return MAP if nchw else MAP_NHWC
        if not nchw:
            return None
        # a cube: what the container's own last module of this shape wrote, else the model's format
        inner = [self.layouts[o.name] for o in self.records
                 if o.name.startswith(r.name + ".") and o.order < r.order and o.name in self.layouts
                 and o.out_shape == r.out_shape and self.layouts[o.name].kind in (MAP, MAP_NHWC)]
        if inner:
            return inner[-1].kind
        return MAP_NHWC if self.output_fmt == "NHWC" else MAP

    def input_layout(self, r: Record) -> Layout | None:
        """The layout of a module's input: that of the last output of the same shape before it
        started, else what its shape suggests."""
        if r.in_shape is None or len(r.in_shape) != 4 or r.in_shape[0] != self.batch:
            return None
        same = [o for o in self.records if o.order < r.start and o.out_shape == r.in_shape]
        if same and self.layouts[same[-1].name].kind in (MAP, MAP_NHWC):
            return self.layouts[same[-1].name]
        shape = tuple(r.in_shape[1:])
        if _square(MAP, shape):
            return Layout(MAP, shape, grid=shape[1:])
        if _square(MAP_NHWC, shape):
            return Layout(MAP_NHWC, shape, grid=shape[:2])
        return None

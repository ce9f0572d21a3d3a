"""Layer names -> taps, and a forward pass that stops after the deepest tap.

A tap is read with forward hooks, not torch.fx: FX cannot trace many models (timm's TF "same"
padding models such as ``tf_efficientnet_lite0``). The probe runs the model once on a dummy
batch to learn every module's output shape, stride and execution order; that order defines
"deepest", and a hook on the deepest tap raises to cut the forward pass short, so nothing after
it is computed.

Names: any module name (``layer3``, ``blocks.4``, ``features.28``), or a generic alias:
``stage1``..``stage5`` (the last module whose output has stride 2, 4, 8, 16, 32) and
``penultimate`` (the input of the classifier, i.e. the pooled features that feed it).
"""
from __future__ import annotations

import difflib
import math
import threading
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .errors import LayerNotFoundError
from .pooling import Pooling

ALIASES = ("stage1", "stage2", "stage3", "stage4", "stage5", "penultimate")


@dataclass
class LayerInfo:
    """One tappable module, as seen by the probe."""

    name: str          # module name
    type: str          # module class name
    shape: tuple       # unpooled output shape without the batch dim: (C, H, W) or (D,)
    stride: int | None  # nominal stride (a power of two) of a feature map, else None
    order: int         # position in execution order (when the module's forward returned)
    start: int = 0     # when the module's forward began (a counter shared with ``order``)
    in_stride: int | None = None  # nominal stride of its input
    flops: int = 0     # forward FLOPs of the whole model spent when this module's forward returned
    relative_depth: float = 0.0  # ``flops`` as a share of the whole forward pass

    @property
    def depth(self) -> int:
        return self.name.count(".")


@dataclass
class Tap:
    """A requested layer resolved to a module."""

    name: str     # the name it is stored under (as requested: 'layer3', 'stage4', 'penultimate')
    module: str   # the module it reads
    kind: str     # 'output' (forward hook) or 'input' (forward pre-hook, for 'penultimate')
    shape: tuple
    stride: int | None
    order: int
    relative_depth: float = 0.0  # share of the model's forward FLOPs spent up to this tap
    flops: int = 0               # forward FLOPs per image spent up to this tap


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (list, tuple)):
        for o in out:
            if isinstance(o, torch.Tensor):
                return o
    return None


def _nominal_stride(size: int, out: int) -> int | None:
    """A feature map's stride as a power of two; None for 1x1 maps (global pools), whose
    "stride" is only the input size."""
    return 2 ** round(math.log2(size / out)) if out > 1 else None


class Probe:
    """The result of one forward pass on a dummy batch: every module's output, in order."""

    def __init__(self, model: nn.Module, input_size: int, model_name: str = "the model"):
        self.model_name = model_name
        self.input_size = input_size
        self.layers: list[LayerInfo] = []
        self.classifier: tuple[str, int] | None = None  # (module, input dim) of the last Linear
        seen = set()
        linears = []
        handles = []
        clock = [0]
        starts: dict[str, tuple[int, int | None]] = {}

        def pre_hook(name):
            def fn(module, args):
                if name not in starts:
                    t = _first_tensor(args)
                    in_stride = _nominal_stride(input_size, t.shape[-1]) if t is not None and t.ndim == 4 \
                        else None
                    starts[name] = (clock[0], in_stride, counter.get_total_flops())
                    clock[0] += 1
            return fn

        def hook(name):
            def fn(module, args, out):
                t = _first_tensor(out)
                if name in seen or t is None:
                    return
                seen.add(name)
                shape = tuple(t.shape[1:])
                stride = _nominal_stride(input_size, shape[-1]) if len(shape) == 3 else None
                start, in_stride, _ = starts.get(name, (clock[0], None, 0))
                self.layers.append(LayerInfo(name, type(module).__name__, shape, stride, clock[0],
                                             start, in_stride, counter.get_total_flops()))
                clock[0] += 1
                if isinstance(module, nn.Linear):
                    linears.append((name, int(args[0].flatten(1).shape[1]) if args else module.in_features))
            return fn

        for name, module in model.named_modules():
            if name:
                handles.append(module.register_forward_pre_hook(pre_hook(name)))
                handles.append(module.register_forward_hook(hook(name)))
        was_training = model.training
        model.eval()
        # torch's own FLOP counter (convolutions and matrix products, which are nearly all of a
        # CNN's work) read at every hook gives each layer's relative depth.
        counter = FlopCounterMode(display=False)
        try:
            with torch.inference_mode(), counter:
                param = next(model.parameters(), None)
                x = torch.zeros(1, 3, input_size, input_size,
                                device=param.device if param is not None else "cpu")
                model(x)
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
        self.by_name = {l.name: l for l in self.layers}
        self.total_flops = int(counter.get_total_flops())
        self._input_flops = {name: int(v[2]) for name, v in starts.items()}
        for info in self.layers:
            info.relative_depth = self.relative_depth(info.flops)
        if linears:
            self.classifier = linears[-1]

    def relative_depth(self, flops: int) -> float:
        """``flops`` spent so far as a share of the whole forward pass (0..1)."""
        return round(flops / self.total_flops, 6) if self.total_flops else 0.0

    def aliases(self) -> dict[str, LayerInfo]:
        """``stageK`` and ``penultimate`` -> the layer each means for this model."""
        out = {}
        strides = sorted({l.stride for l in self.layers if l.stride})
        for k in range(1, 6):
            at_s = [l for l in self.layers if l.stride == 2 ** k]
            if at_s:
                out[f"stage{k}"] = self._stage_end(2 ** k, at_s, strides)
        if self.classifier:
            name, dim = self.classifier
            out["penultimate"] = LayerInfo(name, "input of " + self.by_name[name].type, (dim,), None,
                                           self.by_name[name].order,
                                           flops=self._input_flops.get(name, self.by_name[name].flops))
            out["penultimate"].relative_depth = self.relative_depth(out["penultimate"].flops)
        return out

    def _stage_end(self, s: int, at_s: list[LayerInfo], strides: list[int]) -> LayerInfo:
        """The last module at stride ``s`` that a person would call the end of that stage.

        Literally "the last module with stride s" is often inside the next block, before its
        strided convolution (an expansion conv, a ReLU reused by a bottleneck). So: find the
        shallowest module that steps from ``s`` to the next stride, and take the last stride-s
        module no deeper than it that finishes before it starts (``blocks.0`` rather than
        ``blocks.1.0.bn1``; ``layer1`` rather than ``layer2.0.relu``).
        """
        bigger = [t for t in strides if t > s]
        if bigger:
            steps = [l for l in self.layers if l.in_stride == s and l.stride == bigger[0]]
            if steps:
                step = min(steps, key=lambda l: (l.depth, l.start))
                before = [l for l in at_s if l.depth <= step.depth and l.order < step.start]
                if before:
                    return before[-1]
        return at_s[-1]

    def resolve(self, names) -> list[Tap]:
        """Resolve requested names (module names or aliases) to taps, in the order given."""
        aliases = self.aliases()
        taps = []
        for name in names:
            if name == "penultimate":
                if name not in aliases:
                    raise LayerNotFoundError(
                        f"{self.model_name} has no Linear classifier, so 'penultimate' is not "
                        f"defined for it; pick a layer from 'cnncodes list-layers'.")
                info = aliases[name]
                taps.append(Tap(name, info.name, "input", info.shape, None, info.order,
                                info.relative_depth, info.flops))
            elif name in ALIASES:
                if name not in aliases:
                    have = ", ".join(a for a in aliases if a.startswith("stage")) or "none"
                    raise LayerNotFoundError(
                        f"{self.model_name} has no module with the stride of {name} at input "
                        f"size {self.input_size} (its stages: {have}).")
                info = aliases[name]
                taps.append(Tap(name, info.name, "output", info.shape, info.stride, info.order,
                                info.relative_depth, info.flops))
            elif name in self.by_name:
                info = self.by_name[name]
                taps.append(Tap(name, name, "output", info.shape, info.stride, info.order,
                                info.relative_depth, info.flops))
            else:
                close = difflib.get_close_matches(name, list(self.by_name) + list(ALIASES), n=3, cutoff=0.6)
                hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
                raise LayerNotFoundError(
                    f"'{name}' is not a layer of {self.model_name}.{hint} "
                    f"Run 'cnncodes list-layers --model {self.model_name}'.")
        if len({t.name for t in taps}) != len(taps):
            raise LayerNotFoundError("a layer is requested twice: " + ", ".join(names))
        return taps


class _StopForward(Exception):
    """Raised by the deepest tap's hook to skip the rest of the network."""


class Tapper:
    """Run a model up to its deepest tap and return every tap's pooled activations.

    Pooling happens inside the hook, before any later in-place operation (ReLU(inplace=True),
    a residual ``+=``) can modify the tensor, and so that full feature maps are not kept.

    Examples
    --------
    >>> probe = Probe(model, 224, "resnet18")                      # doctest: +SKIP
    >>> with Tapper(model, probe.resolve(["layer3", "penultimate"]), parse_pooling("avg")) as tap:
    ...     codes = tap(x)   # {'layer3': (N, 256), 'penultimate': (N, 512)}

    Calls from several threads at once are safe: each thread's activations are its own.
    """

    def __init__(self, model: nn.Module, taps: list[Tap], pooling: Pooling):
        self.model = model
        self.taps = taps
        self.pooling = pooling
        self._last = max(taps, key=lambda t: t.order).name
        self._local = threading.local()  # .out: this thread's pooled activations
        self._handles = []

    def __enter__(self):
        modules = dict(self.model.named_modules())
        for tap in self.taps:
            m = modules[tap.module]
            if tap.kind == "input":
                self._handles.append(m.register_forward_pre_hook(self._make(tap, pre=True)))
            else:
                self._handles.append(m.register_forward_hook(self._make(tap, pre=False)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []

    def _make(self, tap: Tap, pre: bool):
        def fn(module, args, out=None):
            got = self._local.__dict__.setdefault("out", {})
            if tap.name in got:  # a module called twice: the first call is the tap
                return
            t = args[0].flatten(1) if pre else _first_tensor(out)
            got[tap.name] = self.pooling(t) if self.pooling.kind != "none" else t.flatten(1).clone()
            if tap.name == self._last:
                raise _StopForward
        if pre:
            return lambda module, args: fn(module, args)
        return fn

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self._local.out = out = {}
        try:
            self.model(x)
        except _StopForward:
            pass
        finally:
            self._local.out = {}
        missing = [t.name for t in self.taps if t.name not in out]
        if missing:
            raise LayerNotFoundError(f"layers {', '.join(missing)} did not run in the forward pass.")
        return {t.name: out[t.name] for t in self.taps}

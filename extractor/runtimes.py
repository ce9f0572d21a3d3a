"""Inference runtimes for the CPU forward pass: OpenVINO, ONNX Runtime, or PyTorch itself.

The tapped, truncated network is exported once to ONNX: ``torch.onnx.export`` traces the same
forward hooks that tap it in PyTorch, so every requested layer is a graph output with its
pooling inside the graph, and the hook that stops the pass after the deepest tap ends the
trace there (nothing past it is in the graph). The file is cached next to the torch hub cache
(``$TORCH_HOME/hub/cnncodes-runtimes/``), keyed by everything that decides the graph: the
prepared network's weights (batch norm folded), the taps, the pooling, the input size and the
torch version. The runtime compiles it for the CPU, and its codes are checked against
PyTorch's on a probe batch before the first image (as the batch-norm folding is).

Why these runtimes, in this order (2-core CPU, Lite0 truncated after ``blocks.6``, pre-decoded
batches of 32): OpenVINO 2026.4 runs the graph at about 170 images/s with one stream per core,
ONNX Runtime 1.32 at about 100, PyTorch eager at 45-85. Each is an optional install:
``pip install 'cnncodes[openvino]'`` or ``'cnncodes[onnxruntime]'``.

Scheduling: the CPU lanes of :mod:`.batching` (one thread per core, each decoding a whole
batch and then computing it) call the runtime as they call PyTorch, each lane with a request
of its own on a single-threaded stream (OpenVINO) or session thread (ONNX Runtime), so one core
decodes while the other computes and the runtime's threads never fight the decoders.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from .devices import RUNTIMES
from .errors import CnnCodesError
from .files import atomic_write, slug
from .layers import Tap, Tapper
from .pooling import Pooling

log = logging.getLogger(__name__)

PREFERENCE = ("openvino", "onnxruntime")  # fastest first (measured, see the module docstring)
TOLERANCE = 1e-5  # largest difference to PyTorch's codes, relative to the layer's largest value
EXTRA = {"openvino": "openvino", "onnxruntime": "onnxruntime"}


class RuntimeUnavailableError(CnnCodesError, RuntimeError):
    """A requested inference runtime is not installed, cannot run on this device, or cannot
    run this network."""


def runtime_version(name: str) -> str | None:
    """The installed version of runtime ``name``; None when it is not installed."""
    try:
        if name == "openvino":
            import openvino
            return openvino.__version__.split("-")[0]
        if name == "onnxruntime":
            import onnxruntime
            return onnxruntime.__version__
    except Exception:  # noqa: BLE001 - a broken install (a missing shared library) is no runtime
        return None
    return None


def label(name: str) -> str:
    """``openvino 2026.4.1``: the runtime and version a cache's recipe records (``torch`` alone)."""
    return "torch" if name == "torch" else f"{name} {runtime_version(name)}"


def requested(runtime: str | None) -> str:
    """What was asked for: ``runtime``, else the environment's ``CNNCODES_RUNTIME``, else ``auto``."""
    return (runtime or os.environ.get("CNNCODES_RUNTIME") or "auto").lower()


def resolve_runtime(runtime: str | None, dev: torch.device, precision: str,
                    cached: str | None = None) -> str:
    """The runtime label an extraction uses: ``torch``, or a runtime's name and version.

    ``runtime`` None is the environment's ``CNNCODES_RUNTIME``, else ``auto``. ``auto`` takes
    the fastest installed runtime on a CPU at fp32, except that a cache made before keeps the
    runtime it was made with (so its rows stay those one runtime computes; a finished cache is
    read whatever is installed); anywhere else, PyTorch. A runtime named explicitly must be able to
    run, or this raises :class:`RuntimeUnavailableError`.
    """
    want = requested(runtime)
    if want not in RUNTIMES:
        where = "--runtime" if runtime else "CNNCODES_RUNTIME (the default of --runtime)"
        raise RuntimeUnavailableError(f"{where} must be one of {', '.join(RUNTIMES)}, not '{want}'.")
    if want == "torch":
        return "torch"
    if want != "auto":
        if dev.type != "cpu":
            raise RuntimeUnavailableError(f"--runtime {want} runs on the CPU, not on {dev.type}: use "
                                          f"--runtime torch (or auto) there.")
        if precision != "fp32":
            raise RuntimeUnavailableError(f"--runtime {want} computes in fp32, not {precision}: use "
                                          f"--precision fp32, or --runtime torch.")
        if runtime_version(want) is None:
            raise RuntimeUnavailableError(f"--runtime {want} is not installed: pip install "
                                          f"'cnncodes[{EXTRA[want]}]' (or use --runtime auto).")
        return label(want)
    if dev.type != "cpu" or precision != "fp32":
        return "torch"
    if cached:  # a cache keeps its runtime; whether it can still run is asked when rows are pending
        return cached
    for name in PREFERENCE:
        if runtime_version(name) is not None:
            return label(name)
    return "torch"


def graph_key(net: torch.nn.Module, taps: list[Tap], pooling: Pooling, input_size: int, split=None) -> str:
    """What decides the exported graph, hashed: the prepared network's weights and buffers,
    the taps (module, hook and layout), the pooling, the input size, the preprocessing inside
    the graph and the library versions (cnncodes, torch, timm ...)."""
    h = hashlib.sha256()
    pre = [split.to_float, [float(v) for v in split.mean], [float(v) for v in split.std]] if split else None
    from .provenance import library_versions
    h.update(json.dumps({"taps": [(t.name, t.module, t.hook, t.layout.to_attrs() if t.layout else None)
                                  for t in taps],
                         "pooling": str(pooling), "input_size": input_size, "preprocessing": pre,
                         "versions": library_versions(), "format": 1}, default=str).encode())
    for k, v in net.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class _Tapped(torch.nn.Module):
    """The network up to its deepest tap, returning every tap's pooled codes in order.

    With ``split`` (the weights' preprocessing cut in two, :class:`~.backbones.backbone.SplitTransform`)
    the graph takes the decoders' uint8 batch as it is laid out in memory (N x H x W x C) and
    does the float conversion and normalisation itself: the runtime fuses them into its first
    layer, and the batch crosses into the runtime as 4x fewer bytes without a copy.
    """

    def __init__(self, net: torch.nn.Module, taps: list[Tap], pooling: Pooling, split=None):
        super().__init__()
        self.net, self.taps, self.pooling, self.split = net, taps, pooling, split
        if split is not None:
            self.register_buffer("mean", torch.tensor([float(v) for v in split.mean]).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor([float(v) for v in split.std]).view(1, 3, 1, 1))

    def forward(self, x):
        if self.split is not None:
            x = normalised_pixels(x, self.mean, self.std, self.split.pixel_scale)
        with Tapper(self.net, self.taps, self.pooling) as tap:
            out = tap(x)
        return tuple(out[t.name] for t in self.taps)


def normalised_pixels(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                      scale: float = 255.0) -> torch.Tensor:
    """A uint8 N x H x W x C batch as the network's normalised float N x C x H x W input (``mean``
    and ``std`` shaped (1, C, 1, 1)): to_tensor's div(255) and convert_image_dtype's uint8 ->
    float agree, x / 255; ``scale`` is the split's :attr:`~.backbones.backbone.SplitTransform.pixel_scale`
    (1 where the 1/255 is folded into mean and std, as transformers' processors do)."""
    x = x.permute(0, 3, 1, 2).float()
    return ((x / scale if scale != 1 else x) - mean) / std


def runtime_dir() -> Path:
    return Path(torch.hub.get_dir()) / "cnncodes-runtimes"


@contextlib.contextmanager
def onnx_tracing():
    """What ``torch.onnx.export`` (TorchScript tracing) of a network needs around it: no
    autograd, the tracer's notes on Python control flow in hooks and its stdout quiet, and
    nn.MultiheadAttention's inference fast path off: that is one fused operator ONNX has no
    export for (torchvision's ViT, OpenCLIP's towers), where its ordinary path exports."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    with torch.no_grad(), warnings.catch_warnings(), _no_stdout():
        warnings.simplefilter("ignore")
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            yield
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)


def export_onnx(net: torch.nn.Module, taps: list[Tap], pooling: Pooling, input_size: int, model: str,
                split=None) -> Path:
    """The tapped network as an ONNX file in :func:`runtime_dir`, exported on first use."""
    key = graph_key(net, taps, pooling, input_size, split)
    path = runtime_dir() / f"{slug(model)}-{key[:20]}.onnx"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    x = torch.zeros(2, input_size, input_size, 3, dtype=torch.uint8) if split is not None else \
        torch.zeros(2, 3, input_size, input_size)
    with atomic_write(path) as tmp, onnx_tracing():
        # TorchScript tracing (dynamo=False): it follows the forward hooks and the exception
        # that stops the pass, which torch.export's graph capture does not.
        torch.onnx.export(_Tapped(net, taps, pooling, split).eval(), (x,), str(tmp), input_names=["x"],
                          output_names=[f"tap{i}" for i in range(len(taps))],
                          dynamic_axes={"x": {0: "n"}}, opset_version=17, dynamo=False)
    log.info("exported the tapped network of %s to %s", model, path)
    return path


@contextlib.contextmanager
def _no_stdout():
    """File descriptor 1 to /dev/null for the export: the TorchScript exporter writes its whole
    IR graph to stdout when it fails (its log switch is always on in torch 2.x:
    ``setup_onnx_logging`` tests the function ``_jit_is_onnx_log_enabled``, not its result),
    and a command printing ``--json`` must not get it. The failure itself is reported as one
    line by :func:`compile_taps`."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):  # no file descriptor 1 to redirect
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


class RuntimeTaps:
    """A compiled tapped network with :class:`~.layers.Tapper`'s interface: a float batch in,
    ``{tap name: pooled codes}`` out. Safe to call from several threads (one request each)."""

    def __init__(self, name: str, path: Path, taps: list[Tap], streams: int, takes_uint8: bool = False):
        self.name, self.path, self.names = name, path, [t.name for t in taps]
        self.takes_uint8 = takes_uint8  # the graph normalises the decoders' uint8 batch itself
        self.label = label(name)
        streams = max(1, int(streams))
        if name == "openvino":
            import openvino as ov
            core = ov.Core()
            # one single-threaded stream per lane; the compiled blob is cached beside the graph
            config = {"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": str(streams),
                      "INFERENCE_NUM_THREADS": str(streams), "INFERENCE_PRECISION_HINT": "f32"}
            if streams < len(os.sched_getaffinity(0)):
                # fewer streams than cores: other processes (torchrun's ranks, one thread each)
                # share this machine, and OpenVINO would pin each one's thread to the same first
                # core (measured: 2 ranks at 65 images/s against 112 for one process)
                config["ENABLE_CPU_PINNING"] = "NO"
            if os.access(path.parent, os.W_OK):
                config["CACHE_DIR"] = str(path.parent / "openvino-cache")
            self._compiled = core.compile_model(str(path), "CPU", config)
            # a request per stream, taken by whichever lane calls (and warmed up by the check)
            self._requests = queue.SimpleQueue()
            for _ in range(streams):
                self._requests.put(self._compiled.create_infer_request())
        elif name == "onnxruntime":
            import onnxruntime as ort
            so = ort.SessionOptions()
            so.intra_op_num_threads, so.inter_op_num_threads = 1, 1  # the lanes are the parallelism
            so.log_severity_level = 3
            self._session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        else:
            raise RuntimeUnavailableError(f"no inference runtime '{name}'")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def warm_up(self, batch: int, input_size: int) -> None:
        """One inference of a ``batch``-image batch on every request, side by side: OpenVINO
        builds its kernels for a batch shape on the first inference of that shape (measured
        about 0.25 s more per request for Lite0 at 32 images), which belongs to the setup, not
        to the first batches of photos."""
        shape = (batch, input_size, input_size, 3) if self.takes_uint8 else (batch, 3, input_size, input_size)
        a = np.zeros(shape, dtype=np.uint8 if self.takes_uint8 else np.float32)
        if self.name != "openvino":
            self._session.run([f"tap{i}" for i in range(len(self.names))], {"x": a})
            return
        requests = []
        while True:
            try:
                requests.append(self._requests.get_nowait())
            except queue.Empty:
                break
        try:
            for req in requests:
                req.start_async({0: a})
            for req in requests:
                req.wait()
        finally:
            for req in requests:
                self._requests.put(req)

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.takes_uint8:  # (N, C, H, W) uint8 laid out channels-last: its N x H x W x C view
            if x.dtype != torch.uint8:
                raise RuntimeUnavailableError(f"{self.label} was compiled for uint8 batches, got {x.dtype}")
            a = np.ascontiguousarray(x.detach().cpu().permute(0, 2, 3, 1).numpy())
        else:
            a = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        try:
            if self.name == "openvino":
                req = self._requests.get()
                try:
                    res = req.infer({0: a})
                    outs = [np.array(res[o]) for o in self._compiled.outputs]
                finally:
                    self._requests.put(req)
            else:
                outs = self._session.run([f"tap{i}" for i in range(len(self.names))], {"x": a})
        except Exception as e:  # noqa: BLE001 - the runtimes' own error types: one line, not a traceback
            raise RuntimeUnavailableError(f"{self.label} failed on a batch of {len(a)}: "
                                          f"{_one_line(e)}") from None
        if len(outs) != len(self.names):
            raise RuntimeUnavailableError(f"{self.label} returned {len(outs)} outputs for "
                                          f"{len(self.names)} taps")
        return {n: torch.from_numpy(o) for n, o in zip(self.names, outs)}


def _one_line(e: BaseException, limit: int = 240) -> str:
    """An exception as one line for people: its first line, shortened with an ellipsis."""
    text = str(e).strip().splitlines()[0].strip() if str(e).strip() else type(e).__name__
    return text if len(text) <= limit else text[:limit - 3].rstrip() + "..."


def differences(rt, net: torch.nn.Module, taps: list[Tap], pooling: Pooling, x: torch.Tensor,
                split=None) -> dict[str, float]:
    """Per tap, the largest difference of ``rt``'s codes to PyTorch's on ``x`` (a uint8 batch
    when ``split`` normalises it), relative to the layer's largest value."""
    with torch.inference_mode(), Tapper(net, taps, pooling) as tap:
        ref = tap(split.batch(x) if split is not None else x)
    got = rt(x)
    out = {}
    for name, r in ref.items():
        r = r.float()
        if tuple(got[name].shape) != tuple(r.shape):
            raise RuntimeUnavailableError(f"its codes of '{name}' have shape {tuple(got[name].shape)}, "
                                          f"PyTorch's {tuple(r.shape)}")
        scale = float(r.abs().max()) or 1.0
        out[name] = float((got[name].float() - r).abs().max()) / scale
    return out


def compile_taps(runtime: str, net: torch.nn.Module, taps: list[Tap], pooling: Pooling, input_size: int,
                 model: str, streams: int, strict: bool, split=None):
    """``(taps, label)``: the tapped network on ``runtime`` (a label from
    :func:`resolve_runtime`), checked against PyTorch on a probe batch, or PyTorch's own
    :class:`~.layers.Tapper`.

    When the export, the compilation or the check fails, ``strict`` (a runtime the user named)
    raises :class:`RuntimeUnavailableError`; otherwise (``auto``) it falls back to PyTorch
    with one logged line saying why.
    """
    if runtime == "torch":
        return Tapper(net, taps, pooling), "torch"
    name = runtime.split()[0]
    try:
        path = export_onnx(net, taps, pooling, input_size, model, split)
        rt = RuntimeTaps(name, path, taps, streams, takes_uint8=split is not None)
        g = torch.Generator().manual_seed(0)
        if split is not None:  # a channels-last uint8 batch, as the decoders' collate makes it
            # three images: not the export's dummy batch of two, so a batch size baked into the
            # graph cannot pass the check
            x = torch.randint(0, 256, (3, input_size, input_size, 3), dtype=torch.uint8, generator=g)
            x = x.permute(0, 3, 1, 2)
        else:
            x = torch.randn(3, 3, input_size, input_size, generator=g)
        diffs = differences(rt, net, taps, pooling, x, split)
        for _ in range(max(0, streams - 1)):  # the other requests' first inference, before any image
            rt(x)
        worst = max(diffs, key=diffs.get)
        if not diffs[worst] <= TOLERANCE:  # NaN included
            path.unlink(missing_ok=True)  # exported anew next time (another version may do better)
            raise RuntimeUnavailableError(f"its codes of '{worst}' differ from PyTorch's by "
                                          f"{diffs[worst]:.1e} of the layer's largest value (more than "
                                          f"{TOLERANCE:.0e})")
        log.info("%s runs %s (codes within %.1e of PyTorch's)", rt.label, model, diffs[worst])
        return rt, rt.label
    except Exception as e:  # noqa: BLE001 - export and compilers fail in many ways; each is one line
        why = _one_line(e)
        if strict:
            raise RuntimeUnavailableError(f"--runtime {name} cannot run {model}: {why}") from None
        log.warning("runtime %s cannot run %s (%s): running it with PyTorch", name, model, why)
        return Tapper(net, taps, pooling), "torch"


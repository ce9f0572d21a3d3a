"""The extraction loop: images -> pretrained CNN -> pooled codes -> HDF5 cache.

On an accelerator, DataLoader worker processes decode while the main thread feeds the device;
on a CPU, one thread per core decodes a whole batch and computes it single-threaded, so one
core decodes while the other computes (see ``_encode_lanes``). Cache writes go to a writer
thread, so they overlap too. Batches are fixed blocks of rows
(``[k*B, (k+1)*B)`` minus rows already done), so a resumed run forms exactly the batches an
uninterrupted run would have formed, and on the CPU its codes are bitwise identical.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .backbones import DEFAULT_MODEL, Backbone, load_backbone
from .cache import (DONE, FAILED, PENDING, CacheWriter, Journal, LayerSpec, create_cache, discard_cache,
                    open_cache, open_status, read_attrs, recipe_differences)
from .errors import CacheError, CacheLockedError, ImageDecodeError, IncompatibleCacheError
from .fusion import fold_batchnorm
from .images import ImageTable, find_images, load_rgb
from .layers import Probe, Tap, Tapper
from .pooling import Pooling, parse_pooling

log = logging.getLogger(__name__)
DTYPES = ("float32", "float16")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda", "mps")


class ExtractionInterrupted(KeyboardInterrupt):
    """Raised after an interrupted run has saved what it finished; rerun to resume."""

    def __init__(self, message: str, result: "ExtractResult"):
        super().__init__(message)
        self.result = result


@dataclass
class ExtractResult:
    """What ``extract`` did."""

    path: Path
    state: str                      # 'created', 'resumed', 'layers added', 'up to date', 'interrupted'
    images: int
    done: int
    failed: int
    pending: int
    processed: int                  # rows decoded and run through the network in this call
    seconds: float                  # the extraction loop: decode, forward, writes, commit
    device: str
    layers: dict[str, int]          # name -> code dimension
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, error) of this call
    warnings: list[str] = field(default_factory=list)
    setup_seconds: float = 0.0      # finding images, loading weights, probing, BN folding

    @property
    def images_per_s(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    @property
    def complete(self) -> bool:
        return self.pending == 0

    def as_dict(self) -> dict:
        return {"path": str(self.path), "state": self.state, "images": self.images,
                "done": self.done, "failed": self.failed, "pending": self.pending,
                "processed": self.processed, "seconds": round(self.seconds, 3),
                "setup_seconds": round(self.setup_seconds, 3),
                "images_per_s": round(self.images_per_s, 2), "device": self.device,
                "layers": self.layers, "complete": self.complete,
                "failures": [{"path": p, "error": e} for p, e in self.failures],
                "warnings": self.warnings}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but CUDA is not available on this machine.")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("--device mps was requested but MPS is not available on this machine.")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` is bf16 autocast on CUDA GPUs that support it (fp16 on older ones), else fp32."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if precision != "fp32" and device.type != "cuda":
        raise ValueError(f"--precision {precision} needs a CUDA device; on {device.type} use fp32.")
    return precision


def default_cache_path(data: str | os.PathLike, model: str) -> Path:
    """``cache/<data folder name>-<model>.h5``."""
    data = Path(data).resolve()
    stem = data.stem if data.is_file() else data.name
    return Path("cache") / f"{stem}-{model.replace(':', '-').replace('/', '-')}.h5"


def library_versions() -> dict:
    out = {}
    for dist in ("cnncodes", "torch", "torchvision", "timm", "h5py", "numpy", "pillow", "scikit-learn"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


class _Images(torch.utils.data.Dataset):
    """Decodes one row; a failure is returned, not raised, so one bad file never stops a run."""

    def __init__(self, table: ImageTable, transform):
        self.table, self.transform = table, transform

    def __len__(self):
        return len(self.table)

    def __getitem__(self, i):
        try:
            return i, self.transform(load_rgb(self.table.absolute(i))), ""
        except Exception as e:  # noqa: BLE001 - any decode error becomes a failed row
            return i, None, f"{type(e).__name__}: {e}".strip()[:500]


def _collate(items):
    rows = np.array([i for i, _, _ in items], dtype=np.int64)
    good = [t for _, t, _ in items if t is not None]
    x = None
    if good and good[0].dim() == 3:
        # Stacked as (N, H, W, C) and viewed as (N, C, H, W): a channels_last batch in one
        # copy (pil_to_tensor's CHW is itself a view of Pillow's HWC pixels).
        x = torch.stack([t.permute(1, 2, 0) for t in good]).permute(0, 3, 1, 2)
    elif good:
        x = torch.stack(good)
    return rows, x, [e for _, _, e in items]


def _threaded_batches(dataset, blocks, threads: int):
    """Decode each batch on ``threads`` threads in this process, then hand it to the caller.

    Pillow releases the GIL while decoding and resampling, so threads decode in parallel.
    """
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="cnncodes-decode") as pool:
        for block in blocks:
            yield _collate(list(pool.map(dataset.__getitem__, block)))


class _Encoder:
    """A decoded batch -> ``(rows, ok, errors, codes)``: codes per layer, zeros for failed rows.

    Use as a context manager (it holds the forward hooks). Safe to call from several threads.
    """

    def __init__(self, net, taps, pooling, split, dev, prec, micro, dims, np_dtype):
        self.tapper = Tapper(net, taps, pooling)
        self.split, self.dev, self.micro, self.dims, self.np_dtype = split, dev, micro, dims, np_dtype
        self.prec = prec

    def __enter__(self):
        self.tapper.__enter__()
        return self

    def __exit__(self, *exc):
        self.tapper.__exit__(*exc)

    def __call__(self, rows, x, errs):
        ok = np.array([not e for e in errs])
        codes = {name: np.zeros((len(rows), d), self.np_dtype) for name, d in self.dims.items()}
        if x is None:
            return rows, ok, errs, codes
        prec, dev = self.prec, self.dev
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16 if prec == "bf16" else torch.float16)
                    if prec in ("bf16", "fp16") else contextlib.nullcontext())
        with torch.inference_mode():  # per thread, so entered here
            x = x.to(dev, non_blocking=True)
            # uint8 -> channels_last first (a no-op after _collate): the float arithmetic that
            # follows keeps the memory format, which saves copying the 4x larger float batch.
            x = x.contiguous(memory_format=torch.channels_last if dev.type in ("cpu", "cuda")
                             else torch.contiguous_format)
            good = np.flatnonzero(ok)
            for lo in range(0, len(x), self.micro):
                part = x[lo:lo + self.micro]
                if self.split:  # per micro-batch: the float copy is still in cache for the stem
                    part = self.split.batch(part)
                with autocast:
                    feats = self.tapper(part)
                for name, f in feats.items():
                    codes[name][good[lo:lo + self.micro]] = f.float().cpu().numpy()
        return rows, ok, errs, codes


def _encode(encoder: _Encoder, loader):
    """Batches from ``loader`` (decoded elsewhere), computed here, in order."""
    for rows, x, errs in loader:
        yield encoder(rows, x, errs)


@contextlib.contextmanager
def _torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _encode_lanes(encoder: _Encoder, dataset, blocks, lanes: int):
    """CPU: ``lanes`` threads, each decoding a whole batch and computing it on one core.

    Two single-threaded forward passes side by side are as fast as one pass on both cores
    (Lite0, 512 images on 2 cores: 4.1-4.4 s either way, 7.7 s on one thread alone), but
    decoding no longer has to wait for the cores between passes, or fight a pass's threads for
    them: while one lane decodes, the other computes (measured: 5.1 s against 5.3 s for
    "decode on both cores, then compute on both"). Batches are still the fixed row blocks, each
    computed by one thread, so the codes do not depend on which lane computed a batch, and a
    resumed run's are bitwise those of an uninterrupted one. Batches are yielded in order.
    """
    from concurrent.futures import ThreadPoolExecutor

    def work(block):
        return encoder(*_collate([dataset[i] for i in block]))

    # OpenMP's thread count is per calling thread: each lane sets its own, once
    pool = ThreadPoolExecutor(max_workers=lanes, thread_name_prefix="cnncodes-lane",
                              initializer=torch.set_num_threads, initargs=(1,))
    pending = []
    try:
        with _torch_threads(1):
            for block in blocks:
                pending.append(pool.submit(work, block))
                if len(pending) > lanes:
                    yield pending.pop(0).result()
            while pending:
                yield pending.pop(0).result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def encode_images(bb: Backbone, paths, layers, pool: str = "avg", *, device: str = "auto",
                  precision: str = "auto", batch_size: int = 32, dtype: str = "float32"):
    """Codes of image files in memory, with no cache: ``({layer: N x D}, errors)``.

    ``errors[i]`` is "" for an image that decoded, else its error (its codes are zeros). The
    same decoding, taps, pooling and network preparation as :func:`extract`.

    Examples
    --------
    >>> codes, errors = encode_images(load_backbone(), ["a.jpg", "b.png"], ["penultimate"])  # doctest: +SKIP
    """
    from pathlib import Path as _P
    pooling = parse_pooling(pool)
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    paths = [str(_P(p).resolve()) for p in paths]
    table = ImageTable(_P("/"), paths, np.full(len(paths), -1, dtype=np.int64), [""] * len(paths), [])
    probe = Probe(bb.model, bb.input_size, bb.name)
    taps = probe.resolve(list(layers))
    dims = {t.name: pooling.dim(t.shape) for t in taps}
    out = {name: np.zeros((len(paths), d), np.dtype(dtype)) for name, d in dims.items()}
    errors = [""] * len(paths)
    if not paths:
        return out, errors
    net = prepare_model(bb, taps, dev)
    micro = micro_batch_size(dev, batch_size, probe, taps)
    split = bb.split
    dataset = _Images(table, split.pil if split else bb.transform)
    with _Encoder(net, taps, pooling, split, dev, prec, micro, dims, np.dtype(dtype)) as encoder:
        for rows, ok, errs, codes in _batches(encoder, dataset, _blocks(np.arange(len(paths)), batch_size),
                                              dev, workers=0):
            for name, block in codes.items():
                out[name][rows] = block
            for r, e in zip(rows.tolist(), errs):
                errors[r] = e
    return out, errors


def _batches(encoder: _Encoder, dataset, blocks, dev: torch.device, workers: int | None):
    """Every block's ``(rows, ok, errors, codes)``, in order, by the fastest plan for ``dev``.

    ``workers=None`` picks: on a CPU, one decode-and-compute lane per core; elsewhere,
    DataLoader worker processes (one per core, at most 8) feeding the accelerator. ``0`` off a
    CPU decodes each batch on threads here, then computes it.
    """
    if workers is None:
        workers = 0 if dev.type == "cpu" else min(8, os.cpu_count() or 1)
    if workers == 0 and dev.type == "cpu":
        return _encode_lanes(encoder, dataset, blocks, max(1, torch.get_num_threads()))
    if workers == 0:
        return _encode(encoder, _threaded_batches(dataset, blocks, max(1, os.cpu_count() or 1)))
    return _encode(encoder, torch.utils.data.DataLoader(
        dataset, batch_sampler=blocks, collate_fn=_collate, num_workers=workers,
        pin_memory=dev.type == "cuda", prefetch_factor=4))


def _blocks(rows: np.ndarray, batch_size: int) -> list[list[int]]:
    """Pending rows grouped by their fixed block ``row // batch_size``."""
    if not len(rows):
        return []
    keys = rows // batch_size
    cuts = np.flatnonzero(np.diff(keys)) + 1
    return [part.tolist() for part in np.split(rows, cuts)]


def _recipe(bb: Backbone, table: ImageTable, pooling: Pooling, dtype: str, precision: str,
            data: Path) -> dict:
    return {"model": bb.name, "weights": bb.weights,
            "weights_sha256": bb.weights["sha256"] or "none",
            "preprocessing": bb.preprocessing, "pooling": str(pooling), "dtype": dtype,
            "precision": precision, "image_fingerprint": table.fingerprint(),
            "data_root": str(data.resolve()), "input_size": bb.input_size,
            "versions": library_versions()}


def _layer_specs(taps: list[Tap], pooling: Pooling, input_size: int) -> list[LayerSpec]:
    return [LayerSpec(t.name, pooling.dim(t.shape),
                      {"module": t.module, "kind": t.kind, "pooling": str(pooling) if len(t.shape) == 3 else "none",
                       "unpooled_shape": list(t.shape), "stride": t.stride or -1,
                       "dim": pooling.dim(t.shape), "input_size": input_size,
                       "relative_depth": t.relative_depth, "flops": int(t.flops)})
            for t in taps]


# glibc serves allocations above its mmap threshold (at most 32 MiB) with fresh mmap()ed pages
# and gives freed heap back to the OS; a CNN's activations then page-fault in anew on every
# forward pass. On a 2-core machine that costs half the throughput (measured: 48 img/s at
# batch 32 vs 102 img/s with the settings below and micro-batches under the threshold).
# One arena for all threads: each extra thread (the CPU lanes) would otherwise get its own
# arena of 64 MiB heaps, which glibc unmaps when they empty, with the same page faults (measured:
# 550,000 faults per 512 images, against 8,000 with one arena).
_MMAP_THRESHOLD = 32 * 1024 * 1024
_MICRO_BATCH_BYTES = 24 * 1024 * 1024
_allocator_tuned = False


def tune_cpu_allocator() -> bool:
    """Keep freed memory in the heap (glibc only; a no-op elsewhere). Process-wide, once."""
    global _allocator_tuned
    if _allocator_tuned:
        return True
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
        _allocator_tuned = bool(libc.mallopt(M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and \
            bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)) and bool(libc.mallopt(M_ARENA_MAX, 1))
    except (OSError, AttributeError):
        _allocator_tuned = False
    return _allocator_tuned


def cpu_micro_batch(probe: Probe, taps: list[Tap]) -> int:
    """Images per CPU forward pass so that the largest activation stays under the mmap threshold."""
    deepest = max(t.order for t in taps)
    biggest = max((int(np.prod(l.shape)) * 4 for l in probe.layers if l.order <= deepest), default=1)
    return max(1, _MICRO_BATCH_BYTES // biggest)


def micro_batch_size(dev: torch.device, batch_size: int, probe: Probe, taps: list[Tap]) -> int:
    """Images per forward pass: the batch on accelerators, allocator-friendly slices on a CPU."""
    if dev.type != "cpu":
        return batch_size
    tune_cpu_allocator()
    return min(batch_size, cpu_micro_batch(probe, taps))


def prepare_model(bb: Backbone, taps: list[Tap], device: torch.device, fold_bn: bool = True):
    """The network to run: BN folded (verified against the original on the probe), on ``device``,
    channels_last where it helps."""
    model = bb.model.eval()
    if fold_bn:
        folded, n = fold_batchnorm(model, bb.input_size, keep={t.module for t in taps})
        if n:
            x = torch.randn(2, 3, bb.input_size, bb.input_size, generator=torch.Generator().manual_seed(0))
            with torch.inference_mode(), Tapper(model, taps, parse_pooling("avg")) as a, \
                    Tapper(folded, taps, parse_pooling("avg")) as b:
                ref, got = a(x), b(x)
            ok = all(torch.allclose(ref[k], got[k], rtol=1e-3, atol=1e-4 * float(ref[k].abs().max()) + 1e-6)
                     for k in ref)
            if ok:
                model = folded
            else:
                log.info("batch-norm folding changed the taps of %s; running it unfolded", bb.name)
    model = model.to(device)
    if device.type in ("cpu", "cuda"):
        model = model.to(memory_format=torch.channels_last)
    return model


def extract(data, out=None, *, model: str = DEFAULT_MODEL, weights: str | None = "DEFAULT",
            layers=("penultimate",), pool: str = "avg", dtype: str = "float32",
            device: str = "auto", precision: str = "auto", batch_size: int = 32,
            workers: int | None = None, strict: bool = False, overwrite: bool = False,
            progress: bool | None = None) -> ExtractResult:
    """Extract CNN codes of one or more layers for every image of ``data`` into an HDF5 cache.

    Resumes an interrupted run at the same ``out``; a finished one is left as is ("up to date").

    Parameters
    ----------
    data : path
        Image folder (``ROOT/<class>/<img>`` or ``ROOT/<split>/<class>/<img>``) or CSV manifest.
    out : path, optional
        The cache; default ``cache/<data name>-<model>.h5``.
    model, weights : str
        See :func:`extractor.backbones.load_backbone`.
    layers : sequence of str
        Module names or aliases (``stage1``..``stage5``, ``penultimate``).
    pool : str
        ``avg``, ``max``, ``avgmax``, ``grid:K``, ``spp:1,2,4`` or ``none``.
    dtype : {'float32', 'float16'}
        Storage type of the codes.
    device, precision : str
        ``auto`` picks CUDA, then MPS, then CPU; bf16 autocast on CUDA, fp32 elsewhere.
    batch_size : int
        Images decoded, computed and saved together (a resumed run forms the same batches).
    workers : int, optional
        DataLoader decoding processes. Default: on CUDA/MPS one per CPU core (at most 8); on a
        CPU 0, which runs one decode-and-compute lane per core in this process (on a machine
        whose cores the forward pass already fills, that beats worker processes).
    strict : bool
        Stop at the first image that fails to decode instead of recording and skipping it.
    overwrite : bool
        Replace an existing file at ``out`` made by another recipe (or not a cache at all).
    progress : bool, optional
        Show a progress bar on stderr; default when stderr is a terminal.

    Examples
    --------
    >>> r = extract("data/digits", "cache/digits.h5", layers=["stage3", "penultimate"])  # doctest: +SKIP
    >>> r.state, r.layers                                                                # doctest: +SKIP
    ('created', {'stage3': 40, 'penultimate': 1280})
    """
    t_start = time.perf_counter()
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    layers = list(dict.fromkeys(layers or ["penultimate"]))
    pooling = parse_pooling(pool)
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    data = Path(data)
    table = find_images(data)
    out = Path(out) if out else default_cache_path(data, model)
    out.parent.mkdir(parents=True, exist_ok=True)
    bb = load_backbone(model, weights)
    recipe = _recipe(bb, table, pooling, dtype, prec, data)
    if overwrite:  # an interrupted layer addition to the cache being replaced is stale too
        discard_cache(_companion(out))

    exists = out.exists()
    if exists and not overwrite:
        try:
            attrs = read_attrs(out)
        except CacheError as e:
            raise CacheError(f"{e} Refusing to overwrite it: choose another --out, or pass --overwrite.") from None
        diffs = recipe_differences(attrs, recipe)
        if diffs:
            raise IncompatibleCacheError(
                f"{out} was made by a different recipe: " + "; ".join(diffs) +
                ". Pass --overwrite to replace it, or choose another --out.")
        missing = [l for l in layers if l not in attrs["layers"]]
        if missing:
            return _add_layers(data, out, missing, attrs, t_start, dict(
                model=model, weights=weights, pool=pool, dtype=dtype, device=device, precision=precision,
                batch_size=batch_size, workers=workers, strict=strict, progress=progress))
        layers = list(attrs["layers"])  # a resumed row needs every layer the cache holds

    probe = Probe(bb.model, bb.input_size, model)
    taps = probe.resolve(layers)
    specs = _layer_specs(taps, pooling, bb.input_size)

    def create():
        if out.exists() and not overwrite and not exists:
            raise CacheLockedError(f"{out} was created by another process meanwhile; rerun to use it.")
        create_cache(out, paths=table.paths, labels=table.labels, splits=table.splits,
                     classes=table.classes, layers=specs, attrs=recipe)

    if exists and not overwrite and attrs.get("complete") and not Journal(out).shards():
        st = np.asarray(open_status(out))
        return _result(out, st, table, "up to date", 0, 0.0, dev, specs, [], bb.warnings,
                       time.perf_counter() - t_start)

    with CacheWriter(out, create=create if (overwrite or not exists) else None) as writer:
        pending = writer.pending_rows()
        state = "created" if (overwrite or not exists) else "resumed"
        failures: list[tuple[str, str]] = []
        counter = [0]
        clock = {"loop": None}

        def result(state):
            now = time.perf_counter()
            loop = now - clock["loop"] if clock["loop"] else 0.0
            return _result(out, writer.status, table, state, counter[0], loop, dev, specs, failures,
                           bb.warnings, now - t_start - loop)
        try:
            if len(pending):
                net = prepare_model(bb, taps, dev)
                micro = micro_batch_size(dev, batch_size, probe, taps)
                clock["loop"] = time.perf_counter()
                _run(net, taps, specs, pooling, bb, table, pending, writer, dev, prec, dtype,
                     batch_size, micro, workers, strict, progress, failures, counter)
        except KeyboardInterrupt:
            writer.commit()
            res = result("interrupted")
            raise ExtractionInterrupted(
                f"interrupted: {res.done + res.failed}/{res.images} images saved in {out}; "
                f"rerun the same command to resume.", res) from None
        except ImageDecodeError:
            writer.commit()
            raise
        writer.commit()
        return result(state)


def _companion(out: Path) -> Path:
    return out.with_name(out.name + ".adding.h5")


def _add_layers(data, out: Path, missing: list[str], attrs: dict, t_start: float, options: dict) -> ExtractResult:
    """Add ``missing`` layers to an existing cache of the same recipe.

    The cache is first finished with the layers it has (if it was interrupted); the new layers
    are then extracted into a companion cache ``<out>.adding.h5``, resumable on its own like any
    cache, and finally copied into a working copy that replaces ``out`` in one rename. So a
    kill at any moment leaves ``out`` whole and the next run carries on where this one stopped.
    """
    if not attrs.get("complete") or Journal(out).shards():
        extract(data, out, layers=list(attrs["layers"]), **options)
    part = _companion(out)
    res = extract(data, part, layers=missing, **options)
    with CacheWriter(out) as writer:
        writer.add_layers_from(part)
        writer.commit()
    part.unlink()
    with open_cache(out) as c:
        dims = {name: int(c.layer_attrs(name)["dim"]) for name in c.layers}
    return dataclasses.replace(res, path=out, state="layers added", layers=dims,
                               setup_seconds=time.perf_counter() - t_start - res.seconds)


def _result(out, status, table, state, processed, seconds, dev, specs, failures, warnings, setup):
    return ExtractResult(out, state, len(table), int((status == DONE).sum()), int((status == FAILED).sum()),
                         int((status == PENDING).sum()), processed, seconds, str(dev),
                         {s.name: s.dim for s in specs}, failures, list(warnings), setup)


def _run(net, taps, specs, pooling, bb, table, pending, writer, dev, prec, dtype, batch_size,
         micro, workers, strict, progress, failures, counter) -> None:
    split = bb.split  # per-image PIL part in the workers, float arithmetic per batch here
    dataset = _Images(table, split.pil if split else bb.transform)
    blocks = _blocks(pending, batch_size)
    np_dtype = np.dtype(dtype)
    dims = {s.name: s.dim for s in specs}
    # The writer thread: journal shard + working copy, while the next batch computes.
    q: queue.Queue = queue.Queue(maxsize=4)
    errors: list[BaseException] = []

    def write_loop():
        while (item := q.get()) is not None:
            try:
                if not errors:
                    writer.add(*item)
            except BaseException as e:  # surfaced in the main thread
                errors.append(e)

    thread = threading.Thread(target=write_loop, name="cnncodes-writer", daemon=True)
    thread.start()
    # tqdm's disable=None hides the bar when stderr is not a terminal.
    bar = tqdm(total=len(pending), unit="img", desc="extract", dynamic_ncols=True,
               disable={True: False, False: True, None: None}[progress])
    previous = signal.getsignal(signal.SIGTERM)
    on_main = threading.current_thread() is threading.main_thread()
    if on_main:
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill`: save, as Ctrl-C does
    encoder = _Encoder(net, taps, pooling, split, dev, prec, micro, dims, np_dtype)
    try:
        # closing(): an interrupt stops the lanes (each finishes its batch) before the commit
        with encoder, contextlib.closing(_batches(encoder, dataset, blocks, dev, workers)) as batches:
            for rows, ok, errs, codes in batches:
                if errors:
                    raise errors[0]
                bad = [(table.paths[r], e) for r, e in zip(rows.tolist(), errs) if e]
                if bad and strict:
                    raise ImageDecodeError(f"{bad[0][0]}: {bad[0][1]} (stopped by --strict)")
                q.put((rows, np.where(ok, DONE, FAILED), list(errs), codes))
                failures.extend(bad)
                counter[0] += len(rows)
                bar.update(len(rows))
                if bad:
                    bar.set_postfix(failed=len(failures), refresh=False)
    finally:
        q.put(None)
        thread.join()
        bar.close()
        if on_main:
            signal.signal(signal.SIGTERM, previous)
    if errors:
        raise errors[0]

"""The run of an extraction: images -> pretrained CNN -> pooled codes -> HDF5 cache.

``extract`` resolves the settings, asks :func:`~.plan.plan_extraction` what to do with the
output path, and runs that plan: a :class:`_CacheRun` brings one cache up to date (batches from
:mod:`.batching`, writes on a background thread), and adding layers runs one for the cache and
one for a companion cache, then merges them. Devices and precision live in :mod:`.devices`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import logging
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .backbones.backbone import DEFAULT_MODEL, Backbone
from .backbones.loading import load_backbone
from .batching import encoded_batches, row_blocks
from .cache import DONE, FAILED, PENDING, create_cache, open_cache, read_attrs
from .device_decode import check_decode
from .devices import check_dtype, resolve_device, resolve_precision
from .distributed import Dist, RankFailedError, init_distributed
from .encoding import PreparedNetwork, backbone_recipe, layer_specs, make_encoder
from .errors import (
    CacheLockedError,
    CacheWriteError,
    CnnCodesError,
    ImageDecodeError,
    IncompatibleCacheError,
    SettingsError,
)
from .files import dataset_name, slug
from .images import ImageTable, find_images
from .journal import Journal, discard_cache
from .layers import Probe
from .plan import ADD_LAYERS, UP_TO_DATE, ExtractionPlan, plan_extraction
from .pooling import Pooling, parse_pooling
from .provenance import library_versions
from .recipe import Recipe
from .runtimes import RuntimeUnavailableError, label, resolve_runtime, runtime_version
from .runtimes import requested as requested_runtime
from .shards import SHARD_DAMAGE
from .writer import CacheWriter, ShardWriter

log = logging.getLogger(__name__)

class ExtractionInterrupted(KeyboardInterrupt):
    """Raised after an interrupted run has saved what it finished; rerun to resume."""

    def __init__(self, message: str, result: ExtractResult):
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
    skipped: dict[str, int] = field(default_factory=dict)  # entries passed over by the scan, by reason
    runtime: str = "torch"          # what ran the network: torch, or a runtime and its version

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
                "warnings": self.warnings, "skipped": self.skipped, "runtime": self.runtime}


def extract(data, out=None, *, model: str = DEFAULT_MODEL, weights: str | None = "DEFAULT",
            layers=("penultimate",), pool: str = "avg", dtype: str = "float32",
            device: str = "auto", precision: str = "auto", batch_size: int = 32,
            workers: int | None = None, strict: bool = False, overwrite: bool = False,
            allow_overlap: bool = False, progress: bool | None = None,
            runtime: str | None = None, decode: str = "cpu") -> ExtractResult:
    """Extract CNN codes of one or more layers for every image of ``data`` into an HDF5 cache.

    Resumes an interrupted run at the same ``out``; a finished one is left as is ("up to date").

    Parameters
    ----------
    data : path
        Image folder (``ROOT/<class>/<img>`` or ``ROOT/<split>/<class>/<img>``) or CSV manifest.
    out : path, optional
        The cache; default ``cache/<data name>-<model>.h5``.
    model, weights : str
        See :func:`extractor.backbones.loading.load_backbone`.
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
    allow_overlap : bool
        Accept a manifest that lists an image in two splits (a train/test leak).
    overwrite : bool
        Replace whatever is at ``out`` (a cache of any recipe, or a file that is no cache).
    progress : bool, optional
        Show a progress bar on stderr; default when stderr is a terminal.
    runtime : {'auto', 'torch', 'openvino', 'onnxruntime'}, optional
        What runs the network (:mod:`.runtimes`); default ``$CNNCODES_RUNTIME``, else ``auto``:
        on a CPU at fp32, the fastest
        installed inference runtime whose codes match PyTorch's on a probe batch (a cache made
        before keeps its own runtime), else PyTorch; the recipe records the runtime and its
        version, so a cache is never resumed with another runtime's rows.
    decode : {'cpu', 'gpu'}
        ``cpu``: Pillow and the weights' exact transform (bitwise reproducible). ``gpu``: on
        CUDA, JPEGs decoded by nvJPEG and resized on the device (:mod:`.device_decode`).

    Under ``torchrun`` every rank calls this with the same arguments: the ranks share the
    cache's fixed row blocks, write journal shards beside it, and rank 0 commits the cache, the
    one a single process makes (bitwise on a CPU); any world size resumes it.

    Examples
    --------
    >>> r = extract("data/digits", "cache/digits.h5", layers=["stage3", "penultimate"])  # doctest: +SKIP
    >>> r.state, r.layers                                                                # doctest: +SKIP
    ('created', {'stage3': 40, 'penultimate': 1280})
    """
    t_start = time.perf_counter()
    check_dtype(dtype)
    if batch_size < 1:
        raise SettingsError(f"batch_size must be >= 1, got {batch_size}.")
    ranks = init_distributed(device)  # a no-op without torchrun
    try:
        return _run_extraction(ranks, t_start, Path(data), out, _Settings(
            model, weights, layers, pool, dtype, device, precision, batch_size, workers, strict, overwrite,
            allow_overlap, progress, runtime, decode))
    finally:
        ranks.close()


@dataclass(frozen=True)
class _Settings:
    """``extract``'s arguments, as given."""

    model: str
    weights: str | None
    layers: tuple
    pool: str
    dtype: str
    device: str
    precision: str
    batch_size: int
    workers: int | None
    strict: bool
    overwrite: bool
    allow_overlap: bool
    progress: bool | None
    runtime: str | None
    decode: str


def _run_extraction(ranks: Dist, t_start: float, data: Path, out, a: _Settings) -> ExtractResult:
    layers = list(dict.fromkeys(a.layers or ["penultimate"]))
    pooling = parse_pooling(a.pool)
    dev = resolve_device(a.device)
    if dev.type == "cuda" and ranks.world > 1:
        dev = torch.device("cuda", ranks.local_rank)
    prec = resolve_precision(a.precision, dev)
    out = Path(out) if out else default_cache_path(data, a.model)
    # Never scan the output folder as data (`extract .` from the data root writes cache/ there).
    # Every rank reads the same image list (the rows are its order); rank 0 checks that they agree.
    table = find_images(data, exclude=out, allow_overlap=a.allow_overlap)
    if ranks.world > 1 and len(set(ranks.gather(table.list_fingerprint(), "reading the image list"))) > 1:
        raise SettingsError(f"the ranks read different image lists from {data}: run torchrun on a file "
                            f"system that every rank sees the same way.")
    if table.skipped and ranks.main:
        log.warning("input: %s", table.summary_of_skipped())
    lost = {k: v for k, v in table.skipped.items() if k in SHARD_DAMAGE}
    if a.strict and lost:  # a whole shard, or its end, could not be read: --strict promises every image
        reason, where = next(iter(lost.items()))
        raise ImageDecodeError(f"{where[0]}: {reason} (stopped by --strict)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with ranks.zero_first("loading the weights"):  # one download into a shared hub cache
        bb = load_backbone(a.model, a.weights)
    check_decode(a.decode, dev, bb.split, bb.name)
    cached = ranks.decide(lambda: _cached_runtime(out) if not a.overwrite else None)
    wanted = resolve_runtime(a.runtime, dev, prec, cached)
    recipe = backbone_recipe(bb, pooling, a.dtype, prec, table, wanted, a.decode)
    job = _Job(bb, table, recipe, pooling, dev, prec, data, a.batch_size, a.workers, a.strict, a.progress,
               t_start, strict_runtime=requested_runtime(a.runtime) != "auto", ranks=ranks)
    plan = ranks.decide(lambda: _plan(out, job, layers, a.overwrite), "planning")
    if plan.action == UP_TO_DATE:
        with open_cache(out) as c:
            res = job.result(out, c.status, "up to date", {n: int(c.layer_attrs(n)["dim"]) for n in c.layers})
    elif plan.new_layers:
        res = _add_layers(job, plan)
    else:
        res = _CacheRun(job, out, plan.layers, create=plan.create, replace=plan.replace,
                        fallback_ok=True).run()
    if a.strict and res.failed and ranks.main:  # --strict promises no failed image, also of an earlier run
        with open_cache(out) as c:
            row = int(np.flatnonzero(c.status == FAILED)[0])
            raise ImageDecodeError(f"{c.paths[row]}: {c.errors[row]} ({res.failed} images of {out} failed "
                                   f"to decode; stopped by --strict)")
    return res


def _plan(out: Path, job: _Job, layers, overwrite: bool) -> ExtractionPlan:
    plan = plan_extraction(out, job.recipe, layers, overwrite=overwrite, table=job.table)
    if plan.replace or overwrite:  # an interrupted layer addition to the cache being replaced is stale too
        discard_cache(plan.companion)
    return plan


def _cached_runtime(out: Path) -> str | None:
    """The runtime an existing cache at ``out`` was made with (None: no readable cache)."""
    if not out.exists():
        return None
    try:
        return Recipe.from_attrs(read_attrs(out)).runtime
    except CnnCodesError:
        return None


def default_cache_path(data: str | os.PathLike, model: str) -> Path:
    """``cache/<data folder name>-<model>.h5``."""
    return Path("cache") / f"{dataset_name(data)}-{slug(model)}.h5"


@dataclass
class _Job:
    """What one ``extract`` call runs, shared by every cache it brings up to date (the cache
    itself and, when layers are added, their companion cache)."""

    bb: Backbone
    table: ImageTable
    recipe: Recipe
    pooling: Pooling
    dev: torch.device
    prec: str
    data: Path
    batch_size: int
    workers: int | None
    strict: bool
    progress: bool | None
    t_start: float = field(default_factory=time.perf_counter)
    strict_runtime: bool = False  # the runtime was named: no fallback to PyTorch
    ranks: Dist = field(default_factory=Dist)  # the torchrun ranks sharing the work (1 without)

    @functools.cached_property
    def probe(self) -> Probe:  # a forward pass at the input size: only when a run needs it
        return Probe(self.bb.model, self.bb.input_size, self.bb.name)

    def attrs(self) -> dict:
        return {**self.recipe.to_attrs(), "data_root": str(self.data.resolve()),
                "versions": library_versions()}

    def result(self, path: Path, status: np.ndarray, state: str, layers: dict[str, int],
               run: _CacheRun | None = None,
               ) -> ExtractResult:
        processed, loop = (run.processed, run.loop_seconds) if run else (0, 0.0)
        skipped = [f"input: {self.table.summary_of_skipped()}"] if self.table.skipped else []
        return ExtractResult(path, state, len(self.table), int((status == DONE).sum()),
                             int((status == FAILED).sum()), int((status == PENDING).sum()), processed, loop,
                             str(self.dev), layers, list(run.failures) if run else [],
                             list(self.bb.warnings) + skipped, time.perf_counter() - self.t_start - loop,
                             {k: len(v) for k, v in self.table.skipped.items()}, self.recipe.runtime)


class _CacheRun:
    """One cache brought up to date: created (or replaced) with ``layers``, or resumed.

    ``processed``, ``failures`` and ``loop_seconds`` say what the run did, also after an
    interruption.
    """

    def __init__(self, job: _Job, path: Path, layers, create: bool, replace: bool = False,
                 fallback_ok: bool = False, owner: Path | None = None):
        self.job, self.path, self.create, self.replace = job, path, create, replace
        self.owner = owner or path  # the cache a person named (a companion's is the cache it extends)
        self.fallback_ok = fallback_ok and create  # a new cache (not a companion) may record PyTorch
        self.taps = job.probe.resolve(list(layers))
        self.specs = layer_specs(self.taps, job.pooling, job.bb.input_size, job.probe)
        self.processed, self.failures, self.loop_seconds = 0, [], 0.0
        self._absorbed: list = []  # other ranks' shards applied while this rank computed
        if not create:
            self._check_modules()
        self.prepared = None

    def _prepare(self) -> PreparedNetwork:
        """The network, compiled by the recipe's runtime: for a new cache before its file is
        written (an ``auto`` runtime that falls back to PyTorch is recorded as PyTorch), for an
        existing one when it has rows to compute, which only the runtime that made the cache
        may compute."""
        job = self.job
        if self.prepared is None:
            wanted = job.recipe.runtime
            if self.fallback_ok:
                self.prepared = PreparedNetwork(job.bb, self.taps, job.pooling, job.dev, wanted,
                                                job.strict_runtime)
                job.recipe = job.recipe.replace(runtime=self.prepared.runtime)
                return self.prepared
            name = wanted.split()[0]
            installed = label(name) if name == "torch" or runtime_version(name) else "not installed"
            why = f"{name} here is {installed}" if installed != wanted else ""
            if not why:
                try:
                    self.prepared = PreparedNetwork(job.bb, self.taps, job.pooling, job.dev, wanted,
                                                    strict=True)
                except RuntimeUnavailableError as e:
                    why = str(e)
            if why:
                fix = f"Install it (pip install '{name}=={wanted.split()[1]}') to continue the cache, " \
                    f"pass" if " " in wanted else "Pass"
                raise IncompatibleCacheError(
                    f"{self.owner} holds codes computed by {wanted}, which cannot compute its missing rows "
                    f"({why}).", path=self.owner, reasons=[f"runtime: {wanted} cannot run"],
                    remedy=f"{fix} --overwrite to extract it anew, or choose another --out.")
        return self.prepared

    def _check_modules(self) -> None:
        """A resumed cache's layers must come from the modules they were read from: a name
        can change meaning between versions (an alias resolved anew), and rows of two modules
        under one name would be taken for one layer."""
        with open_cache(self.path) as c:
            for spec in self.specs:
                if spec.name not in c.layers:
                    continue
                have = c.layer_attrs(spec.name)
                was = (have.get("module"), have.get("hook", spec.attrs["hook"]),
                       int(have.get("dim", spec.dim)))
                now = (spec.attrs["module"], spec.attrs["hook"], spec.dim)
                if was != now:
                    raise IncompatibleCacheError(
                        f"{self.path}: layer '{spec.name}' holds codes of module '{was[0]}' ({was[2]}-d), "
                        f"but '{spec.name}' now means '{now[0]}' ({now[2]}-d).", path=self.path,
                        reasons=[f"layer {spec.name}: module {was[0]} -> {now[0]}"],
                        remedy="Rerun with --overwrite to extract it anew, or choose another --out.")

    @property
    def dims(self) -> dict[str, int]:
        return {s.name: s.dim for s in self.specs}

    def _create_file(self) -> None:
        # Under the writer's lock: a cache that appeared since the plan was made is another
        # process's, and only --overwrite may replace it.
        if self.path.exists() and not self.replace:
            raise CacheLockedError(f"{self.path} was created by another process meanwhile; rerun to use it.")
        t = self.job.table
        create_cache(self.path, paths=t.paths, labels=t.labels, splits=t.splits, classes=t.classes,
                     layers=self.specs, attrs=self.job.attrs())

    def run(self) -> ExtractResult:
        """Extract every pending row; interrupted runs save what they finished and raise
        :class:`ExtractionInterrupted`."""
        try:
            return self._run()
        except OSError as e:  # a full disk, a read-only folder: the journal keeps what was saved
            raise _write_error(e, self.path, len(self.job.table)) from None

    def _prepare_everywhere(self) -> None:
        """:meth:`_prepare` on rank 0 first (it may fall back, and it fills the export cache),
        then on the other ranks with the runtime rank 0 ended with."""
        if self.prepared is not None:
            return
        ranks = self.job.ranks
        runtime = ranks.decide(lambda: self._prepare().runtime, "preparing the network")
        if not ranks.main:
            self.job.recipe = self.job.recipe.replace(runtime=runtime)
            self.fallback_ok = False
            self._prepare()

    def _open_writer(self, writer: CacheWriter) -> np.ndarray:
        """Rank 0: the writing session opened (the file created, the journal replayed, changed
        images put back to pending); returns the pending rows."""
        writer.__enter__()
        try:
            t = self.job.table
            stale, _ = writer.refresh(t.sizes, t.mtimes, t.digest)
            pending = writer.pending_rows()
        except BaseException:
            writer.close()
            raise
        return pending, stale + writer.replayed  # a replayed journal is news too, not "up to date"

    def _run(self) -> ExtractResult:
        job, ranks = self.job, self.job.ranks
        if self.create and len(job.table):  # before the file: its recipe records the runtime that runs
            self._prepare_everywhere()
        if not ranks.main:
            writer = ShardWriter(self.path)
            pending, stale = ranks.decide(lambda: None, "opening the cache")
            return self._run_beside(writer, pending, self._state(pending, stale))
        writer = CacheWriter(self.path, create=self._create_file if self.create else None)
        writer.keep_journal = ranks.world > 1  # the other ranks write into it until the end
        try:
            pending, stale = ranks.decide(lambda: self._open_writer(writer), "opening the cache")
            state = self._state(pending, stale)
            t0 = time.perf_counter()
            try:
                if len(pending):
                    self._prepare_everywhere()
                    self._encode_into(writer, pending)
                # each rank names the shards it wrote: rank 0 looks them up by name, as a network
                # file system's cached listing of the journal may not show them yet
                written = ranks.gather([], "finishing their rows")
                self._take_others(writer.absorb([n for names in written for n in names], wait=60))
                if ranks.world > 1:  # the rate of all ranks: until the last one's rows are in
                    self.loop_seconds = time.perf_counter() - t0
            except KeyboardInterrupt:
                self._take_others(writer.absorb())
                writer.commit()
                res = job.result(self.path, writer.status, "interrupted", self.dims, self)
                raise ExtractionInterrupted(
                    f"interrupted: {res.done + res.failed}/{res.images} images saved in {self.path}; "
                    f"rerun the same command to resume.", res) from None
            except (ImageDecodeError, RankFailedError):
                writer.commit()
                raise
            writer.commit()
            ranks.share(writer.status.copy(), "committing the cache")
            writer.keep_journal = False  # every rank is done with it
            return job.result(self.path, writer.status, state, self.dims, self)
        finally:
            writer.close()

    def _state(self, pending: np.ndarray, stale: int) -> str:
        if not len(pending) and not self.create and not stale:
            return "up to date"  # only mtimes moved: recorded, nothing to extract
        return "created" if self.create else "resumed"

    def _run_beside(self, writer: ShardWriter, pending: np.ndarray, state: str) -> ExtractResult:
        """A rank other than 0: its share of the rows into journal shards; rank 0 commits."""
        job = self.job
        try:
            if len(pending):
                self._prepare_everywhere()
                self._encode_into(writer, pending)
            job.ranks.gather(writer.written, "finishing their rows")
        except KeyboardInterrupt:
            raise ExtractionInterrupted(f"interrupted: rank {job.ranks.rank} saved {self.processed} images "
                                        f"into {writer.journal.dir}", job.result(
                                            self.path, np.zeros(0, np.uint8), "interrupted", self.dims,
                                            self)) from None
        status = job.ranks.share(what="committing the cache")
        return job.result(self.path, status, state, self.dims, self)

    def _take_others(self, batches) -> None:
        """Rank 0: count the rows and failures of the other ranks' shards it applied (during
        the run, by the writer thread, and at its end)."""
        batches, self._absorbed = self._absorbed + list(batches), []
        for rows, status, errors in batches:
            self.processed += len(rows)
            self.failures.extend((self.job.table.paths[r], e) for r, s, e in
                                 zip(rows.tolist(), status.tolist(), errors) if s == FAILED)

    def _encode_into(self, writer, pending: np.ndarray) -> None:
        job, ranks = self.job, self.job.ranks
        encoder, dataset = make_encoder(job.bb, job.probe, self.taps, job.pooling, job.dev, job.prec,
                                        job.batch_size, self.dims, job.recipe.dtype, job.table,
                                        self._prepare(), job.recipe.decode)
        # Fixed row blocks, dealt out in turn: the codes of a block do not depend on which rank
        # (or how many) computed it, and no row is computed twice or left out.
        blocks = row_blocks(pending, job.batch_size)
        mine = blocks[ranks.rank::ranks.world]
        others = {b[0]: len(b) for i, b in enumerate(blocks) if i % ranks.world != ranks.rank}
        t0 = time.perf_counter()
        try:
            with _BackgroundWriter(writer, self._absorbed) as background, \
                    _Progress(len(pending), job.progress if ranks.main else False) as bar, \
                    _OtherRanks(writer.journal, others, bar, background.absorb,
                                active=ranks.main and ranks.world > 1), \
                    _sigterm_as_interrupt(), encoder, \
                    contextlib.closing(encoded_batches(encoder, dataset, mine, job.dev,
                                                       job.workers)) as batches:
                # closing(): an interrupt stops the lanes (each finishes its batch) before the commit
                for rows, ok, errs, codes, content in batches:
                    bad = [(job.table.paths[r], e) for r, e in zip(rows.tolist(), errs) if e]
                    if bad and job.strict:
                        raise ImageDecodeError(f"{bad[0][0]}: {bad[0][1]} (stopped by --strict)")
                    background.put(rows, np.where(ok, DONE, FAILED), list(errs), codes, content)
                    self.failures.extend(bad)
                    self.processed += len(rows)
                    bar.update(len(rows), len(self.failures))
        finally:
            self.loop_seconds = time.perf_counter() - t0


class _OtherRanks:
    """Rank 0 follows the other ranks: a thread watches the journal for their shards (named
    after their first row), counts their rows in the progress bar and has the writer thread
    apply them as they come (``absorb``), so little is left to apply when all are done."""

    def __init__(self, journal: Journal, blocks: dict[int, int], bar: _Progress, absorb=None,
                 active: bool = True):
        self.journal, self.blocks, self.bar, self.active = journal, dict(blocks), bar, active
        self.absorb = absorb
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="cnncodes-ranks", daemon=True)

    def _watch(self) -> None:
        while self.blocks and not self.stop.wait(0.5):
            self._count()

    def _count(self) -> None:
        for shard in self.journal.shards():
            try:
                first = int(shard.name.split("-")[1])
            except (IndexError, ValueError):
                continue
            n = self.blocks.pop(first, 0)
            if n:
                self.bar.update(n, 0)
                if self.absorb is not None:
                    self.absorb()

    def __enter__(self):
        if self.active:
            self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.active:
            self.stop.set()
            self.thread.join()


_ABSORB = object()  # a request to the writer thread: apply the other ranks' new shards


class _BackgroundWriter:
    """Journal shards and the working copy are written on a thread of their own while the next
    batch computes; a write error surfaces in the caller at the next batch or on exit."""

    def __init__(self, writer, absorbed: list | None = None):
        self.writer = writer
        self.queue: queue.Queue = queue.Queue(maxsize=4)
        self.errors: list[BaseException] = []
        self.absorbed = absorbed if absorbed is not None else []  # other ranks' shards applied
        self.thread = threading.Thread(target=self._loop, name="cnncodes-writer", daemon=True)

    def absorb(self) -> None:
        """Ask the writer thread to apply the other ranks' new shards (rank 0's CacheWriter)."""
        with contextlib.suppress(queue.Full):
            self.queue.put_nowait(_ABSORB)

    def _loop(self) -> None:
        while (item := self.queue.get()) is not None:
            try:
                if item is _ABSORB:
                    if not self.errors:
                        self.absorbed.extend(self.writer.absorb())
                elif not self.errors:
                    self.writer.add(*item)
            except RuntimeError as e:  # h5py's word for a write that failed (a full disk)
                self.errors.append(OSError(errno.EIO, str(e).split("(")[0].strip(), str(self.writer.work)))
            except BaseException as e:  # noqa: BLE001 - surfaced in the main thread
                self.errors.append(e)

    def put(self, *batch) -> None:
        if self.errors:
            raise self.errors[0]
        self.queue.put(batch)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, exc_type, *exc):
        self.queue.put(None)
        self.thread.join()
        if self.errors and exc_type is None:
            raise self.errors[0]


class _Progress:
    """The extraction's progress bar on stderr; tqdm's ``disable=None`` hides it when stderr is
    not a terminal."""

    def __init__(self, total: int, progress: bool | None):
        self.bar = tqdm(total=total, unit="img", desc="extract", dynamic_ncols=True,
                        disable={True: False, False: True, None: None}[progress])

    def update(self, n: int, failed: int) -> None:
        self.bar.update(n)  # tqdm serialises updates from several threads
        if failed:
            self.bar.set_postfix(failed=failed, refresh=False)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """``kill`` (SIGTERM) saves what is finished, as Ctrl-C does (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _write_error(e: OSError, path: Path, images: int) -> CacheWriteError:
    """One line for a cache that could not be written: what failed, what is safe, what to do."""
    try:
        with open_cache(path) as c:
            saved = int((c.status != PENDING).sum())
    except CnnCodesError:
        saved = 0
    saved += Journal(path).row_count()[0]
    where = e.filename or path
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        what, todo = "no space left on the device of", "free space and rerun"
    elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        what, todo = f"cannot write ({e.strerror}):", "make it writable (or choose another --out) and rerun"
    else:
        what, todo = f"{e.strerror or e}:", "rerun"
    return CacheWriteError(f"{what} {where}; {saved} of {images} images are saved; {todo} the same "
                           f"command to resume.")


def _add_layers(job: _Job, plan: ExtractionPlan) -> ExtractResult:
    """Add ``plan.new_layers`` to an existing cache of the same recipe.

    The cache is first finished with the layers it has (if it was interrupted); the new layers
    are then extracted into a companion cache, resumable on its own like any cache, and finally
    copied into a working copy that replaces the cache in one rename. So a kill at any moment
    leaves the cache whole and the next run carries on where this one stopped.
    """
    ranks = job.ranks
    if plan.finish_first:
        _CacheRun(job, plan.path, plan.layers, create=False).run()
    part = ranks.decide(lambda: _companion_plan(job, plan), "planning the layer addition")
    if part.action == UP_TO_DATE:  # finished before a kill stopped the merge
        res = ranks.decide(lambda: _finished(job, part.path), "reading the finished layers")
    else:
        res = _CacheRun(job, part.path, part.layers, create=part.create, owner=plan.path).run()
    dims = ranks.decide(lambda: _merge_layers(plan, part.path), "adding the layers to the cache")
    return dataclasses.replace(res, path=plan.path, state="layers added", layers=dims,
                               setup_seconds=time.perf_counter() - job.t_start - res.seconds)


def _finished(job: _Job, path: Path) -> ExtractResult:
    with open_cache(path) as c:
        return job.result(path, c.status, "layers added", {})


def _companion_plan(job: _Job, plan: ExtractionPlan) -> ExtractionPlan:
    part = plan_extraction(plan.companion, job.recipe, plan.new_layers, table=job.table)
    if part.action == ADD_LAYERS or set(part.layers) != set(plan.new_layers):
        # left by an addition of other layers that was killed: not this addition's companion
        discard_cache(part.path)
        part = plan_extraction(plan.companion, job.recipe, plan.new_layers, table=job.table)
    return part


def _merge_layers(plan: ExtractionPlan, companion: Path) -> dict[str, int]:
    """Copy the finished companion's layers into the cache (one rename), then delete it."""
    with CacheWriter(plan.path) as writer:
        writer.add_layers_from(companion)
        writer.commit()
    companion.unlink()
    with open_cache(plan.path) as c:
        dims = {name: int(c.layer_attrs(name)["dim"]) for name in c.layers}
    missing = [name for name in plan.new_layers if name not in dims]
    if missing:  # a broken invariant, not bad input: say so loudly
        raise RuntimeError(f"adding {', '.join(missing)} to {plan.path} left them out")
    return dims

"""One cache brought up to date: the job an ``extract`` call runs, the run of one cache
(created, replaced or resumed; on every torchrun rank), and what it did.

A :class:`CacheRun` computes the pending rows in fixed row blocks (batches from
:mod:`.batching`), writes them on a background thread (:mod:`.background`) and commits the
cache; interrupted, it saves what it finished and raises :class:`ExtractionInterrupted`.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .backbones.backbone import Backbone
from .background import BackgroundWriter, OtherRanks, Progress, sigterm_as_interrupt
from .batching import encoded_batches, row_blocks
from .cache import DONE, FAILED, PENDING, create_cache, open_cache
from .distributed import Dist, RankFailedError
from .encoding import PreparedNetwork, layer_specs, make_encoder
from .errors import (
    CacheLockedError,
    CacheWriteError,
    CnnCodesError,
    ImageDecodeError,
    IncompatibleCacheError,
)
from .images import ImageTable
from .journal import Journal
from .layers import Probe
from .pooling import Pooling
from .provenance import library_versions
from .recipe import Recipe
from .runtimes import RuntimeUnavailableError, label, runtime_version
from .writer import CacheWriter, ShardWriter


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


@dataclass
class Job:
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
               run: CacheRun | None = None,
               ) -> ExtractResult:
        processed, loop = (run.processed, run.loop_seconds) if run else (0, 0.0)
        skipped = [f"input: {self.table.summary_of_skipped()}"] if self.table.skipped else []
        return ExtractResult(path, state, len(self.table), int((status == DONE).sum()),
                             int((status == FAILED).sum()), int((status == PENDING).sum()), processed, loop,
                             str(self.dev), layers, list(run.failures) if run else [],
                             list(self.bb.warnings) + skipped, time.perf_counter() - self.t_start - loop,
                             {k: len(v) for k, v in self.table.skipped.items()}, self.recipe.runtime)


class CacheRun:
    """One cache brought up to date: created (or replaced) with ``layers``, or resumed.

    ``processed``, ``failures`` and ``loop_seconds`` say what the run did, also after an
    interruption.
    """

    def __init__(self, job: Job, path: Path, layers, create: bool, replace: bool = False,
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
            with BackgroundWriter(writer, self._absorbed) as background, \
                    Progress(len(pending), job.progress if ranks.main else False) as bar, \
                    OtherRanks(writer.journal, others, bar, background.absorb,
                                active=ranks.main and ranks.world > 1), \
                    sigterm_as_interrupt(), encoder, \
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

"""The run of an extraction: images -> pretrained CNN -> pooled codes -> HDF5 cache.

``extract`` resolves the settings, asks :func:`~.plan.plan_extraction` what to do with the
output path, and runs that plan: a :class:`~.cache_run.CacheRun` brings one cache up to date
(batches from :mod:`.batching`, writes on a background thread), and adding layers runs one for
the cache and one for a companion cache, then merges them. Devices and precision live in
:mod:`.devices`.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .backbones.backbone import DEFAULT_MODEL
from .backbones.loading import load_backbone
from .cache import FAILED, open_cache, read_attrs
from .cache_run import CacheRun, ExtractResult, Job
from .decoding import requested_decode, resolve_decode
from .device_decode import check_decode
from .devices import check_dtype, resolve_device, resolve_precision
from .distributed import Dist, init_distributed
from .encoding import backbone_recipe
from .errors import CnnCodesError, ImageDecodeError, SettingsError
from .files import dataset_name, slug
from .journal import discard_cache
from .plan import ADD_LAYERS, UP_TO_DATE, ExtractionPlan, plan_extraction
from .pooling import parse_pooling
from .recipe import Recipe
from .runtimes import requested as requested_runtime
from .runtimes import resolve_runtime
from .shards import SHARD_DAMAGE
from .sources import find_images
from .writer import CacheWriter

log = logging.getLogger(__name__)


def extract(data, out=None, *, model: str = DEFAULT_MODEL, weights: str | None = "DEFAULT",
            layers=("penultimate",), pool: str = "avg", dtype: str = "float32",
            device: str = "auto", precision: str = "auto", batch_size: int = 32,
            workers: int | None = None, strict: bool = False, overwrite: bool = False,
            allow_overlap: bool = False, progress: bool | None = None,
            runtime: str | None = None, decode: str = "auto") -> ExtractResult:
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
    decode : {'auto', 'reduced', 'exact', 'gpu'}
        How images become network inputs (:mod:`.decoding`). ``reduced``: Pillow decodes at the
        smallest scale that keeps the pixels the resize needs (JPEG DCT scaling), then the
        weights' exact resize. ``exact``: Pillow at full size and the weights' transform,
        bitwise (``cpu`` is its former name). ``gpu``: on CUDA, JPEGs decoded by nvJPEG and
        resized on the device (:mod:`.device_decode`). ``auto``: an existing cache's path, else
        ``reduced``.

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
    cached = ranks.decide(lambda: _cached_recipe(out) if not a.overwrite else None)
    wanted = resolve_runtime(a.runtime, dev, prec, cached.runtime if cached else None)
    decode = resolve_decode(a.decode, cached.decode if cached else None, bb.decode)
    # checked once resolved: `auto` keeps a cache's path, which this run must be able to take too
    # (a `gpu` cache resumed on a CPU would mix libjpeg's rows with nvJPEG's)
    check_decode(decode, dev, bb.split, bb.name,
                 made_by=str(out) if cached is not None and requested_decode(a.decode) == "auto" else None)
    recipe = backbone_recipe(bb, pooling, a.dtype, prec, table, wanted, decode)
    job = Job(bb, table, recipe, pooling, dev, prec, data, a.batch_size, a.workers, a.strict, a.progress,
               t_start, strict_runtime=requested_runtime(a.runtime) != "auto", ranks=ranks)
    plan = ranks.decide(lambda: _plan(out, job, layers, a.overwrite), "planning")
    if plan.action == UP_TO_DATE:
        with open_cache(out) as c:
            res = job.result(out, c.status, "up to date", {n: int(c.layer_attrs(n)["dim"]) for n in c.layers})
    elif plan.new_layers:
        res = _add_layers(job, plan)
    else:
        res = CacheRun(job, out, plan.layers, create=plan.create, replace=plan.replace,
                        fallback_ok=True).run()
    if a.strict and res.failed and ranks.main:  # --strict promises no failed image, also of an earlier run
        with open_cache(out) as c:
            row = int(np.flatnonzero(c.status == FAILED)[0])
            raise ImageDecodeError(f"{c.paths[row]}: {c.errors[row]} ({res.failed} images of {out} failed "
                                   f"to decode; stopped by --strict)")
    return res


def _plan(out: Path, job: Job, layers, overwrite: bool) -> ExtractionPlan:
    plan = plan_extraction(out, job.recipe, layers, overwrite=overwrite, table=job.table)
    if plan.replace or overwrite:  # an interrupted layer addition to the cache being replaced is stale too
        discard_cache(plan.companion)
    return plan


def _cached_recipe(out: Path) -> Recipe | None:
    """The recipe of an existing cache at ``out`` (None: no readable cache), whose runtime and
    decode path ``auto`` keeps."""
    if not out.exists():
        return None
    try:
        return Recipe.from_attrs(read_attrs(out))
    except CnnCodesError:
        return None


def default_cache_path(data: str | os.PathLike, model: str) -> Path:
    """``cache/<data folder name>-<model>.h5``."""
    return Path("cache") / f"{dataset_name(data)}-{slug(model)}.h5"


def _add_layers(job: Job, plan: ExtractionPlan) -> ExtractResult:
    """Add ``plan.new_layers`` to an existing cache of the same recipe.

    The cache is first finished with the layers it has (if it was interrupted); the new layers
    are then extracted into a companion cache, resumable on its own like any cache, and finally
    copied into a working copy that replaces the cache in one rename. So a kill at any moment
    leaves the cache whole and the next run carries on where this one stopped.
    """
    ranks = job.ranks
    if plan.finish_first:
        CacheRun(job, plan.path, plan.layers, create=False).run()
    part = ranks.decide(lambda: _companion_plan(job, plan), "planning the layer addition")
    if part.action == UP_TO_DATE:  # finished before a kill stopped the merge
        res = ranks.decide(lambda: _finished(job, part.path), "reading the finished layers")
    else:
        res = CacheRun(job, part.path, part.layers, create=part.create, owner=plan.path).run()
    dims = ranks.decide(lambda: _merge_layers(plan, part.path), "adding the layers to the cache")
    return dataclasses.replace(res, path=plan.path, state="layers added", layers=dims,
                               setup_seconds=time.perf_counter() - job.t_start - res.seconds)


def _finished(job: Job, path: Path) -> ExtractResult:
    with open_cache(path) as c:
        return job.result(path, c.status, "layers added", {})


def _companion_plan(job: Job, plan: ExtractionPlan) -> ExtractionPlan:
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

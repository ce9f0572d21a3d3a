"""From a backbone and layer names to codes: the prepared network, the layers' specs, and codes
of image files in memory.

``prepare_model`` folds batch norm into the convolutions (checked against the unfolded network
on a probe batch) and picks the memory format; ``make_encoder`` pairs it with the decoding of
an image table; :func:`encode_images` runs both without a cache (``predict``). The cache-side
run of the same pieces is :mod:`.engine`'s.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from .backbones.backbone import Backbone
from .batching import (
    MICRO_BATCH_BYTES,
    DecodedImages,
    EncodedImages,
    Encoder,
    encoded_batches,
    micro_batch_size,
)
from .cache import LayerSpec
from .decoding import decode_min_size
from .devices import resolve_device, resolve_precision
from .errors import PoolingError
from .fusion import fold_batchnorm
from .images import ImageTable
from .layer_kinds import VECTOR
from .layers import Probe, Tap, Tapper
from .pooling import Pooling, parse_pooling
from .recipe import Recipe

log = logging.getLogger(__name__)


def backbone_recipe(bb: Backbone, pooling: Pooling, dtype: str, precision: str,
                    table: ImageTable | None = None, runtime: str = "torch", decode: str = "exact") -> Recipe:
    """The :class:`Recipe` of codes that ``bb`` makes with these settings (of ``table``'s images)."""
    return Recipe(bb.name, bb.weights, bb.preprocessing, str(pooling), dtype, precision, bb.input_size,
                  table.list_fingerprint() if table is not None else None, runtime, decode)


def layer_specs(taps: list[Tap], pooling: Pooling, input_size: int,
                probe: Probe | None = None) -> list[LayerSpec]:
    """The cache's description of each tap's codes; a :class:`PoolingError` naming the layers
    that can be pooled so when ``pooling`` means nothing for one of them."""
    for t in taps:
        why = pooling.refusal(t.layout)
        if why:
            can = probe.poolable(pooling) if probe is not None else []
            more = f" ({len(can) - 8} more)" if len(can) > 8 else ""
            if can:
                hint = f" Layers that can take --pool {pooling}: {', '.join(can[:8])}{more}."
            else:
                hint = f" No map or token layer of this model can take --pool {pooling}." if probe else ""
            raise PoolingError(f"'{t.name}' is {why}.{hint}")
    return [LayerSpec(t.name, pooling.dim(t.layout),
                      {"module": t.module, "hook": t.hook, **t.layout.to_attrs(),
                       "pooling": str(pooling) if t.layout.kind != VECTOR else "none",
                       "unpooled_shape": list(t.shape), "stride": t.stride or -1,
                       "dim": pooling.dim(t.layout), "input_size": input_size,
                       "relative_depth": t.relative_depth, "flops": int(t.flops)})
            for t in taps]


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


class PreparedNetwork:
    """The network a run computes with: batch norm folded and on its device (PyTorch), or that
    network compiled by an inference runtime (:mod:`.runtimes`); ``runtime`` is the label the
    recipe records."""

    def __init__(self, bb: Backbone, taps: list[Tap], pooling: Pooling, dev, runtime: str = "torch",
                 strict: bool = False):
        from .runtimes import compile_taps
        self.net = prepare_model(bb, taps, dev)
        self.tapper, self.runtime = None, "torch"
        if runtime != "torch":
            self.tapper, self.runtime = compile_taps(runtime, self.net, taps, pooling, bb.input_size, bb.name,
                                                     max(1, torch.get_num_threads()), strict, bb.split)
            if self.runtime == "torch":
                self.tapper = None


def make_encoder(bb: Backbone, probe: Probe, taps: list[Tap], pooling: Pooling, dev, prec: str,
                 batch_size: int, dims: dict[str, int], dtype: str,
                 table: ImageTable, prepared: PreparedNetwork | None = None,
                 decode: str = "exact") -> tuple[Encoder, DecodedImages]:
    """The prepared network as an :class:`Encoder`, and the decoding of ``table``'s images
    (:mod:`.decoding`; ``decode="gpu"``: the loader reads bytes, :mod:`.device_decode` decodes
    them on ``dev``)."""
    prepared = prepared or PreparedNetwork(bb, taps, pooling, dev)
    # a runtime takes the whole batch: its kernels do not page-fault as PyTorch's large
    # activations do, so the allocator-friendly micro-batches are PyTorch's alone
    micro = batch_size if prepared.tapper is not None else micro_batch_size(dev, batch_size, probe, taps)
    if prepared.tapper is not None:
        prepared.tapper.warm_up(min(batch_size, len(table)) or 1, bb.input_size)
    split = bb.split  # per-image PIL part in the decoders, float arithmetic per batch in the encoder
    decoder = None
    if decode == "gpu":
        from .device_decode import DeviceDecoder
        decoder, dataset = DeviceDecoder(split, dev, table.paths), EncodedImages(table)
    else:
        dataset = DecodedImages(table, split.pil if split else bb.transform,
                                decode_min_size(decode, bb.preprocessing))
    encoder = Encoder(prepared.net, taps, pooling, split, dev, prec, micro, dims, np.dtype(dtype),
                      prepared.tapper, decoder)
    # a lane's uint8 batch (stacked: twice), its float micro-batch and the largest activations
    pixels = 3 * bb.input_size ** 2
    encoder.lane_bytes = 2 * batch_size * pixels + micro * pixels * 4 + 3 * MICRO_BATCH_BYTES
    return encoder, dataset


def encode_images(bb: Backbone, paths, layers, pool: str = "avg", *, device: str = "auto",
                  precision: str = "auto", batch_size: int = 32, dtype: str = "float32",
                  runtime: str | None = None, decode: str = "exact"):
    """Codes of image files in memory, with no cache: ``({layer: N x D}, errors)``.

    ``errors[i]`` is "" for an image that decoded, else its error (its codes are zeros). The
    same decoding (``decode``: ``reduced`` or ``exact``, :mod:`.decoding`), taps, pooling,
    network preparation and runtime choice as :func:`extract`.

    Examples
    --------
    >>> codes, errors = encode_images(load_backbone(), ["a.jpg", "b.png"], ["penultimate"])  # doctest: +SKIP
    """
    from pathlib import Path as _P
    paths = [str(_P(p).resolve()) for p in paths]
    table = ImageTable(_P("/"), paths, np.full(len(paths), -1, dtype=np.int64), [""] * len(paths), [])
    return encode_rows(bb, table, np.arange(len(paths)), layers, pool, device=device, precision=precision,
                       batch_size=batch_size, dtype=dtype, runtime=runtime, decode=decode)


def encode_rows(bb: Backbone, table: ImageTable, rows, layers, pool: str = "avg", *, device: str = "auto",
                precision: str = "auto", batch_size: int = 32, dtype: str = "float32",
                runtime: str | None = None, decode: str = "exact"):
    """:func:`encode_images` of rows of an image table (files or tar members): codes in the
    order of ``rows``."""
    pooling = parse_pooling(pool)
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    rows = np.asarray(rows, dtype=np.int64)
    probe = Probe(bb.model, bb.input_size, bb.name)
    taps = probe.resolve(list(layers))
    dims = {s.name: s.dim for s in layer_specs(taps, pooling, bb.input_size, probe)}
    out = {name: np.zeros((len(rows), d), np.dtype(dtype)) for name, d in dims.items()}
    errors = [""] * len(rows)
    if not len(rows):
        return out, errors
    from .runtimes import requested, resolve_runtime
    wanted = resolve_runtime(runtime, dev, prec)
    prepared = PreparedNetwork(bb, taps, pooling, dev, wanted, strict=requested(runtime) != "auto")
    encoder, dataset = make_encoder(bb, probe, taps, pooling, dev, prec, batch_size, dims, dtype, table,
                                    prepared, decode)
    where = {int(r): i for i, r in enumerate(rows)}
    with encoder:
        # full batches in the given order (the fixed row blocks are for caches' resume)
        batches = [rows[i:i + batch_size].tolist() for i in range(0, len(rows), batch_size)]
        for done, _, errs, codes, _ in encoded_batches(encoder, dataset, batches, dev, workers=0):
            at = [where[int(r)] for r in done]
            for name, block in codes.items():
                out[name][at] = block
            for i, e in zip(at, errs):
                errors[i] = e
    return out, errors

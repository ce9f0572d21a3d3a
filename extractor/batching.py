"""Batches and CPU lanes: decoded images in fixed row blocks -> codes, by the fastest plan for
the device.

On an accelerator, DataLoader worker processes decode while the main thread feeds the device;
on a CPU, one thread per core decodes a whole batch and computes it single-threaded, so one
core decodes while the other computes (see ``_encode_lanes``). Batches are fixed blocks of rows
(``[k*B, (k+1)*B)`` minus rows already done), so a resumed run forms exactly the batches an
uninterrupted run would have formed, and on the CPU its codes are bitwise identical.
"""
from __future__ import annotations

import contextlib
import os

import numpy as np
import torch

from .devices import autocast
from .images import Content, ImageTable
from .layers import Probe, Tap, Tapper


class DecodedImages(torch.utils.data.Dataset):
    """Decodes one row into ``(row, tensor or None, error, Content)``; a failure is returned, not
    raised, so one bad file never stops a run. ``Content`` identifies the bytes decoded;
    ``min_size`` asks for a reduced decode (:func:`.images.decode_rgb`)."""

    def __init__(self, table: ImageTable, transform, min_size: tuple[int, int] | None = None):
        self.table, self.transform, self.min_size = table, transform, min_size

    def __len__(self):
        return len(self.table)

    def __getitem__(self, i):
        content = Content()
        try:
            return i, self.transform(self.table.load(i, content, self.min_size)), "", content
        except Exception as e:  # noqa: BLE001 - any decode error becomes a failed row
            return i, None, f"{type(e).__name__}: {e}".strip()[:500], content


class EncodedImages(DecodedImages):
    """Reads one row's encoded bytes into ``(row, bytes or None, error, Content)``, for a
    decoder on the device (:mod:`.device_decode`)."""

    def __init__(self, table: ImageTable):
        super().__init__(table, None)

    def __getitem__(self, i):
        content = Content()
        try:
            data, mtime = self.table.read(i)
        except OSError as e:
            return i, None, f"{type(e).__name__}: {e}".strip()[:500], content
        content.record(data, mtime)
        return i, data, "" if data else "OSError: empty file", content


def collate(items):
    """Decoded rows -> ``(rows, batch tensor or None, errors, content columns)`` (encoded rows:
    a list of bytes or None per row instead of the batch)."""
    rows = np.array([item[0] for item in items], dtype=np.int64)
    content = {"sha256": np.array([item[3].sha256 for item in items], dtype="<U64"),
               "size": np.array([item[3].size for item in items], dtype=np.int64),
               "mtime_ns": np.array([item[3].mtime_ns for item in items], dtype=np.int64)}
    good = [item[1] for item in items if item[1] is not None]
    x = None
    if good and isinstance(good[0], bytes):
        x = [item[1] for item in items]
    elif good and good[0].dim() == 3:
        # Stacked as (N, H, W, C) and viewed as (N, C, H, W): a channels_last batch in one
        # copy (pil_to_tensor's CHW is itself a view of Pillow's HWC pixels).
        x = torch.stack([t.permute(1, 2, 0) for t in good]).permute(0, 3, 1, 2)
    elif good:
        x = torch.stack(good)
    return rows, x, [item[2] for item in items], content


def _threaded_batches(dataset, blocks, threads: int):
    """Decode each batch on ``threads`` threads in this process, then hand it to the caller.

    Pillow releases the GIL while decoding and resampling, so threads decode in parallel.
    """
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="cnncodes-decode") as pool:
        for block in blocks:
            yield collate(list(pool.map(dataset.__getitem__, block)))


class Encoder:
    """A decoded batch -> ``(rows, ok, errors, codes)``: codes per layer, zeros for failed rows.

    Use as a context manager (it holds the forward hooks). Safe to call from several threads.
    """

    def __init__(self, net, taps, pooling, split, dev, prec, micro, dims, np_dtype, tapper=None,
                 decoder=None):
        # ``tapper``: the network on an inference runtime (:mod:`.runtimes`), else PyTorch's hooks
        self.tapper = tapper if tapper is not None else Tapper(net, taps, pooling)
        self.split, self.dev, self.micro, self.dims, self.np_dtype = split, dev, micro, dims, np_dtype
        self.prec = prec
        self.decoder = decoder  # encoded bytes -> a uint8 batch on the device (--decode gpu)
        self.lane_bytes = 0  # what one CPU lane holds (set by make_encoder): see cpu_lanes

    def __enter__(self):
        self.tapper.__enter__()
        return self

    def __exit__(self, *exc):
        self.tapper.__exit__(*exc)

    def __call__(self, rows, x, errs, content=None):
        if self.decoder is not None:
            rows, x, errs, content = self.decoder(rows, x, errs, content)
        ok = np.array([not e for e in errs])
        codes = {name: np.zeros((len(rows), d), self.np_dtype) for name, d in self.dims.items()}
        if x is None:
            return rows, ok, errs, codes, content
        dev = self.dev
        with torch.inference_mode():  # per thread, so entered here
            x = x.to(dev, non_blocking=True)
            # uint8 -> channels_last first (a no-op after collate): the float arithmetic that
            # follows keeps the memory format, which saves copying the 4x larger float batch.
            x = x.contiguous(memory_format=torch.channels_last if dev.type in ("cpu", "cuda")
                             else torch.contiguous_format)
            good = np.flatnonzero(ok)
            normalise = self.split and not getattr(self.tapper, "takes_uint8", False)
            for lo in range(0, len(x), self.micro):
                part = x[lo:lo + self.micro]
                if normalise:  # per micro-batch: the float copy is still in cache for the stem
                    part = self.split.batch(part)
                with autocast(self.prec):
                    feats = self.tapper(part)
                for name, f in feats.items():
                    codes[name][good[lo:lo + self.micro]] = f.float().cpu().numpy()
        return rows, ok, errs, codes, content


def _encode(encoder: Encoder, loader):
    """Batches from ``loader`` (decoded elsewhere), computed here, in order."""
    for batch in loader:
        yield encoder(*batch)


@contextlib.contextmanager
def _torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# All CPU lanes together hold at most this much (or a quarter of the available memory): each
# holds a decoded batch and its forward pass's activations, and one lane per core of a 64-core
# machine would otherwise hold several GB. Lanes beyond the cap become threads of the others.
LANES_MEMORY = 2 * 1024 ** 3


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return LANES_MEMORY * 4


def cpu_lanes(threads: int, lane_bytes: int) -> tuple[int, int]:
    """``(lanes, threads per lane)`` for ``threads`` cores when one lane needs ``lane_bytes``."""
    budget = min(LANES_MEMORY, _available_memory() // 4)
    lanes = max(1, min(threads, budget // max(1, lane_bytes)))
    return lanes, max(1, threads // lanes)


def _encode_lanes(encoder: Encoder, dataset, blocks, lanes: int, lane_threads: int = 1):
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
        return encoder(*collate([dataset[i] for i in block]))

    # OpenMP's thread count is per calling thread: each lane sets its own, once
    pool = ThreadPoolExecutor(max_workers=lanes, thread_name_prefix="cnncodes-lane",
                              initializer=torch.set_num_threads, initargs=(lane_threads,))
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


def encoded_batches(encoder: Encoder, dataset, blocks, dev: torch.device, workers: int | None):
    """Every block's ``(rows, ok, errors, codes)``, in order, by the fastest plan for ``dev``.

    ``workers=None`` picks: on a CPU, one decode-and-compute lane per core; elsewhere,
    DataLoader worker processes (one per core, at most 8) feeding the accelerator. ``0`` off a
    CPU decodes each batch on threads here, then computes it.
    """
    if workers is None:
        workers = 0 if dev.type == "cpu" else min(8, os.cpu_count() or 1)
    if workers == 0 and dev.type == "cpu":
        lanes, threads = cpu_lanes(max(1, torch.get_num_threads()), getattr(encoder, "lane_bytes", 0))
        return _encode_lanes(encoder, dataset, blocks, lanes, threads)
    if workers == 0:
        return _encode(encoder, _threaded_batches(dataset, blocks, max(1, os.cpu_count() or 1)))
    return _encode(encoder, torch.utils.data.DataLoader(
        dataset, batch_sampler=blocks, collate_fn=collate, num_workers=workers,
        pin_memory=dev.type == "cuda", prefetch_factor=4))


def row_blocks(rows: np.ndarray, batch_size: int) -> list[list[int]]:
    """Pending rows grouped by their fixed block ``row // batch_size``."""
    if not len(rows):
        return []
    keys = rows // batch_size
    cuts = np.flatnonzero(np.diff(keys)) + 1
    return [part.tolist() for part in np.split(rows, cuts)]


# glibc serves allocations above its mmap threshold (at most 32 MiB) with fresh mmap()ed pages
# and gives freed heap back to the OS; a CNN's activations then page-fault in anew on every
# forward pass. On a 2-core machine that costs half the throughput (measured: 48 img/s at
# batch 32 vs 102 img/s with the settings below and micro-batches under the threshold).
# One arena for all threads: each extra thread (the CPU lanes) would otherwise get its own
# arena of 64 MiB heaps, which glibc unmaps when they empty, with the same page faults (measured:
# 550,000 faults per 512 images, against 8,000 with one arena).
_MMAP_THRESHOLD = 32 * 1024 * 1024


MICRO_BATCH_BYTES = 24 * 1024 * 1024


_allocator_tuned: set[str] = set()


def tune_cpu_allocator(heap_only: bool = False) -> bool:
    """Keep freed memory in the heap (glibc only; a no-op elsewhere). Process-wide, once.

    ``heap_only`` also serves every allocation from the heap, however large (glibc's
    ``M_MMAP_MAX`` 0): training keeps activations for the backward pass of 50-100 MB a batch,
    far over the largest mmap threshold, which would page-fault in anew every step. Measured
    on Lite0 fine-tuning, batch 32, 2 cores: epochs 2.3x faster (5.0 -> 2.2 s on 120 images,
    head only; 12.4 -> 7.5 s with everything trained), and the kernel's share of the CPU time
    from 41% to 7%. Extraction does without it (its micro-batches stay under the threshold).
    """
    want = {"heap"} | ({"heap_only"} if heap_only else set())
    if want <= _allocator_tuned:
        return True
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -3, -4, -8
        if "heap" not in _allocator_tuned and libc.mallopt(M_MMAP_THRESHOLD, _MMAP_THRESHOLD) and \
                libc.mallopt(M_TRIM_THRESHOLD, 1 << 30) and libc.mallopt(M_ARENA_MAX, 1):
            _allocator_tuned.add("heap")
        if heap_only and "heap" in _allocator_tuned and libc.mallopt(M_MMAP_MAX, 0):
            _allocator_tuned.add("heap_only")
    except (OSError, AttributeError):
        pass
    return want <= _allocator_tuned


def cpu_micro_batch(probe: Probe, taps: list[Tap]) -> int:
    """Images per CPU forward pass so that the largest activation stays under the mmap threshold."""
    deepest = max(t.order for t in taps)
    biggest = max((max(l.numel, int(np.prod(l.shape))) * 4 for l in probe.layers if l.order <= deepest),
                  default=1)
    return max(1, MICRO_BATCH_BYTES // biggest)


def micro_batch_size(dev: torch.device, batch_size: int, probe: Probe, taps: list[Tap]) -> int:
    """Images per forward pass: the batch on accelerators, allocator-friendly slices on a CPU."""
    if dev.type != "cpu":
        return batch_size
    tune_cpu_allocator()
    return min(batch_size, cpu_micro_batch(probe, taps))

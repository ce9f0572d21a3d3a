"""What runs beside a cache run's encoding loop: the writer thread, rank 0's watch over the
other ranks' journal shards, the progress bar, and SIGTERM taken as Ctrl-C."""
from __future__ import annotations

import contextlib
import errno
import queue
import signal
import threading

from tqdm.auto import tqdm

from .journal import Journal


class OtherRanks:
    """Rank 0 follows the other ranks: a thread watches the journal for their shards (named
    after their first row), counts their rows in the progress bar and has the writer thread
    apply them as they come (``absorb``), so little is left to apply when all are done."""

    def __init__(self, journal: Journal, blocks: dict[int, int], bar: Progress, absorb=None,
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


class BackgroundWriter:
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


class Progress:
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
def sigterm_as_interrupt():
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

"""This process's place among ``torchrun`` ranks, and the few collectives the commands need.

torchrun sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; without them (or with a world of
one) a process is rank 0 of 1 and nothing here touches ``torch.distributed``. gloo serves the
CPU and the small objects (plans, row lists, sums), NCCL the CUDA tensors of fine-tuning.

Collectives time out after ``$CNNCODES_DIST_TIMEOUT`` seconds (default 1800): a rank that dies
makes the others stop with a message instead of waiting forever. (torchrun's own agent also
stops the other ranks, with SIGTERM, when one exits with an error or is killed.)
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

from .errors import CnnCodesError

TIMEOUT_ENV = "CNNCODES_DIST_TIMEOUT"


class RankFailedError(CnnCodesError):
    """Another rank stopped (died, timed out or failed) while this one needed it."""


def _short(e: BaseException) -> str:
    """gloo's first line without its source location: ``Connection closed by peer [...]``."""
    import re
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    line = re.sub(r"\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", first)
    return line if len(line) <= 120 else line[:117].rsplit(" ", 1)[0] + "..."


def world_size() -> int:
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def is_main_process() -> bool:
    """Rank 0 (or no torchrun): the process that prints results."""
    return os.environ.get("RANK", "0") in ("", "0") or world_size() == 1


def _timeout() -> datetime.timedelta:
    try:
        seconds = float(os.environ.get(TIMEOUT_ENV, "1800"))
    except ValueError:
        seconds = 1800.0
    return datetime.timedelta(seconds=max(1.0, seconds))


@dataclass
class Dist:
    """This process's place in a torchrun run (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owned: bool = False  # this object started the process group (and ends it in close())

    @property
    def main(self) -> bool:
        return self.rank == 0

    # -- collectives (no-ops in a world of one) -------------------------------------------------

    def _guard(self, what: str, fn, *args):
        import torch.distributed as dist
        try:
            return fn(*args)
        except (RuntimeError, dist.DistError) as e:  # gloo: a closed connection, a timeout
            raise RankFailedError(
                f"rank {self.rank} of {self.world}: another rank stopped while {what} ({_short(e)}); "
                f"what was finished is saved, rerun to resume.") from None

    def barrier(self, what: str = "waiting for the other ranks") -> None:
        if self.world > 1:
            import torch.distributed as dist
            self._guard(what, dist.barrier)

    def _broadcast(self, value, what: str):
        import torch.distributed as dist
        box = [value if self.main else None]
        self._guard(what, dist.broadcast_object_list, box, 0)
        return box[0]

    def share(self, value=None, what: str = "sharing a decision"):
        """Rank 0's ``value`` on every rank. On the other ranks, an exception that rank 0
        shared is raised (so a refusal reads the same everywhere)."""
        if self.world == 1:
            return value
        value = self._broadcast(value, what)
        if isinstance(value, BaseException) and not self.main:
            value.from_rank_0 = True  # rank 0 reports it: the others need not say it again
            raise value
        return value

    def decide(self, fn, what: str = "sharing a decision"):
        """``fn()`` run by rank 0 alone, its result on every rank. When ``fn`` raises, rank 0
        re-raises its own exception and the others raise the library error it shared (or a
        :class:`RankFailedError` naming what rank 0 met)."""
        if self.world == 1:
            return fn()
        if not self.main:
            return self.share(what=what)
        try:
            value = fn()
        except BaseException as e:
            shared = e if isinstance(e, CnnCodesError) else RankFailedError(
                f"rank 0 stopped while {what}: {type(e).__name__}: {e}")
            try:
                self._broadcast(shared, what)
            except BaseException:  # noqa: BLE001 - rank 0's own error is the one to report
                pass
            raise
        return self.share(value, what)

    def gather(self, value, what: str = "gathering results") -> list:
        """Every rank's ``value``, in rank order, on every rank."""
        if self.world == 1:
            return [value]
        import torch.distributed as dist
        out = [None] * self.world
        self._guard(what, dist.all_gather_object, out, value)
        return out

    @contextlib.contextmanager
    def zero_first(self, what: str = "rank 0 prepares"):
        """Rank 0 runs the block first (a download, an export into a shared cache), the others
        after it: they then find its files instead of racing it for them."""
        if not self.main:
            self.barrier(what)
        yield
        if self.main:
            self.barrier(what)

    def close(self) -> None:
        if self.owned:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()
            self.owned = False


def init_distributed(device: str = "auto") -> Dist:
    """Join the torchrun ranks (gloo on CPU; NCCL for CUDA tensors, gloo for objects).

    Returns the :class:`Dist` of this process; call ``close()`` when done with it.
    """
    world = world_size()
    if world <= 1:
        return Dist()
    import torch
    import torch.distributed as dist
    owned = False
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
        # NCCL for the CUDA tensors (gradients, buffers), gloo for the small CPU ones (sums,
        # flags, objects): NCCL alone refuses CPU tensors.
        dist.init_process_group("cpu:gloo,cuda:nccl" if use_cuda else "gloo", timeout=_timeout())
        owned = True
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owned)

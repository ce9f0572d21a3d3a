"""The two array backends the solver's code runs on: numpy on the CPU, torch on CUDA.

The same code runs on both (:class:`Ops`). numpy on the CPU because it is both faster there
and cheaper to start: measured on this 2-core machine, numpy's OpenBLAS does the solver's
products at about twice torch's CPU speed (1,515 x 1,212 by 1,212 x 510: 9.6 ms against
21.9 ms; 1,437 x 40 by 40 x 50: 0.06 ms against 8 ms), and importing torch costs 2 to 3 s,
more than most fits take. On the CPU the BLAS threads are sized to the cores left free.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time

import numpy as np

from cnncodes.extractor.devices import usable_cores

from cnncodes.pipelines.probes.solver.linalg import NumpyLinalg, ScipyLinalg, TorchLinalg, for_matrix


class Ops:
    """The few array operations whose spelling differs between numpy and torch; everything
    else (``@``, broadcasting, indexing, ``+=``, ``.sum(axis)``, ``.reshape``) is common."""

    name = "numpy"
    f32, f64, bool_, int64 = np.float32, np.float64, np.bool_, np.int64
    _inside = 0  # depth of nested ``threads()`` blocks: the free cores are looked at once
    _limit = None           # the block's threads
    _scipy_limited = None   # the limit set on libraries loaded inside the block (see linalg)

    def asarray(self, a, dtype=None):
        return np.ascontiguousarray(a, dtype=dtype)

    def to_numpy(self, x) -> np.ndarray:
        return np.asarray(x)

    def zeros(self, shape, dtype):
        return np.zeros(shape, dtype)

    def full(self, shape, value, dtype):
        return np.full(shape, value, dtype)

    def astype(self, x, dtype):
        return x.astype(dtype, copy=False)

    def copy(self, x):
        return x.copy()

    def arange(self, n):
        return np.arange(n)

    def cat(self, xs):
        return np.concatenate(xs)

    def permute(self, x, axes):
        return x.transpose(axes)

    def expand(self, x, shape):
        """A read-only view of ``x`` repeated to ``shape`` (no copy)."""
        return np.broadcast_to(x, shape)

    def maximum(self, x, v: float):
        return np.maximum(x, v)

    def clamp_min_(self, x, v: float):
        return np.maximum(x, v, out=x)

    def exp_(self, x):
        return np.exp(x, out=x)

    def vdot(self, a, b) -> float:
        """sum(a * b) of two arrays of one shape, in one BLAS pass."""
        return float(np.vdot(a.reshape(-1), b.reshape(-1)))

    def amax(self, x, axis: int):
        return x.max(axis=axis, keepdims=True)

    def sum_keep(self, x, axis: int):
        return x.sum(axis=axis, keepdims=True)

    def exp(self, x):
        return np.exp(x)

    def log(self, x):
        return np.log(x)

    def where(self, cond, a, b):
        return np.where(cond, a, b)

    def flatnonzero(self, m):
        return np.flatnonzero(m)

    def bincount(self, x, n: int):
        return np.bincount(x, minlength=n)

    def unique_rows(self, m):
        patterns, inverse = np.unique(m, axis=0, return_inverse=True)
        return patterns, inverse.reshape(-1)

    def linalg(self, n: int, dtype) -> NumpyLinalg:
        """The library that decomposes an n x n matrix, for that and the products around it."""
        la = for_matrix(n, dtype)
        if isinstance(la, ScipyLinalg) and self._inside and self._scipy_limited is None:
            # scipy's OpenBLAS may have loaded inside the block, after its limit was set (which
            # covers the libraries loaded then): limit it too, until the block ends
            from threadpoolctl import threadpool_limits
            self._scipy_limited = threadpool_limits(limits=self._limit, user_api="blas")
        return la

    def eigh(self, a):
        """Eigenvalues and vectors of symmetric matrices (n, n), or of a stack of them."""
        return self.linalg(a.shape[-1], a.dtype).eigh(a)

    def eps(self, dtype) -> float:
        return float(np.finfo(dtype).eps)

    @contextlib.contextmanager
    def threads(self):
        """BLAS threads sized to the free cores for the block (see :func:`threads_for_solver`);
        a block inside another keeps the outer one's."""
        if self._inside:
            yield
            return
        from threadpoolctl import threadpool_limits
        self._inside += 1
        self._limit = threads_for_solver()
        try:
            with threadpool_limits(limits=self._limit, user_api="blas"):
                try:
                    yield
                finally:   # before the outer limit's own restore
                    if self._scipy_limited is not None:
                        self._scipy_limited.restore_original_limits()
                        self._scipy_limited = None
        finally:
            self._inside -= 1


class TorchOps(Ops):
    """The same operations on torch tensors of one device (CUDA)."""

    name = "torch"

    def __init__(self, device):
        import torch
        self.torch, self.device = torch, device
        self.f32, self.f64, self.bool_, self.int64 = torch.float32, torch.float64, torch.bool, torch.int64

    def asarray(self, a, dtype=None):
        return self.torch.as_tensor(np.ascontiguousarray(a) if isinstance(a, np.ndarray) else a, dtype=dtype,
                                    device=self.device).contiguous()

    def to_numpy(self, x) -> np.ndarray:
        return x.cpu().numpy()

    def zeros(self, shape, dtype):
        return self.torch.zeros(shape, dtype=dtype, device=self.device)

    def full(self, shape, value, dtype):
        return self.torch.full(shape, value, dtype=dtype, device=self.device)

    def astype(self, x, dtype):
        return x.to(dtype)

    def copy(self, x):
        return x.clone()

    def arange(self, n):
        return self.torch.arange(n, device=self.device)

    def cat(self, xs):
        return self.torch.cat(xs)

    def permute(self, x, axes):
        return x.permute(*axes)

    def expand(self, x, shape):
        return x.expand(*shape)

    def maximum(self, x, v: float):
        return self.torch.clamp(x, min=v)

    def clamp_min_(self, x, v: float):
        return x.clamp_(min=v)

    def exp_(self, x):
        return x.exp_()

    def vdot(self, a, b) -> float:
        return float(self.torch.dot(a.reshape(-1), b.reshape(-1)))

    def amax(self, x, axis: int):
        return x.amax(dim=axis, keepdim=True)

    def sum_keep(self, x, axis: int):
        return x.sum(dim=axis, keepdim=True)

    def exp(self, x):
        return self.torch.exp(x)

    def log(self, x):
        return self.torch.log(x)

    def where(self, cond, a, b):
        return self.torch.where(cond, self.torch.as_tensor(a, dtype=b.dtype, device=self.device), b)

    def flatnonzero(self, m):
        return self.torch.nonzero(m.reshape(-1))[:, 0]

    def bincount(self, x, n: int):
        return self.torch.bincount(x, minlength=n)

    def unique_rows(self, m):
        return self.torch.unique(m, dim=0, return_inverse=True)

    def linalg(self, n: int, dtype) -> TorchLinalg:
        return TorchLinalg(self)

    def eigh(self, a):
        return self.torch.linalg.eigh(a)

    def eps(self, dtype) -> float:
        return float(self.torch.finfo(dtype).eps)

    def threads(self):
        return contextlib.nullcontext()  # the work runs on the GPU


def _cuda_present() -> bool:
    """A CUDA GPU torch can use, found without importing torch where no NVIDIA driver is loaded
    (importing it costs seconds, more than a small fit)."""
    if "torch" not in sys.modules:
        if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
            return False
        if not os.path.exists("/proc/driver/nvidia/version") and not os.path.exists("/dev/nvidia0"):
            return False
    import torch
    return torch.cuda.is_available()


def backend(device="auto") -> Ops:
    """numpy on the CPU; torch on CUDA (``auto``: CUDA when present); an :class:`Ops` as given
    (tests run the torch backend on the CPU this way)."""
    if isinstance(device, Ops):
        return device
    if device not in ("auto", "cpu", "cuda") and not str(device).startswith("cuda:"):
        from cnncodes.extractor.errors import SettingsError
        raise SettingsError(f"the batched solver runs on cpu or cuda, got device {device!r}.")
    if device == "cpu" or (device == "auto" and not _cuda_present()):
        return Ops()
    from cnncodes.extractor.devices import resolve_device
    # torch.linalg.eigh (the preconditioning) has no MPS kernel: CUDA or the CPU.
    dev = resolve_device("cuda" if device == "auto" else device, accelerators=("cuda",))
    return Ops() if dev.type == "cpu" else TorchOps(dev)


# --- threads ------------------------------------------------------------------------------------

def _running_elsewhere() -> int | None:
    """Threads of other processes running or ready to run now (Linux: /proc/loadavg's
    instantaneous count, less this process's own running threads), or None where unknown."""
    try:
        with open("/proc/loadavg") as f:
            running = int(f.read().split()[3].split("/")[0])
        ours = 0
        for task in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{task}/stat") as f:
                    ours += f.read().rsplit(")", 1)[1].split()[0] == "R"
            except OSError:  # the thread ended meanwhile
                pass
        return max(0, running - ours)
    except (OSError, ValueError, IndexError):
        return None


def threads_for_solver() -> int:
    """Threads for the solver: the cores this process may use, less those other programs keep
    busy right now (the median of three looks a few milliseconds apart).

    Why: a parallel step waits for its slowest thread, and a thread that shares a core with
    another program waits for the scheduler's time slice at every step. Measured on 2 cores
    with two busy processes beside it, the softmax grid on Caltech codes (1,515 x 1,280, 102
    classes) took 63 s with 2 threads and 19 s with 1 (7 s on the quiet machine)."""
    cores = usable_cores()
    looks = []
    for i in range(3):
        if i:
            time.sleep(0.003)
        looks.append(_running_elsewhere())
    if None in looks:
        return cores
    # /proc/loadavg counts the whole machine: where this process may use only some of its cores
    # (affinity, a container's cpuset), expect its share of the others' running threads there
    share = cores / max(cores, os.cpu_count() or cores)
    return max(1, cores - round(sorted(looks)[1] * share))

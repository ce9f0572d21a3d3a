"""Linear classifiers fitted as batched problems: every fold of the C grid in one solve.

scikit-learn fits one (fold, C) model at a time, in float64, on a copy of each fold's rows.
Here the M models of one C (the folds') are one parameter array and one L-BFGS problem whose
objective is the sum of the models' objectives; the models share nothing but the data, so the
sum is minimised by each model's own minimiser. The C grid is walked from strong to weak
regularisation with warm starts. Objectives match scikit-learn's up to a positive factor
1/(C n):

- ``squared_hinge`` (LinearSVC, one-vs-rest): mean_n sum_k max(0, 1 - t_nk s_nk)^2 + ||W||^2 / (2 C n)
- ``log_loss`` (multinomial LogisticRegression): mean_n CE(s_n, y_n) + ||W||^2 / (2 C n)

The intercept is penalised for the SVM (liblinear's convention, intercept_scaling=1) and not
for softmax (LogisticRegression's), so both solve exactly scikit-learn's problem.

Memory is bounded by the codes. No fold gets a copy of its rows: every model reads the one
n x D matrix, each through its own standardisation (folded into its weights) and with a weight
of zero on the rows it must not see, so one matrix product serves all models. Scores and
gradients are computed over blocks of rows, so nothing n x D is allocated besides the codes.
Gradients are written out by hand (two matrix products per block).

Two bases, chosen by shape:

- more rows than dimensions (*primal*): weights ``W = V (s * u)`` in the eigenbasis ``V`` of
  the standardised codes' second-moment matrix (estimated once, on a sample of rows) with
  ``s_i = (h lambda_i + 1 / (C n))^-1/2``. CNN codes are badly conditioned (eigenvalues spread
  over decades, repeated features), which makes L-BFGS crawl; in this basis the Hessian is
  close to the identity, while the L2 penalty stays the same (V is orthogonal).
- fewer training rows than dimensions (*dual*): the weights of an L2-regularised linear model
  lie in the span of its training rows (representer theorem), so each fold works in an
  orthonormal basis of its own rows' span, from the eigendecomposition of its n x n Gram
  matrix. The problem is then exactly the primal one on n_train-dimensional features:
  36 images of 31,360-d codes take megabytes, not a 31,360^2 eigendecomposition.

Two array backends run the same code (:class:`Ops`): numpy on the CPU, torch on CUDA. numpy
on the CPU because it is both faster there and cheaper to start: measured on this 2-core
machine, numpy's OpenBLAS does the solver's products at about twice torch's CPU speed
(1,515 x 1,212 by 1,212 x 510: 9.6 ms against 21.9 ms; 1,437 x 40 by 40 x 50: 0.06 ms against
8 ms), and importing torch costs 2 to 3 s, more than most fits take. Nothing here imports
scikit-learn or, on a CPU, torch: the fitted model is a :class:`~.linear_model.LinearProbe`.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time

import numpy as np

from cnncodes.pipelines.probes.linear_model import LinearProbe
from cnncodes.pipelines.probes.newton import NEWTON_MAX_DIM, NewtonSVM
from cnncodes.pipelines.probes.normalise import normalise_rows

LOSSES = ("squared_hinge", "log_loss")

# Curvature of the data term per unit of feature variance, used only to scale the
# preconditioner (a wrong guess costs a constant factor in conditioning, not correctness).
_CURVATURE = {"squared_hinge": 1.0, "log_loss": 0.1}

# Gradient tolerance of the cross-validation solves (the final refit uses the estimator's tol,
# 1e-4 by default, scikit-learn's). CV only ranks the C values; measured on the Caltech codes
# (1,515 x 1,280, 102 classes), 3e-4 instead of 1e-4 moves the CV accuracy of the chosen C by
# <= 0.07 points and any C by <= 0.3 points, and takes the softmax grid from 11.2 s to 6.0 s.
CV_TOL = 3e-4

# Rows sampled for the preconditioner's eigenbasis: it needs rough eigenvalues only, and the
# d x d second-moment matrix of 20,000 rows is as good as that of 500,000 for that.
PRECONDITION_ROWS = 20_000
# Above this width the eigenbasis (d^2 memory, d^3 time) costs more than it saves: the
# preconditioner is then the per-feature second moment alone.
EIGENBASIS_MAX_DIM = 4096
# Working memory of one block of rows (codes, scores and their gradients).
BLOCK_BYTES = 32 << 20
# ... and of one block of a pass that only streams over the rows (sums of float64 copies):
# small blocks are recycled by malloc and stay in cache, where fresh pages cost more than the
# arithmetic (measured: the moments of 1,515 x 2,560 codes, 0.04 to 0.19 s in one 31 MB
# block against 0.02 s in blocks of 4 MB).
STREAM_BYTES = 4 << 20
# Blocks of rows are centred before the products where a feature's mean exceeds this many
# standard deviations (float32 keeps about 7 digits of x . w, whose terms grow with the mean).
CENTRE_ABOVE = 8.0
# Matrices from this size on are decomposed by scipy (faster), smaller ones by numpy (no import).
SCIPY_EIGH_FROM = 256
# The dual features of all models may take this much memory even where it exceeds the codes'.
DUAL_BYTES = 512 << 20


def prefetch_linalg(n: int, D: int) -> None:
    """Starts importing scipy.linalg in a background thread where a fit of n rows of D
    dimensions will decompose a matrix of ``SCIPY_EIGH_FROM`` rows or more (the dual form's
    n_train, at least 1/2 of n, or the primal's D): the import then overlaps the reading of
    the codes. Measured: importing scipy.linalg and reading 1,515 x 2,560 codes took 0.40 to
    0.50 s this way against 0.46 to 0.81 s one after the other."""
    if min(n // 2, D) >= SCIPY_EIGH_FROM and "scipy.linalg" not in sys.modules:
        import importlib
        import threading
        threading.Thread(target=importlib.import_module, args=("scipy.linalg",), daemon=True,
                         name="import scipy.linalg").start()


# --- the two array backends -------------------------------------------------------------------

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

    def linalg(self, n: int, dtype) -> _NumpyLinalg:
        """The library that decomposes an n x n matrix, for that and the products around it."""
        if n < SCIPY_EIGH_FROM:
            return _NumpyLinalg()
        la = _ScipyLinalg(dtype)
        if self._inside and self._scipy_limited is None:
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

    def linalg(self, n: int, dtype) -> _TorchLinalg:
        return _TorchLinalg(self)

    def eigh(self, a):
        return self.torch.linalg.eigh(a)

    def eps(self, dtype) -> float:
        return float(self.torch.finfo(dtype).eps)

    def threads(self):
        return contextlib.nullcontext()  # the work runs on the GPU


class _NumpyLinalg:
    """A symmetric eigendecomposition and the products that build its matrix, in one library:
    numpy's own (small matrices, no scipy import). Gram matrices accumulate over blocks of
    columns in an array from :meth:`zeros`, of which :meth:`eigh` reads the upper triangle."""

    def zeros(self, shape, dtype):
        """An accumulator for :meth:`add_gram` and :meth:`add_cross`."""
        return np.zeros(shape, dtype)

    def add_gram(self, G, A):
        """``G + A A^T``: at least its upper triangle (``G`` may be updated in place)."""
        G += A @ A.T
        return G

    def add_cross(self, K, A, B):
        """``K + A B^T`` (``K`` may be updated in place)."""
        K += A @ B.T
        return K

    def matmul(self, A, B):
        return A @ B

    def eigh(self, G):
        return np.linalg.eigh(G, UPLO="U")


class _ScipyLinalg(_NumpyLinalg):
    """scipy's LAPACK (divide and conquer; measured 2x numpy's eigh on a 1,212 x 1,212 float32
    matrix, 0.13 against 0.28 s; importing scipy.linalg costs 0.3 s, paid only where used) and
    scipy's BLAS for the products around it.

    Why not numpy's products: numpy and scipy each bring their own OpenBLAS, and an OpenBLAS
    keeps its threads spinning for a while after each call; on two cores, an eigendecomposition
    right after a numpy product ran at half speed (1,212 x 1,212: 0.25 against 0.13 s), and the
    dual form's setup for five folds and the refit on Caltech's 2,560-d codes took 2.8 s with
    the products in numpy against 1.5 s with them here. The arrays are C-ordered; BLAS reads
    each one's transpose as Fortran-ordered, so the blocks of rows are not copied."""

    def __init__(self, dtype):
        from scipy.linalg import blas, eigh
        self.syrk, self.gemm = blas.get_blas_funcs(("syrk", "gemm"), dtype=np.dtype(dtype))
        self._eigh = eigh

    def zeros(self, shape, dtype):
        return np.zeros(shape, dtype, order="F")   # updated in place by BLAS

    def add_gram(self, G, A):     # (A^T)^T (A^T), upper triangle
        return self.syrk(1.0, A.T, beta=1.0, c=G, trans=1, overwrite_c=1)

    def add_cross(self, K, A, B):
        if 0 in K.shape or A.shape[1] == 0:   # BLAS refuses leading dimensions of 0
            return K
        return self.gemm(1.0, A.T, B.T, beta=1.0, c=K, trans_a=1, overwrite_c=1)

    def matmul(self, A, B):
        if 0 in A.shape or 0 in B.shape:
            return np.zeros((A.shape[0], B.shape[1]), np.result_type(A, B))
        if A.flags.f_contiguous and not A.flags.c_contiguous:
            return self.gemm(1.0, A, B)     # a Fortran-ordered A as it is
        return self.gemm(1.0, B.T, A.T).T   # (B^T A^T)^T

    def eigh(self, G):
        if G.ndim == 2:
            return self._eigh(G, lower=False, driver="evd", check_finite=False)
        pairs = [self.eigh(g) for g in G]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


class _TorchLinalg(_NumpyLinalg):
    """The same on torch tensors."""

    def __init__(self, ops: TorchOps):
        self.ops = ops

    def zeros(self, shape, dtype):
        return self.ops.zeros(shape, dtype)

    def eigh(self, G):
        return self.ops.torch.linalg.eigh(G, UPLO="U")


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


def _blocks(n: int, row_bytes: int, budget: int = BLOCK_BYTES):
    step = max(256, budget // max(1, row_bytes))
    return [slice(lo, min(n, lo + step)) for lo in range(0, n, step)]


def _loss_and_grad(ops: Ops, loss: str, S, y, w):
    """Weighted data term of scores ``S`` (M, K, B) with labels ``y`` (B,) and row weights
    ``w`` (M, B); returns (value, dS), dS in the memory of ``S``.

    The classes are the middle axis and the rows the last, so that every reduction over the
    classes is an elementwise operation between contiguous slices (a reduction along a short
    last axis is several times slower in numpy); the steps are in place where they can be."""
    onehot = ops.astype(y[None, :] == ops.arange(S.shape[1])[:, None], S.dtype)[None]   # (1, K, B)
    w = w[:, None, :]
    if loss == "squared_hinge":
        T = 2 * onehot - 1
        S *= T
        h = ops.clamp_min_(1 - S, 0.0)
        hw = h * w
        value = ops.vdot(hw, h)
        hw *= T
        hw *= -2.0
        return value, hw
    top = ops.amax(S, 1)                                                     # (M, 1, B)
    picked = (S * onehot).sum(1)                                             # (M, B)
    S -= top
    P = ops.exp_(S)
    total = ops.sum_keep(P, 1)
    value = ops.vdot((top + ops.log(total))[:, 0] - picked, w[:, 0])
    P /= total
    P -= onehot
    P *= w
    return value, P


class SharedRows:
    """M models reading the same rows ``X`` (n, D), model m through ``(x - offset_m) / scale_m``,
    with weights in one orthonormal basis ``V`` per model (primal form).

    ``shift`` (M, D) is where the model's true input is centred off the offset, only needed
    for the SVM's penalised intercept: intercept = b - shift . W.
    """

    intercept_weight = None   # the penalised intercept's penalty weighs as the weights'

    def __init__(self, ops: Ops, X, offset, scale, V, lam, shift=None, center=None):
        self.ops, self.X, self.offset, self.scale, self.V, self.lam = ops, X, offset, scale, V, lam
        self.shift = shift
        self.M, self.D = offset.shape
        self.n = X.shape[0]
        # Blocks of rows are centred on ``center`` (the rows' mean) before the product where a
        # feature's mean is large against its spread, so that it keeps its float32 precision.
        self.center = center
        self._offset = offset if center is None else offset - center

    def _rows(self, blk: slice):
        return self.X[blk] if self.center is None else self.X[blk] - self.center

    def weights(self, omega):
        """(M, D, K) weights in the models' (standardised) input basis."""
        return self.rotate(omega)

    def rotate(self, x, back: bool = False):
        """``V_m x_m`` (``V_m^T x_m`` with ``back``) of every model's (D, K) block of ``x``.
        With one basis for all models (V of shape (D, D)) that is one product for all of them:
        V is read once, not M times (measured 0.46 of 2.8 s on Caltech's 1,280-d codes)."""
        V = self.V
        if V is None:
            return x
        if V.ndim == 3:
            return (V.swapaxes(1, 2) if back else V) @ x
        M, D, K = x.shape
        flat = self.ops.permute(x, (1, 0, 2)).reshape(D, M * K)
        return self.ops.permute(((V.T if back else V) @ flat).reshape(D, M, K), (1, 0, 2))

    def predict(self, omega, b):
        """(M, n) index of the highest score of every row under every model."""
        A, beff = self._effective(omega, b)
        K = omega.shape[2]
        return self.ops.cat([self._block_scores(self._rows(blk), A, beff).argmax(1).T
                             for blk in _blocks(self.n, 4 * (self.D + 2 * self.M * K))]).T

    def _effective(self, omega, b):
        """The weights on the raw rows, laid out (M * K, D) for one product, and the intercepts."""
        A = self.weights(omega) / self.scale[:, :, None]
        M, D, K = A.shape
        beff = b - (self._offset[:, None, :] @ A)[:, 0, :]
        return self.ops.permute(A, (0, 2, 1)).reshape(M * K, D), beff[:, :, None]

    def _block_scores(self, X, A, beff):
        return (A @ X.T).reshape(self.M, -1, len(X)) + beff                 # (M, K, B)

    def value_and_grad(self, omega, b, y, w, loss):
        """Data term summed over all rows and its gradient in (omega, b)."""
        ops = self.ops
        M, D, K = omega.shape
        A, beff = self._effective(omega, b)
        gA = ops.zeros((M * K, D), A.dtype)
        gbeff = ops.zeros((M, K), A.dtype)
        total = 0.0
        for blk in _blocks(self.n, 4 * (D + 4 * M * K)):
            X = self._rows(blk)
            v, dS = _loss_and_grad(ops, loss, self._block_scores(X, A, beff), y[blk], w[:, blk])
            total += v
            gA += dS.reshape(M * K, len(X)) @ X
            gbeff += dS.sum(-1)
        gA = ops.permute(gA.reshape(M, K, D), (0, 2, 1)) - self._offset[:, :, None] * gbeff[:, None, :]
        gW = gA / self.scale[:, :, None]
        gomega = self.rotate(gW, back=True)
        return total, gomega, gbeff

    def intercept_shift(self, omega):
        """shift . W per model (M, K), or None."""
        if self.shift is None:
            return None
        return (self.shift[:, None, :] @ self.weights(omega))[:, 0, :]


class FoldBases:
    """M models, each on features ``Phi[m]`` (n, r): the codes expressed in an orthonormal
    basis of model m's centred training rows (dual form); ``lam`` (M, r) their second moments.

    For the SVM (see :class:`_RowSpan`) the penalised part of the intercept is ``(b - shift .
    omega)`` with weight ``intercept_weight`` (M,), and a held-out row's score has one more
    term, that part times ``outside`` (M, n) (zero on the model's training rows)."""

    def __init__(self, ops: Ops, Phi, lam, shift=None, intercept_weight=None, outside=None):
        self.ops, self.Phi, self.lam = ops, Phi, lam
        self.M, self.n, self.D = Phi.shape
        self.V = None
        self.shift, self.intercept_weight, self.outside = shift, intercept_weight, outside

    def scores(self, omegaT, b, rows: slice):
        """(M, K, B) scores of the rows ``rows``; ``omegaT`` is omega (M, r, K) transposed."""
        return omegaT @ self.Phi[:, rows].swapaxes(1, 2) + b[:, :, None]

    def predict(self, omega, b):
        omegaT = self.ops.copy(omega.swapaxes(1, 2))
        part = None if self.outside is None else b - self.intercept_shift(omega)

        def best(blk):
            S = self.scores(omegaT, b, blk)
            if part is not None:
                S += part[:, :, None] * self.outside[:, None, blk]
            return S.argmax(1).T
        blocks = _blocks(self.n, 4 * self.M * 2 * omega.shape[2])  # Phi's rows are views
        return self.ops.cat([best(blk) for blk in blocks]).T

    def value_and_grad(self, omega, b, y, w, loss):
        ops = self.ops
        omegaT = ops.copy(omega.swapaxes(1, 2))
        gomega = ops.zeros(omega.shape, omega.dtype)
        gb = ops.zeros(b.shape, b.dtype)
        total = 0.0
        # a block's memory is its scores and the loss's temporaries (Phi's rows are views), and
        # fewer, larger products run faster (1,515 rows in one block against two: 8% here)
        for blk in _blocks(self.n, 4 * self.M * 4 * omega.shape[2]):
            v, dS = _loss_and_grad(ops, loss, self.scores(omegaT, b, blk), y[blk], w[:, blk])
            total += v
            gomega += self.Phi[:, blk].swapaxes(1, 2) @ dS.swapaxes(1, 2)
            gb += dS.sum(-1)
        return total, gomega, gb

    def intercept_shift(self, omega):
        """shift . omega per model (M, K), or None."""
        if self.shift is None:
            return None
        return (self.shift[:, None, :] @ omega)[:, 0, :]


class BatchedProblem:
    """Minimise M independent objectives (one per model) of one loss at one C at a time.

    ``design`` is a :class:`SharedRows` or :class:`FoldBases`; ``y`` (n,) class indices of
    every row; ``masks`` (M, n) which rows each model trains on.
    """

    def __init__(self, design, y, masks, n_classes: int, loss: str = "squared_hinge"):
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}.")
        ops = design.ops
        self.design, self.y, self.K, self.loss = design, y, n_classes, loss
        dt = design.lam.dtype
        self.n = ops.astype(masks.sum(1), dt)                              # (M,) training rows per model
        self.w = ops.astype(masks, dt) / self.n[:, None]                   # (M, n) mean weights

    def solve(self, C: float, init=None, max_iter: int = 300, tol: float = 1e-4, guess=None):
        """Minimise every model's objective at this C; ``init`` is a previous solution (warm
        start), ``guess`` another start (the one of lower objective is taken). Returns
        ``(omega, b)``: weights in the design's basis (M, D, K), intercepts (M, K)."""
        d = self.design
        ops = d.ops
        M, D, K = d.M, d.D, self.K
        dt = d.lam.dtype
        reg = 1.0 / (2.0 * float(C) * self.n)                                      # (M,)
        if self.loss == "log_loss" and K == 2:
            # Two softmax columns split one logit's weights in halves (w1 = -w0 = w / 2 at the
            # optimum), so their penalty is half the binomial one: double it to solve
            # LogisticRegression's binary problem at this C.
            reg = 2 * reg
        scale = ((_CURVATURE[self.loss] * d.lam + 2 * reg[:, None]) ** -0.5)[:, :, None]  # (M, D, 1)
        def start(state):
            u0, b0 = ops.zeros((M, D, K), dt), ops.zeros((M, K), dt)
            if state is not None:
                u0[...] = state[0] / scale
                b0[...] = state[1]
            return ops.cat([u0.reshape(-1), b0.reshape(-1)])

        penalise_b = self.loss == "squared_hinge"  # liblinear's convention
        split = M * D * K

        def objective(z):
            u, b = z[:split].reshape(M, D, K), z[split:].reshape(M, K)
            omega = u * scale
            value, gomega, gb = d.value_and_grad(omega, b, self.y, self.w, self.loss)
            value += float((reg * (omega * omega).sum((1, 2))).sum())
            gomega = gomega + 2 * reg[:, None, None] * omega
            if penalise_b:
                shift = d.intercept_shift(omega)
                bt = b if shift is None else b - shift
                rb = reg if d.intercept_weight is None else reg * d.intercept_weight
                value += float((rb * (bt * bt).sum(1)).sum())
                gb = gb + 2 * rb[:, None] * bt
                if shift is not None:  # d(bt)/d(omega) through shift . V omega
                    g = -2 * rb[:, None, None] * d.shift[:, :, None] * bt[:, None, :]
                    gomega = gomega + (g if d.V is None else d.rotate(g, back=True))
            return value, ops.cat([(gomega * scale).reshape(-1), gb.reshape(-1)])

        # Softmax's first step is the unit one, which the preconditioner makes about right (its
        # curvature guess is that of the loss at zero weights): measured on Caltech's codes, the
        # grids took 65 -> 51 (2,560-d, 10 classes), 93 -> 66 (1,280-d, 10) and 122 -> 94
        # evaluations (1,280-d, 102 classes). Not the SVM's: its 102-class grid took 146 -> 189
        # (172 with a half step), the first C alone 39 -> 66.
        first_step = 1.0 if self.loss == "log_loss" else None
        # the history holds 2 x 20 vectors of every model's weights: fewer for very large models
        history = 20 if split <= 4_000_000 else 8
        with ops.threads():
            x0, first = start(init), None
            if guess is not None:
                x1 = start(guess)
                first, other = objective(x0), objective(x1)
                if other[0] < first[0]:
                    x0, first = x1, other
            z, self.n_evaluations = lbfgs(objective, x0, max_iter=max_iter, tol=tol, history=history,
                                          first=first, first_step=first_step)
            self.n_evaluations += 2 if guess is not None else 0
        return z[:split].reshape(M, D, K) * scale, ops.copy(z[split:].reshape(M, K))


def lbfgs(fun, x0, max_iter: int = 300, tol: float = 1e-4, history: int = 20, max_step_tries: int = 25,
          first=None, first_step: float | None = None):
    """Minimise ``fun(x) -> (value, gradient)`` from the flat array ``x0`` (numpy or torch) with
    L-BFGS.

    Stops when the largest gradient entry is <= ``tol`` (torch.optim.LBFGS's
    ``tolerance_grad``) or a step changes the value by less than ``tol * 1e-3``. The line
    search brackets a step meeting the weak Wolfe conditions by doubling and bisection (Lewis
    and Overton); in the preconditioned bases above the unit step is nearly always taken.
    ``first`` is ``fun(x0)`` where already known. The first step is along the gradient, of
    length ``first_step`` or, by default, ``min(1, 1 / |g|_1)`` (scipy's and torch's guess for
    a problem of unknown scale). Returns ``(x, evaluations)``.

    The direction is the compact form of the L-BFGS matrix (Byrd, Nocedal and Schnabel 1994),
    the same direction as the two-loop recursion: the pairs live as rows of two matrices, so a
    direction costs four matrix-vector products (BLAS, on every core) instead of 4 x history
    passes over vectors in Python; measured on 618,000 weights, 2.5 s of a 12 s fit before.

    Written here rather than taken from a library: scipy's L-BFGS-B works in float64 on the
    host, which costs more than the step here, and torch.optim.LBFGS needs torch (and imports
    torch._dynamo on its first step, 1.3 s); this one runs on either backend's arrays.
    """
    c1, c2 = 1e-4, 0.9
    x = x0 + 0
    f, g = fun(x) if first is None else first
    evals = 0 if first is not None else 1
    h, N = history, x.shape[0]
    # the pairs as rows of one matrix, s_i in [:h] and y_i in [h:], so that the products of
    # all of them with a vector are one pass over the history (the step is memory-bound:
    # measured 2.8 s of a 14 s fit with 618,000 weights when it took seven passes)
    SYb = np.zeros((2 * h, N), x0.dtype) if isinstance(x0, np.ndarray) else x0.new_zeros((2 * h, N))
    # s_i . y_j for i older than j (the upper triangle in the pairs' order) and y_i . y_j, by slot
    SY, YY = np.zeros((h, h)), np.zeros((h, h))
    ug, wg = np.zeros(h), np.zeros(h)     # S g and Y g at the current point
    order: list[int] = []                 # slots, oldest pair first
    host = (lambda v: np.asarray(v, dtype=np.float64)) if isinstance(x0, np.ndarray) else \
        (lambda v: v.double().cpu().numpy())
    for _ in range(max_iter):
        if float(abs(g).max()) <= tol:
            break
        if order:
            o = np.array(order)
            cs, cy = np.zeros(h), np.zeros(h)
            sy = SY[np.ix_(o, o)]
            R, last = np.triu(sy), order[-1]
            gamma = float(SY[last, last] / YY[last, last])
            Ru = _solve_upper(R, ug[o])
            middle = np.diag(np.diag(sy)) + gamma * YY[np.ix_(o, o)]
            cs[o] = _solve_upper(R.T, middle @ Ru - gamma * wg[o], lower=True)
            cy[o] = -gamma * Ru
            q = -(gamma * g + _as(np.concatenate([cs, cy]), SYb) @ SYb)
        else:
            q = -g
        gd = float(g @ q)
        if not gd < 0:  # not a descent direction (rounding): restart from the gradient
            order = []
            q, gd = -g, -float(g @ g)
        t = 1.0 if order else first_step or min(1.0, 1.0 / max(float(abs(g).sum()), 1e-30))
        lo, hi = 0.0, math.inf
        for _ in range(max_step_tries):
            xn = x + t * q
            fn, gn = fun(xn)
            evals += 1
            if not fn <= f + c1 * t * gd:          # too long (or not finite)
                hi = t
            elif float(gn @ q) < c2 * gd:          # too short
                lo = t
            else:
                break
            t = (lo + hi) / 2 if math.isfinite(hi) else 2 * t
        else:
            if not fn <= f:  # no acceptable step: stay at the best point found
                break
        both = host(SYb @ gn)                      # S gn and Y gn: the next direction needs them
        ugn, wgn = both[:h], both[h:]
        s, y = xn - x, gn - g
        ys, yy = float(y @ s), float(y @ y)
        if ys > 1e-10 * yy:
            k = order.pop(0) if len(order) == h else next(i for i in range(h) if i not in order)
            # the new pair's products with the others from vectors already known: S y = S gn - S g
            SY[:, k] = ugn - ug                    # s_i . y_k
            YY[k, :] = YY[:, k] = wgn - wg
            SY[k, k], YY[k, k] = ys, yy
            SYb[k], SYb[h + k] = s, y
            ugn[k], wgn[k] = float(s @ gn), float(y @ gn)
            order.append(k)
        done = abs(fn - f) < tol * 1e-3
        x, f, g, ug, wg = xn, fn, gn, ugn, wgn
        if done:
            break
    return x, evals


def _solve_upper(R: np.ndarray, b: np.ndarray, lower: bool = False) -> np.ndarray:
    """x with R x = b for a small triangular R (back or forward substitution)."""
    n = len(b)
    x = np.zeros(n)
    for i in (range(n) if lower else range(n - 1, -1, -1)):
        rest = R[i, :i] @ x[:i] if lower else R[i, i + 1:] @ x[i + 1:]
        x[i] = (b[i] - rest) / R[i, i]
    return x


def _as(v: np.ndarray, like):
    """A small float64 host vector as an array of ``like``'s kind, dtype and device."""
    if isinstance(like, np.ndarray):
        return v.astype(like.dtype)
    import torch
    return torch.as_tensor(v, dtype=like.dtype, device=like.device)


# --- building the designs -------------------------------------------------------------------

def _moments(ops: Ops, X, masks):
    """Mean and standard deviation of each model's training rows, (M, D) each, accumulated
    over blocks in float64 around the first row (no n x D temporary)."""
    M, D = masks.shape[0], X.shape[1]
    ref = ops.astype(X[0], ops.f64)
    s1 = ops.zeros((M, D), ops.f64)
    s2 = ops.zeros((M, D), ops.f64)
    for blk in _blocks(X.shape[0], 8 * D, STREAM_BYTES):
        Z = ops.astype(X[blk], ops.f64) - ref
        m = ops.astype(masks[:, blk], ops.f64)
        s1 += m @ Z
        s2 += m @ (Z * Z)
    n = ops.astype(ops.sum_keep(masks, 1), ops.f64)
    mu = s1 / n
    sd = ops.maximum(s2 / n - mu * mu, 0.0) ** 0.5
    tiny = sd < 10 * ops.eps(X.dtype) * (1 + abs(ref))
    sd = ops.where(tiny, 1.0, sd)
    return ops.astype(mu + ref, X.dtype), ops.astype(sd, X.dtype)


def _eigenbases(ops: Ops, X, masks, center, scale, shared: bool = False):
    """Per model m: eigenvalues (D,) and vectors (D, D) of the second moment of its training
    rows centred on their mean and divided by ``scale[m]``, estimated on a sample of rows (or
    the diagonal alone for very wide codes). Returns ``(lam (M, D), V (M, D, D) or None)``.

    One pass over the sample: rows are grouped by which models train on them (a K-fold split
    has K groups), each group's sums are taken once, and each model adds up its groups. Each
    model needs its own basis: a feature that is nearly constant in one fold is blown up by
    that fold's standardisation (sparse ReLU codes have many such), which a shared basis
    misses; measured on the digits' 1,280-d codes (1,437 rows), the SVM grid took 740 objective
    evaluations with one shared basis and 124 with one per fold.

    ``shared``: one basis and its eigenvalues for all models, of the second moment of all the
    sampled rows in the models' mean scale (one eigendecomposition instead of M). Good enough
    for softmax, whose curvature is spread over all rows: measured on Caltech's 1,280-d codes
    with 10 merged classes, the same evaluations (126 against 125) in 1.7 s against 2.5 s, and
    on the digits' 1,280-d codes 143 against 142; not for the SVM, whose curvature is on the
    rows inside the margin (digits 1,280-d: 278 evaluations against 155)."""
    D = X.shape[1]
    rows = np.flatnonzero(ops.to_numpy(masks.any(0)))
    if len(rows) > PRECONDITION_ROWS:
        rows = np.sort(np.random.default_rng(0).choice(rows, PRECONDITION_ROWS, replace=False))
    rows_t = ops.asarray(rows)
    patterns, group = ops.unique_rows(masks[:, rows_t].T)                       # (G, M), (rows,)
    G = len(patterns)
    wide = D > EIGENBASIS_MAX_DIM
    s1 = ops.zeros((G, D), ops.f64)
    s2 = ops.zeros((G, D) if wide else (G, D, D), X.dtype)
    count = ops.astype(ops.bincount(group, G), ops.f64)
    for blk in _blocks(len(rows), 4 * D):
        Z = X[rows_t[blk]] - center
        gb = group[blk]
        for g in range(G):
            Zg = Z[gb == g]
            if len(Zg):
                s1[g] += ops.astype(Zg, ops.f64).sum(0)
                s2[g] += (Zg * Zg).sum(0) if wide else Zg.T @ Zg
    if shared and not wide and masks.shape[0] > 1:  # the second moment of all rows, in the mean scale
        n_all = float(count.sum())
        mean = ops.astype(s1.sum(0) / n_all, X.dtype)
        sc = scale.mean(0)
        C = (s2.sum(0) / n_all - mean[:, None] * mean[None, :]) / (sc[:, None] * sc[None, :])
        lam, V = ops.eigh(C)
        return ops.expand(ops.maximum(lam, 0.0), (masks.shape[0], D)), V                  # V: (D, D)
    member = ops.astype(patterns.T, ops.f64)                                      # (M, G)
    n_m = ops.maximum(member @ count, 1.0)                                        # (M,)
    mean = ops.astype((member @ s1) / n_m[:, None], X.dtype)                      # (M, D)
    sel, n_m = ops.astype(member, X.dtype), ops.astype(n_m, X.dtype)
    if wide:
        m2 = (sel @ s2) / n_m[:, None] - mean * mean
        return ops.maximum(m2 / (scale * scale), 0.0), None
    C = ((sel @ s2.reshape(G, D * D)).reshape(-1, D, D) / n_m[:, None, None]
         - mean[:, :, None] * mean[:, None, :])
    C = C / (scale[:, :, None] * scale[:, None, :])
    lam, V = ops.eigh(C)
    # The preconditioner needs only rough eigenvalues, and V is orthogonal to float32
    # precision, so the rotated problem is the original one: no float64 needed.
    return ops.maximum(lam, 0.0), V


def shared_design(ops: Ops, X, masks, standardise: bool, shared_basis: bool = False) -> SharedRows:
    """Primal design: per-model standardisation (or none) and eigenbasis (one for all models
    with ``shared_basis``), one pass over the rows for every model."""
    mu, sd = _moments(ops, X, ops.cat([masks, masks.any(0)[None]]))
    if standardise:
        offset, scale, shift = mu[:-1], sd[:-1], None
    else:  # centre on the mean for conditioning; the true intercept is b - mean . W
        offset, scale = mu[:-1], sd[:-1] * 0 + 1
        shift = mu[:-1]
    lam, V = _eigenbases(ops, X, masks, mu[-1], scale, shared=shared_basis)
    # centring every block of rows costs a copy of it: only where some feature's mean is large
    # against its spread does float32 need it (measured: features of mean 1e4 and spread 1)
    far = float(abs(mu[-1] / sd[-1]).max()) > CENTRE_ABOVE
    return SharedRows(ops, X, offset, scale, V, lam, shift, center=mu[-1] if far else None)


def _column_blocks(D: int, n: int):
    step = max(64, BLOCK_BYTES // max(1, 4 * n))
    return [slice(lo, min(D, lo + step)) for lo in range(0, D, step)]


class _RowSpan:
    """An orthonormal basis of the span of one model's training rows, centred: ``Z = (x -
    offset) / scale`` with ``offset`` their mean, kept as ``Q = Z_train^T U / sqrt(Lambda)``
    without forming Z (n x D) or Q (D x r); every row's coordinates ``Z Q`` are written into
    ``into`` (n, >= r).

    The model's weights on its input are ``W = Q omega`` with a free intercept, except for the
    SVM, whose penalised intercept ``c`` makes the weights ``[W, c]`` lie in the span of the
    input rows with a constant 1 appended. With ``mean`` (the training rows' mean in the
    model's input, which is then ``Z + mean``), that span is parametrised so that the
    training rows' scores are ``Phi omega + b`` again, centred features and one offset:

        W = Q (omega - c p) + mean c,   c = (b - p . omega) / gap,   p = Q^T mean,
        gap = |mean|^2 - |p|^2 + 1,     penalty |W|^2 + c^2 = |omega|^2 + (b - p . omega)^2 / gap

    and a held-out row's score has the one more term ``c (Z . mean - Phi . p)``
    (``outside``), zero on the training rows. Why not the uncentred rows' own Gram matrix:
    where their mean dwarfs their spread, float32 keeps too few digits of it to see the
    spread's directions (measured: 300 x 600 rows of offset 100, the SVM objective came out
    960 against scikit-learn's 0.8), and its eigenbasis is badly conditioned. With ``exact``
    everything here is float64 (rows taken as given).
    """

    def __init__(self, ops: Ops, X, train, offset, scale, into, mean=None, exact: bool = False):
        self.ops, self.X, self.train = ops, X, train
        self.offset, self.scale, self.mean = offset, scale, mean
        self.shift = None    # softmax on uncentred input: true intercept = b - shift . W
        n, D = X.shape
        # ``exact``: the Gram matrix and its eigendecomposition in float64, for rows taken as
        # given (``--norm none``): one direction (the rows' common scale, say) may then dwarf
        # the others so far that float32 cannot see them (measured: rows a_i m + noise,
        # m ~ 1e4, a_i = 1 +- 10%, kept 25 of 39 directions and came 7.6% off the optimum; in
        # float64 all, 0.2%). Standardised or unit rows keep their spread within float32's
        # reach, and float64 costs them time (the 102-class SVM on unit rows: 11.9 -> 16.9 s).
        self.dt = dt = ops.f64 if exact else X.dtype
        inside = ops.zeros((n,), ops.bool_)
        inside[train] = True
        out = ops.flatnonzero(~inside)                                           # held-out rows
        nt, no = len(train), len(out)
        la = ops.linalg(nt, dt)           # the products in the library of the eigendecomposition
        G, K = la.zeros((nt, nt), dt), la.zeros((no, nt), dt)       # Z_train Z_train^T, Z_out Z_train^T
        if mean is not None:
            m64 = ops.astype(mean, ops.f64)
            zm = ops.zeros((n,), dt)                                             # Z . mean
        for cols in _column_blocks(D, n):
            Zt = self._z(train, cols)
            G = la.add_gram(G, Zt)
            if no:
                Zo = self._z(out, cols)
                K = la.add_cross(K, Zo, Zt)
            if mean is not None:
                mc = ops.astype(m64[cols], dt)[:, None]
                zm[train] += la.matmul(Zt, mc)[:, 0]
                if no:
                    zm[out] += la.matmul(Zo, mc)[:, 0]
        lam, U = la.eigh(G)
        keep = lam > max(float(lam.max()), 1e-30) * (nt * ops.eps(dt))
        lam, U = lam[keep], U[:, keep]
        self.U = U / lam ** 0.5                                                  # (n_train, r), in dt
        self.r = r = self.U.shape[1]
        # every row's Z Q, written into ``into`` (n, >= r, the codes' dtype): straight there, or
        # first in float64 (``exact``) for the mean's terms below
        direct = dt == X.dtype
        Phi = into[:, :r] if direct else ops.zeros((n, r), dt)
        Phi[train] = U * lam ** 0.5       # = G U / sqrt(lam): no product for the training rows
        if no:
            Phi[out] = la.matmul(K, self.U)
        self.lam = ops.astype(lam / nt, X.dtype)                                 # (r,) second moments
        if mean is not None:
            # the mean's terms cancel down to the rows' spread (Z . mean against Phi . p on the
            # training rows), in the span's precision: float64 for rows as given (``exact``)
            p = la.matmul(zm[train][None], self.U)[0]                            # Q^T mean
            p64 = ops.astype(p, ops.f64)
            self.gap = max(float(m64 @ m64) - float(p64 @ p64), 0.0) + 1.0
            self.p = p
            self.outside = ops.astype((zm - la.matmul(Phi, p[:, None])[:, 0]) / self.gap, X.dtype)
        if not direct:
            into[:, :r] = ops.astype(Phi, X.dtype)

    def _z(self, rows, cols):
        """The standardised rows ``rows`` (an index array: a copy) at columns ``cols``, in the
        span's precision: one new array, standardised in place."""
        ops, dt = self.ops, self.dt
        Z = ops.astype(self.X[rows, cols], dt)
        Z -= ops.astype(self.offset[cols], dt)
        Z /= ops.astype(self.scale[cols], dt)
        return Z

    def coordinates(self, W, c):
        """``(omega (r, K), b (K,))`` of weights ``W`` (D, K) on the model's input and its true
        intercept ``c`` (K,): the projection of the weights on the span (exact inside it)."""
        ops, out = self.ops, W.dtype
        W, c = ops.astype(W, self.dt), ops.astype(c, self.dt)
        ZW = ops.zeros((len(self.train), W.shape[1]), self.dt)
        for cols in _column_blocks(self.X.shape[1], len(self.train)):
            ZW += self._z(self.train, cols) @ W[cols]
        omega = self.U.T @ ZW                                                   # Q^T W
        if self.mean is not None:
            b = self.p @ omega + c * self.gap
        else:
            b = c if self.shift is None else c + ops.astype(self.shift, self.dt) @ W
        return ops.astype(omega, out), ops.astype(b, out)

    def weights(self, omega, b):
        """Weights (D, K) on the model's input and its true intercept (K,) of coordinates
        ``omega`` (r, K) and offset ``b`` (K,)."""
        ops = self.ops
        omega, b = ops.astype(omega, self.dt), ops.astype(b, self.dt)
        if self.mean is not None:
            c = (b - self.p @ omega) / self.gap
            omega = omega - self.p[:, None] * c[None]
        coef = self.U @ omega                                                   # (n_train, K)
        W = ops.zeros((self.X.shape[1], omega.shape[1]), self.dt)
        for cols in _column_blocks(self.X.shape[1], len(self.train)):
            W[cols] = self._z(self.train, cols).T @ coef
        if self.mean is not None:
            W += ops.astype(self.mean, self.dt)[:, None] * c[None]
            return W, c
        return W, b if self.shift is None else b - ops.astype(self.shift, self.dt) @ W


def dual_design(ops: Ops, X, masks, standardise: bool, loss: str, exact: bool = False):
    """Dual design: each model in the span of its own training rows. Returns the design and
    the spans (to map a solution back to weights).

    Softmax's free intercept lets the rows be centred (the optimum's weights lie in the span
    of the centred rows, and centring conditions the problem); the SVM's penalised intercept
    cannot move, so its span is of the rows as the classifier sees them, with a constant 1
    appended (see :class:`_RowSpan`)."""
    mu, sd = _moments(ops, X, masks)
    svm = loss == "squared_hinge"
    M = masks.shape[0]
    # every model's coordinates, written in place by its span; columns past a model's rank
    # stay zero (inert, their second moment set to 1 below)
    Phi = ops.zeros((M, X.shape[0], int(masks.sum(1).max())), X.dtype)
    spans = []
    for m in range(M):
        sc = sd[m] if standardise else sd[m] * 0 + 1
        mean = None if not svm else (mu[m] * 0 if standardise else mu[m])    # input = Z + mean
        span = _RowSpan(ops, X, ops.flatnonzero(masks[m]), mu[m], sc, Phi[m], mean=mean, exact=exact)
        if not (standardise or svm):
            span.shift = mu[m]
        spans.append(span)
    r = max(s.r for s in spans)
    Phi = Phi[:, :, :r]   # a view: BLAS reads its rows with their stride
    lam = ops.full((M, r), 1.0, X.dtype)
    shift = ops.zeros((M, r), X.dtype) if svm else None
    for m, s in enumerate(spans):
        lam[m, :s.r] = s.lam
        if svm:
            shift[m, :s.r] = ops.astype(s.p, X.dtype)
    if not svm:
        return FoldBases(ops, Phi, lam), spans
    weight = ops.asarray(np.array([1.0 / s.gap for s in spans]), X.dtype)
    outside = ops.cat([s.outside[None] for s in spans])
    return FoldBases(ops, Phi, lam, shift=shift, intercept_weight=weight, outside=outside), spans


def newton_design(ops: Ops, X, y, masks, n_classes: int, loss: str, standardise: bool) -> NewtonSVM | None:
    """Narrow codes' SVMs are solved by Newton's method on the CPU (see :mod:`.newton`); None
    where L-BFGS solves the problem instead."""
    if loss != "squared_hinge" or ops.name != "numpy" or X.shape[1] > NEWTON_MAX_DIM:
        return None
    mu, sd = _moments(ops, X, masks)
    return NewtonSVM(X, y, masks, n_classes, mu, sd, standardise)


# The cost model that picks the primal or the dual form (multiply-adds): an eigendecomposition
# of a k x k matrix counts EIGH_COST * k^3 (scipy's float32 divide-and-conquer took 0.13 to
# 0.15 s for 1,212 rows, where products run at about 100 GFLOPS: a generous count, but 5
# instead of 10 changes no choice on the benchmark's codes), and a grid EVALUATIONS
# evaluations (50 to 170 on the Caltech and digits codes, about the same in both forms).
EIGH_COST = 10.0
EVALUATIONS = 150


def form_costs(M: int, K: int, n: int, n_train: int, D: int, shared_basis: bool) -> tuple[float, float]:
    """Estimated (primal, dual) cost of a grid: M models, K classes, n rows (n_train per model)
    of D dimensions. The primal's every evaluation rotates the weights (D^2 per class); the
    dual's setup is a Gram matrix, its eigendecomposition and the rows' coordinates per model."""
    primal = (n * D * D + (1 if shared_basis else M) * EIGH_COST * D ** 3
              + EVALUATIONS * M * K * (n * D + D * D))
    dual = (M * (n * n_train * D + EIGH_COST * n_train ** 3 + n * n_train ** 2)
            + EVALUATIONS * M * K * n * n_train)
    return primal, dual


def make_design(ops: Ops, X, masks, standardise: bool, loss: str, n_classes: int, exact: bool = False):
    """The cheaper of the primal and the dual design by :func:`form_costs` (softmax's primal
    with one eigenbasis for all models), the dual only where every model has fewer training
    rows than dimensions and its features (M x n x n_train) fit in the larger of the codes'
    size and ``DUAL_BYTES``. Returns (design, spans or None).

    Measured on this 2-core machine (five folds, the grid and the refit): Caltech's 1,280-d
    codes with 102 classes, softmax 5.4 to 6.5 s in the dual form against 6.4 to 7.1 s in the
    primal; with 10 merged classes, 2.5 to 2.7 s against 1.5 s (the primal with one basis)."""
    M, (n, D) = masks.shape[0], X.shape
    n_train = int(masks.sum(1).max())
    shared = loss == "log_loss"
    dual_bytes = 4 * M * n * n_train
    if n_train < D and dual_bytes <= max(4 * n * D, DUAL_BYTES):
        primal, dual = form_costs(M, n_classes, n, n_train, D, shared)
        if D > EIGENBASIS_MAX_DIM or dual < primal:
            return dual_design(ops, X, masks, standardise, loss, exact)
    return shared_design(ops, X, masks, standardise, shared_basis=shared), None


def model_weights(design, spans, omega, b, m: int):
    """(W (D, K), intercept (K,)) of model m on its input (standardised, or as normalised)."""
    if spans is not None:
        span = spans[m]
        return span.weights(omega[m, :span.r], b[m])
    W = design.weights(omega)[m]   # each model through its own basis (V[m], or the shared one)
    return W, b[m] if design.shift is None else b[m] - design.shift[m] @ W


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
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
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


# --- the cross-validated path ------------------------------------------------------------------

class CVPath:
    """Cross-validation of a C grid with the batched solver, then the refit at a chosen C.

    Normalisation is fitted per fold on that fold's training rows only: ``standard`` uses each
    fold's own mean and standard deviation (as StandardScaler would); ``l2`` and ``power``
    are per-row and need no fitting.

    Examples
    --------
    >>> path = CVPath(X, y, splits, "softmax", "standard")              # doctest: +SKIP
    >>> scores, oof = path.run((0.01, 0.1, 1.0))                        # doctest: +SKIP
    >>> model = path.refit(0.1)                                         # doctest: +SKIP
    """

    def __init__(self, X: np.ndarray, y: np.ndarray, splits, classifier: str, norm: str,
                 device: str = "auto"):
        self.ops = ops = backend(device)
        self.classifier, self.norm = classifier, norm
        self.loss = "squared_hinge" if classifier == "svm" else "log_loss"
        self.classes, idx = np.unique(y, return_inverse=True)
        self.y_np, self.splits = y, splits
        if norm in ("l2", "power"):
            X = normalise_rows(X, norm)
        self.X = ops.asarray(X, ops.f32)   # numpy: the codes themselves when already float32
        self.y = ops.asarray(idx, ops.int64)
        masks = np.zeros((len(splits), len(y)), dtype=bool)
        for f, (train, _) in enumerate(splits):
            masks[f, train] = True
        self.masks = ops.asarray(masks)
        self._best = None   # (C, the folds' solutions there): the refit's start, see _best_so_far

    def run(self, grid):
        """Accuracy per C (list of arrays, one per fold) and out-of-fold predictions per C."""
        with self.ops.threads():  # the setup too (moments, eigendecompositions), not only the solves
            return self._run(grid)

    def _newton(self, masks) -> NewtonSVM | None:
        return newton_design(self.ops, self.X, self.y, masks, len(self.classes), self.loss,
                             self.norm == "standard")

    def _run(self, grid):
        ops = self.ops
        F, K = len(self.splits), len(self.classes)
        self._best = None
        newton = self._newton(self.masks)
        if newton is not None:
            return self._run_newton(newton, grid)
        self.design, self.spans = make_design(ops, self.X, self.masks, self.norm == "standard", self.loss, K,
                                              exact=self.norm == "none")
        problem = BatchedProblem(self.design, self.y, self.masks, K, self.loss)
        scores = np.zeros((len(grid), F))
        oof = np.empty((len(grid), len(self.y_np)), dtype=self.y_np.dtype)
        # All folds at once, one C at a time from strong to weak regularisation, each C starting
        # from the previous solution: batching the C values too makes every model wait for the
        # slowest (weakest-regularised) one; measured 2x slower than this on the Caltech codes.
        # Softmax's solutions move steadily with log C (the grid's steps are even in log C), so
        # the line through the last two is also tried as a start: measured on Caltech's 1,280-d
        # codes with 102 classes, 165 evaluations in 10.2 s became 127 in 7.6 s. Not for the
        # SVM, whose path bends: there it took more evaluations (14.6 s against 9.8 s).
        state = prev = None
        for g in sorted(range(len(grid)), key=lambda g: grid[g]):
            guess = None
            if self.loss == "log_loss" and prev is not None:
                guess = (2 * state[0] - prev[0], 2 * state[1] - prev[1])
            prev, state = state, problem.solve(grid[g], state, tol=CV_TOL, guess=guess)
            self._score(ops.to_numpy(self.design.predict(*state)), g, scores, oof)
            self._best_so_far(grid[g], scores[g], state)
        return [scores[g] for g in range(len(grid))], oof

    def _best_so_far(self, C: float, scores, state) -> None:
        """Keeps the folds' solutions at C where C's mean accuracy beats every smaller C's (the
        refit's C is the best, the smallest of ties): the refit starts from their mean, mapped
        back to weights only then (mapping at every C took 0.4 s of a 5 s grid on 2,560-d
        codes; a refit at another C starts from zero)."""
        mean = round(float(np.mean(scores)), 10)
        if self._best is None or mean > self._best[1]:
            self._best = (C, mean, state)

    def _start(self, C: float):
        """The folds' mean (weights, intercept) at C on the models' input, or None where C's
        solutions were not kept."""
        if self._best is None or self._best[0] != C:
            return None
        state, F = self._best[2], len(self.splits)
        if isinstance(self.design, NewtonSVM):
            return _mean_fit([self.design.weights(state, m) for m in range(F)])
        if self.spans is None:
            return self.design.weights(state[0]).mean(0), state[1].mean(0)
        return _mean_fit([model_weights(self.design, self.spans, *state, m) for m in range(F)])

    def _score(self, pred, g: int, scores, oof) -> None:
        """Out-of-fold predictions and accuracies at the grid's ``g``-th C from ``pred`` (F, n)."""
        for f, (_, held) in enumerate(self.splits):
            oof[g, held] = self.classes[pred[f, held]]
            scores[g, f] = float((oof[g, held] == self.y_np[held]).mean())

    def _run_newton(self, newton: NewtonSVM, grid):
        self.design, self.spans = newton, None
        F = len(self.splits)
        scores = np.zeros((len(grid), F))
        oof = np.empty((len(grid), len(self.y_np)), dtype=self.y_np.dtype)
        theta = None
        for g in sorted(range(len(grid)), key=lambda g: grid[g]):   # warm starts, as above
            theta = newton.solve(grid[g], theta, tol=CV_TOL)
            self._score(newton.predict(theta), g, scores, oof)
            self._best_so_far(grid[g], scores[g], theta)
        return [scores[g] for g in range(len(grid))], oof

    def refit(self, C: float, tol: float = 1e-4, max_iter: int = 300) -> LinearProbe:
        """The model on all rows at ``C``, started from the folds' average solution at that C."""
        if not hasattr(self, "design"):
            raise RuntimeError("CVPath.refit needs run() first (it reuses the path's basis and solutions).")
        ops = self.ops
        with ops.threads():
            everything = ops.asarray(np.ones((1, len(self.y_np)), dtype=bool))
            standard = self.norm == "standard"
            init = self._start(C)
            if isinstance(self.design, NewtonSVM):
                return self._refit_newton(C, everything, init, tol, max_iter)
            if self.spans is None:  # started from the folds' mean weights, in its own basis
                design, spans = shared_design(ops, self.X, everything, standard), None
                if init is not None:
                    init = (design.rotate(init[0][None], back=True), init[1][None])
            else:
                design, spans = dual_design(ops, self.X, everything, standard, self.loss,
                                            exact=self.norm == "none")
                if init is not None:  # (weights, true intercept) -> this basis' coordinates
                    span, (W0, c0) = spans[0], init
                    omega0 = ops.zeros((1, design.D, W0.shape[1]), W0.dtype)
                    omega0[0, :span.r], b0 = span.coordinates(W0, c0)
                    init = (omega0, b0[None])
            problem = BatchedProblem(design, self.y, everything, len(self.classes), self.loss)
            omega, b = problem.solve(C, init, max_iter=max_iter, tol=tol)
            self.n_evaluations = problem.n_evaluations
            W, intercept = model_weights(design, spans, omega, b, 0)
            # the refit's standardisation, as its design computed it (no second pass over X)
            if spans is None:
                mu, sd = design.offset[0], design.scale[0]
            else:
                mu, sd = spans[0].offset, spans[0].scale
        moments = {"mean": ops.to_numpy(mu), "scale": ops.to_numpy(sd)} if standard else {}
        return LinearProbe.from_weights(self.loss, C, self.norm, self.classes, ops.to_numpy(W),
                                        ops.to_numpy(intercept), n_samples=len(self.y_np), **moments)

    def _refit_newton(self, C, everything, init, tol, max_iter) -> LinearProbe:
        newton = self._newton(everything)
        theta = newton.solve(C, None if init is None else newton.start(*init), tol=tol, max_iter=max_iter)
        self.n_evaluations = newton.n_steps
        W, intercept = newton.weights(theta, 0)
        moments = {"mean": newton.mu0[0], "scale": newton.sigma[0]} if self.norm == "standard" else {}
        return LinearProbe.from_weights(self.loss, C, self.norm, self.classes, W, intercept,
                                        n_samples=len(self.y_np), **moments)


def _mean_fit(fits):
    """The mean (weights, intercept) of the folds' ``fits``: the refit's start."""
    return sum(w for w, _ in fits) / len(fits), sum(c for _, c in fits) / len(fits)


def fit_one(X: np.ndarray, y: np.ndarray, loss: str, C: float, max_iter: int = 300, tol: float = 1e-4,
            device: str = "auto") -> tuple[LinearProbe, int]:
    """One model on all rows of ``X`` as given (no normalisation): ``(model, evaluations)``."""
    ops = backend(device)
    classes, idx = np.unique(y, return_inverse=True)
    Xt, yt = ops.asarray(X, ops.f32), ops.asarray(idx, ops.int64)
    masks = ops.asarray(np.ones((1, len(y)), dtype=bool))
    with ops.threads():
        newton = newton_design(ops, Xt, yt, masks, len(classes), loss, standardise=False)
        if newton is not None:
            W, intercept = newton.weights(newton.solve(float(C), tol=tol, max_iter=max_iter), 0)
            return LinearProbe.from_weights(loss, C, "none", classes, W, intercept), newton.n_steps
        design, spans = make_design(ops, Xt, masks, standardise=False, loss=loss, n_classes=len(classes),
                                    exact=True)
        problem = BatchedProblem(design, yt, masks, len(classes), loss)
        omega, b = problem.solve(float(C), max_iter=max_iter, tol=tol)
        W, intercept = model_weights(design, spans, omega, b, 0)
    return LinearProbe.from_weights(loss, C, "none", classes, ops.to_numpy(W), ops.to_numpy(intercept)), \
        problem.n_evaluations

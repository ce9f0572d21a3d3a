"""One library per decomposition: a symmetric eigendecomposition and the products that build
its matrix run in the same library (numpy's for small matrices, scipy's for large ones, torch's
on CUDA), and scipy.linalg is imported only where it will be used, early where that is known.
"""
from __future__ import annotations

import sys

import numpy as np

# Matrices from this size on are decomposed by scipy (faster), smaller ones by numpy (no import).
SCIPY_EIGH_FROM = 256


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


def for_matrix(n: int, dtype) -> NumpyLinalg:
    """The library that decomposes an n x n matrix of ``dtype`` on the CPU: numpy's below
    ``SCIPY_EIGH_FROM`` rows, scipy's from there."""
    if n < SCIPY_EIGH_FROM:
        return NumpyLinalg()
    return ScipyLinalg(dtype)


class NumpyLinalg:
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


class ScipyLinalg(NumpyLinalg):
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


class TorchLinalg(NumpyLinalg):
    """The same on torch tensors, those of ``ops`` (a :class:`~.backends.TorchOps`)."""

    def __init__(self, ops):
        self.ops = ops

    def zeros(self, shape, dtype):
        return self.ops.zeros(shape, dtype)

    def eigh(self, G):
        return self.ops.torch.linalg.eigh(G, UPLO="U")

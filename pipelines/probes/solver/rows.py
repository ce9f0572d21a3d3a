"""Passes over the rows in blocks: every design reads the one n x D matrix of codes a block
of rows at a time, so that nothing n x D is allocated besides the codes.
"""
from __future__ import annotations

from cnncodes.pipelines.probes.solver.backends import Ops

# Working memory of one block of rows (codes, scores and their gradients).
BLOCK_BYTES = 32 << 20
# ... and of one block of a pass that only streams over the rows (sums of float64 copies):
# small blocks are recycled by malloc and stay in cache, where fresh pages cost more than the
# arithmetic (measured: the moments of 1,515 x 2,560 codes, 0.04 to 0.19 s in one 31 MB
# block against 0.02 s in blocks of 4 MB).
STREAM_BYTES = 4 << 20


def row_blocks(n: int, row_bytes: int, budget: int = BLOCK_BYTES):
    """``n`` rows as consecutive slices of as many rows as ``budget`` bytes hold at ``row_bytes``
    a row (at least 256)."""
    step = max(256, budget // max(1, row_bytes))
    return [slice(lo, min(n, lo + step)) for lo in range(0, n, step)]


def moments(ops: Ops, X, masks):
    """Mean and standard deviation of each model's training rows, (M, D) each, accumulated
    over blocks in float64 around the first row (no n x D temporary)."""
    M, D = masks.shape[0], X.shape[1]
    ref = ops.astype(X[0], ops.f64)
    s1 = ops.zeros((M, D), ops.f64)
    s2 = ops.zeros((M, D), ops.f64)
    for blk in row_blocks(X.shape[0], 8 * D, STREAM_BYTES):
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

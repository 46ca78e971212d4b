"""Intra-chunk scores of linear attention with a decay per key dimension, exact under any decay:
A[t, i] = sum_d q_td k_id exp(g_{i+1,d} + ... + g_{t,d}) for i <= t within a chunk, by splitting
the chunk in halves recursively (`intra_chunk_per_dim`; its backward `_PerDimScores` is written
out), and the triangular-matmul cumulative sums the chunk forms share (`cumsum_tri`).
Used by `linear_chunk` for the chunks too strongly decayed to factor (docs/linear_chunk.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ttr.ops.common import constant
from ttr.ops.decay import decay_exp


def intra_chunk_per_dim(q, k, g, flush=True):
    """Scores A[t, i] = sum_d q_td k_id exp(sum_{i<j<=t} g_jd) (i <= t, 0 above the diagonal)
    for per-dimension decay; q, k, g: [B, H, n, C, Dk] -> A [B, H, n, C, C].

    The factorization exp(b_t - b_i) = exp(b_t) exp(-b_i) through one reference point overflows
    once a chunk decays by more than ~e^88, and the [C, C, Dk] tensor of exact exponents is too
    big to materialize fast (at C = 16 it is 134 MB for T = 2048, 16 heads). So split the chunk in
    halves, recursively: a pair i <= t is either on the diagonal (exponent 0) or, at exactly one
    level, i is in the first half and t in the second half of a block [a, a + s) with midpoint m.
    Its exponent then factors through m with both factors <= 1:
        sum_{i<j<=t} g_j = sum_{m<=j<=t} g_j  +  sum_{i<j<m} g_j,
                           (a cumsum in the     (a reverse exclusive cumsum in
                            second half)          the first half)
    so A[second half, first half] = (q * exp(.)) @ (k * exp(.))^T, one matmul per block. Both
    exponents are sums over their own segments, never differences of cumulative sums, so the
    gradient keeps full relative precision under any decay (see segment_sums). Every token is in
    exactly one half per level: log2(C) levels of O(Dk) elementwise work per token and [s/2, s/2]
    matmuls. A chunk size that is not a power of two is zero-padded at its end (padded steps
    come after every real one, so no real pair's segment includes them).

    The backward is written out (`_PerDimScores`): autograd through the levels spent most of its
    time zero-filling full-size gradients for every half-tensor slice.
    """
    C = q.shape[-2]
    P = 1 << (C - 1).bit_length()  # the next power of two
    if P != C:
        q, k, g = (F.pad(x, (0, 0, 0, P - C)) for x in (q, k, g))
    return _PerDimScores.apply(q, k, g, flush)[..., :C, :C]


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for batches of small matrices, a [.., m, r], b [.., r, n]. When m or n is 1 or 2
    (the lowest levels of the split), as a broadcast product summed over r: batched matmul
    kernels on 16384 1 x 1 or 8192 2 x 2 matrices ran ~5x slower than that."""
    if min(a.shape[-2], b.shape[-1]) <= 2:
        return (a.unsqueeze(-1) * b.unsqueeze(-3)).sum(-2)
    return a @ b


def cumsum_tri(x: torch.Tensor, diagonal: int, reverse: bool) -> torch.Tensor:
    """Cumulative sums along axis -2 of x [.., h, D]: forward (out_t sums j <= t) or reverse
    (j >= t), inclusive (diagonal 0) or exclusive (diagonal -1, j != t). As a matmul with a
    triangular ones matrix, which adds the same terms (no differences, so gradients stay exact):
    torch.cumsum along a non-last axis was the slowest op of the per-dimension path, and it has
    no reverse mode (each flip costs a copy)."""
    h = x.shape[-2]
    tri = torch.ones(h, h, dtype=x.dtype, device=x.device).tril(diagonal)
    tri = tri.mT if reverse else tri
    if h <= 2 or x.shape[-1] <= 2:  # einsum folds the batch into one [h, h] @ [h, N] matmul;
        return torch.einsum("ij,...jd->...id", tri, x)  # bmm on tiny matrices is slow
    return tri @ x


def _level_factors(gh: torch.Tensor, flush: bool, dtype: torch.dtype):
    """gh [.., P/s, 2, h, Dk] -> (exp(sum_{m<=j<=t} g_j) for t in the second half,
    exp(sum_{i<j<m} g_j) for i in the first half), each [.., P/s, h, Dk] in `dtype` (that of
    q and k: the exponents are summed in g's dtype, the factors cast for half matmuls)."""
    g1, g2 = gh.unbind(-3)
    return (decay_exp(cumsum_tri(g2, 0, reverse=False), flush).to(dtype),
            decay_exp(cumsum_tri(g1, -1, reverse=True), flush).to(dtype))


class _PerDimScores(torch.autograd.Function):
    """intra_chunk_per_dim on a power-of-two chunk; see there. Backward, per level, with
    qd = q2 * e2, kd = k1 * e1 and the block gradient G = dA[second half, first half]:
        dq2 = (G kd) * e2,   dk1 = (G^T qd) * e1,
        dg2 = reverse cumsum of (G kd) * qd      (e2's exponent is a cumsum of g2),
        dg1 = exclusive cumsum of (G^T qd) * kd  (e1_i's exponent sums g_j over j > i),
    plus the diagonal: dq += dA_tt k_t, dk += dA_tt q_t."""

    @staticmethod
    def forward(ctx, q, k, g, flush):
        P = q.shape[-2]
        blocks = []
        s = 2
        while s <= P:
            qh, kh, gh = (x.unflatten(-2, (P // s, 2, s // 2)) for x in (q, k, g))
            e2, e1 = _level_factors(gh, flush, q.dtype)
            blocks.append(_mm(qh[..., 1, :, :] * e2, (kh[..., 0, :, :] * e1).mT))
            s *= 2
        ctx.save_for_backward(q, k, g)
        ctx.flush = flush
        return _assemble_lower((q * k).sum(-1), blocks)  # [.., P, P]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dA):
        q, k, g = ctx.saved_tensors
        P = q.shape[-2]
        dA = dA.contiguous()  # viewed per level below
        d_diag = torch.diagonal(dA, dim1=-2, dim2=-1).unsqueeze(-1)  # [.., P, 1]
        dq, dk = d_diag * k, d_diag * q
        dg = torch.zeros_like(g)
        s = 2
        while s <= P:
            h = s // 2
            qh, kh, gh = (x.unflatten(-2, (P // s, 2, h)) for x in (q, k, g))
            dqh, dkh, dgh = (x.unflatten(-2, (P // s, 2, h)) for x in (dq, dk, dg))  # views
            e2, e1 = _level_factors(gh, ctx.flush, q.dtype)
            qd, kd = qh[..., 1, :, :] * e2, kh[..., 0, :, :] * e1
            G = torch.diagonal(dA.view(*dA.shape[:-2], P // s, s, P // s, s), dim1=-4,
                               dim2=-2)[..., h:, :h, :].movedim(-1, -3)  # [.., P/s, h, h]
            dqd, dkd = _mm(G, kd), _mm(G.mT, qd)  # [.., P/s, h, Dk]
            dqh[..., 1, :, :] += dqd * e2
            dkh[..., 0, :, :] += dkd * e1
            # (dg stays in g's dtype; the products are summed in it)
            dgh[..., 1, :, :] += cumsum_tri((dqd * qd).to(g.dtype), 0, reverse=True)
            dgh[..., 0, :, :] += cumsum_tri((dkd * kd).to(g.dtype), -1, reverse=False)
            s *= 2
        return dq, dk, dg, None


def _lower_index(P: int, device: torch.device) -> torch.Tensor:
    return constant(("lower", P, device), lambda: _build_lower_index(P, device))


def _build_lower_index(P: int, device: torch.device) -> torch.Tensor:
    """Gather index that assembles a [P, P] lower-triangular matrix (P a power of two) from
    source = [0, diagonal (P entries), level-s blocks for s = 2, 4, ..., P], the level-s blocks
    [P/s, s/2, s/2] (flattened) being the (second half, first half) block of each diagonal
    s x s block. Entry (t, i), t > i, sits in the level s = 2^l with l = bit_length(t xor i):
    its highest differing bit says in which block t and i fall in different halves."""
    t = torch.arange(P, device=device).unsqueeze(1)  # [P, 1]
    i = torch.arange(P, device=device).unsqueeze(0)  # [1, P]
    # torch.where, not boolean-mask assignment: no data-dependent shapes under torch.compile
    idx = torch.where(t == i, 1 + t, 0)  # above the diagonal: the 0 at source[0]
    offset = 1 + P
    s = 2
    while s <= P:
        h = s // 2
        at = (t // s == i // s) & (t % s >= h) & (i % s < h)
        idx = torch.where(at, offset + ((t // s) * h + t % s - h) * h + i % s, idx)
        offset += (P // s) * h * h
        s *= 2
    return idx.flatten()


def _assemble_lower(diag: torch.Tensor, blocks: list[torch.Tensor]) -> torch.Tensor:
    """diag [..., P] and blocks[l] [..., P/s, s/2, s/2] (s = 2^(l+1)) -> the lower-triangular
    [..., P, P] of _lower_index, by one gather: its backward is one scatter-add, where writing
    the blocks into a zero matrix in place cost a full-size gradient copy per level."""
    P = diag.shape[-1]
    source = torch.cat([torch.zeros_like(diag[..., :1]), diag]
                       + [b.flatten(-3) for b in blocks], dim=-1)  # [..., 1 + P + P(P-1)/2]
    # index_select on the 2-d view: on a 4-d tensor it took a 15x slower kernel (18 ms vs 1.2)
    flat = source.reshape(-1, source.shape[-1]).index_select(1, _lower_index(P, diag.device))
    return flat.view(*diag.shape[:-1], P, P)

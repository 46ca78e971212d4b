"""Exact chunkwise-parallel recursive least squares (uniform weights, per-token sample weights).

The memory at step t is the ridge least-squares solution of Eq. 11 (with lambda > 0):

    M_t = argmin_M 1/2 sum_{i<=t} beta_i ||v_i - M k_i||^2 + lambda/2 ||M||_F^2,
    o_t = M_t q_t = H_kv,t^T (H_kk,t + lambda I)^{-1} q_t,
    H_kk,t = sum_{i<=t} beta_i k_i k_i^T,   H_kv,t = sum_{i<=t} beta_i k_i v_i^T.

The parallel form solves one Dk x Dk system per token. Here a sequence is cut into chunks of C
tokens and every prefix system inside a chunk is reduced, by the Woodbury identity, to the
chunk's *one* base matrix A = H_kk,start + lambda I and *one* C x C Cholesky factor. The
derivation (docs/rls_chunk.md):

1. Chunk-start states. With K_c the chunk's keys (rows scaled by sqrt(beta)), the states at the
   start of every chunk are exclusive cumulative sums of the chunk Grams K_c^T K_c, K_c^T V_c:
   all chunks at once, no sequential pass.
2. Base inverse. A^{-1} for every chunk (A is SPD because lambda > 0), by its inverse
   Cholesky factor.
   Q~ = Q A^{-1}, K~ = K A^{-1}.
3. Woodbury per prefix. For the prefix K_{<=t} of the chunk,
       (A + K_{<=t}^T K_{<=t})^{-1} = A^{-1} - K~_{<=t}^T (I + K_{<=t} K~_{<=t}^T)^{-1} K~_{<=t}.
   The prefix capacitance matrix I + K_{<=t} K~_{<=t}^T is the leading t x t block of the
   chunk's S = I + K K~^T. If S = L L^T (Cholesky), the leading block of L is the Cholesky
   factor of the leading block of S, and W = L^{-1} is lower triangular with the same nesting.
   So every prefix inverse is (W_{<=t})^T W_{<=t}: one factorization serves all C prefixes.
4. Apply to the queries. With R = K Q~^T ([C, C], R_jt = k_j^T A^{-1} q_t), U = W K~ and
   Z = W R = W K~ Q^T = U Q^T (A symmetric),
       p_t := (H_kk,t + lambda I)^{-1} q_t = q~_t - sum_{i<=t} Z_it u_i,
   i.e. P = Q~ - (Z masked to i <= t)^T U. Row i of W only touches columns <= i <= t, so the
   mask is all the causality needed.
   One step of iterative refinement (p += solve(q - A_t p)) repairs the float32 digits the
   Woodbury subtraction loses on ill-conditioned prefixes.
5. Output o_t = H_kv,t^T p_t = H_kv,start^T p_t + sum_{i<=t} v_i (k_i^T p_t): an intra-chunk
   causal product plus the chunk-start state, as in chunkwise linear attention.

Cost per chunk: one Dk^3 inverse, one C^3 Cholesky and triangular inverse, and O(C^2 Dk + C Dk^2)
matmuls, all batched over chunks. The backward is the gradient of the exact map, written out
(`_ChunkRLS`): one more prefix solve with the same factors and a few causal products, no
backward through either factorization. Measured at T=2048, Dk=64, B*H=16 (docs/benchmarks.md):
10.2x / 8.8x (forward / forward+backward) faster than the per-token batched solve on the Xeon of
session 7 with autograd's backward; on an AVX2 EPYC (session 12, 2 threads, one process per
variant) the written-out backward took forward+backward from 280 to 156 ms (forward 88 ms), and
the bench measured 11.4x / 14.0x against the batched solve. Decayed weights
(g != 0) break step 3 (the ridge is not decayed, so the base matrix changes with t) and are left
to the parallel form and to conjugate gradient (ttr/ops/rls_cg.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ttr.ops.common import _is_compiling
from ttr.ops.inverse_cholesky import inverse_cholesky
from ttr.ops.linear_chunk import _pass_states, _scan_back


def chunk_rls(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor | None,
    ridge: torch.Tensor,
    *,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    refine: int = 1,
):
    """Chunkwise exact RLS. Inputs already validated by `ttr.ops.rls`; computes in the input
    dtype (callers upcast half precision). `ridge` is `[Dk]` (a scalar broadcast by the caller).
    Returns (o [B, T, H, Dv], (H_kk [B, H, Dk, Dk], H_kv [B, H, Dk, Dv]) or None)."""
    B, T, H, Dk = k.shape
    Dv = v.shape[-1]
    C = min(chunk_size, T)
    N = -(-T // C)
    pad = N * C - T
    if beta is not None:
        # Sample weights enter only the memory: scale rows of K and V by sqrt(beta).
        sb = beta.clamp_min(0).sqrt().unsqueeze(-1)  # [B, T, H, 1]
        k, v = k * sb, v * sb
    if pad:
        # Zero keys/values/queries are exact no-ops for the Grams; padded outputs are trimmed.
        q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))

    def chunks(x):  # [B, N*C, H, D] -> [B H N, C, D], contiguous
        # one transposing copy here: as a permuted view, every matmul below that reads it
        # copied it again (~1.4 ms per copy, 7 per call)
        return x.reshape(B, N, C, H, x.shape[-1]).permute(0, 3, 1, 2, 4).reshape(-1, C, x.shape[-1])

    qc, kc, vc = chunks(q), chunks(k), chunks(v)
    hkk0 = hkv0 = None
    if initial_state is not None:
        # symmetrized, so that the gradient w.r.t. H_kk,0 is the one of the symmetric matrix
        # every other form also sees
        hkk0, hkv0 = 0.5 * (initial_state[0] + initial_state[0].mT), initial_state[1]
    if _is_compiling():
        # autograd through the steps themselves: the written-out path's data-dependent pieces
        # (the PD check in inverse_cholesky, the backward's refinement stop) do not trace
        o, final_kk, final_kv = _forward(qc, kc, vc, ridge, hkk0, hkv0, (B, H, N), refine)[:3]
    else:
        o, final_kk, final_kv = _ChunkRLS.apply(qc, kc, vc, ridge, hkk0, hkv0, (B, H, N), refine)
    o = o.view(B, H, N, C, Dv).permute(0, 2, 3, 1, 4).reshape(B, N * C, H, Dv)[:, :T]
    final = (final_kk, final_kv) if output_final_state else None  # [B, H, Dk, Dk | Dv]
    return o, final


def _forward(qc, kc, vc, ridge, hkk0, hkv0, bhn, refine):
    """Steps 1-5 on chunked inputs qc, kc [B H N, C, Dk], vc [B H N, C, Dv]. Returns o
    [B H N, C, Dv], the final states [B, H, Dk, Dk | Dv], and what the backward reads."""
    B, H, N = bhn
    Dk, Dv = kc.shape[2], vc.shape[2]
    kT = kc.mT  # [B H N, Dk, C]

    # 1. chunk-start states: exclusive sums of the chunk Grams over chunks (`_pass_states`
    # without decay; torch.cumsum along the chunk axis ran ~4 ms per call here), which also
    # hand back the final states
    hkk, final_kk = _pass_states((kT @ kc).view(B, H, N, Dk, Dk), None, hkk0)
    hkv, final_kv = _pass_states((kT @ vc).view(B, H, N, Dk, Dv), None, hkv0)
    hkv = hkv.view(-1, Dk, Dv)

    # 2. base inverse A^{-1} = W_A^T W_A, A = H_kk,start + lambda I (SPD: lambda > 0), W_A its
    # inverse Cholesky factor by blocks (ttr.ops.inverse_cholesky): batched matmuls, where
    # batched LAPACK calls were slow on some CPUs (LU `inv`: 19 ms forward + backward for 512
    # matrices of 64 x 64 on the Xeon of sessions 1-7, 66 ms on an AVX2 EPYC, against 34 ms)
    A = hkk.view(-1, Dk, Dk) + torch.diag_embed(ridge.to(hkk.dtype))  # [B H N, Dk, Dk]
    W_A = inverse_cholesky(A)
    A_inv = W_A.mT @ W_A
    k_t = kc @ A_inv  # [B H N, C, Dk]   (A symmetric: A^-1 = A^-T to rounding)

    # 3. one Cholesky of the chunk capacitance matrix S = I + K A^{-1} K^T serves every prefix
    S = k_t @ kT  # [B H N, C, C]
    S.diagonal(dim1=-2, dim2=-1).add_(1)
    U = inverse_cholesky(S) @ k_t  # W K~, [B H N, C, Dk]

    # 4. P: rows p_t = (H_kk,t + lambda I)^{-1} q_t
    P = _solve_prefixes(qc, kc, A, A_inv, U, refine)

    # 5. o_t = H_kv,start^T p_t + sum_{i<=t} v_i k_i^T p_t
    scores = (P @ kT).tril_()  # [B H N, C(t), C(i)]: i <= t
    o = torch.bmm(scores, vc).baddbmm_(P, hkv)  # [B H N, C, Dv]
    return o, final_kk, final_kv, (hkv, A, A_inv, U, P, scores)


def _solve_prefixes(R, kc, A, A_inv, U, refine, until=None):
    """Rows x_t = (H_kk,t + lambda I)^{-1} r_t for every position t of every chunk, R [B H N,
    C, Dk] (step 4), then `refine` steps of iterative refinement: the Woodbury subtraction
    loses digits in float32 when the prefix systems are ill-conditioned; one correction from
    the residual r_t - (A + K_{<=t}^T K_{<=t}) x_t recovers them (measured: 5-10x smaller error
    than without, and below the batched-solve parallel form, at lambda = 0.1..0.01).

    until: None, or (tol, max_steps): after the `refine` steps, go on refining (at most
    max_steps in all) while the last correction is above tol relative to X and less than half
    the one before: past that the corrections are rounding noise. A data-dependent stop, for
    eager mode only (the backward below)."""

    def once(R):
        # the causal mask zeroes a matmul output in place (triu_ on [i, t]: i <= t), which no
        # backward reads
        Z = (U @ R.mT).triu_()  # [B H N, C(i), C(t)]
        return torch.bmm(R, A_inv).baddbmm_(Z.mT, U, alpha=-1)

    X = once(R)
    tol, steps = (None, refine) if until is None else (until[0], max(refine, until[1]))
    last = None  # the previous correction's size relative to X
    for step in range(steps):
        res = torch.baddbmm(R, X, A, alpha=-1)  # R - X A - tril(X K^T) K
        res = res.baddbmm_((X @ kc.mT).tril_(), kc, alpha=-1)
        c = once(res)
        X = X + c
        if tol is not None and step + 1 >= refine:
            size = float(c.norm() / X.norm().clamp_min(torch.finfo(X.dtype).tiny))
            if size <= tol or (last is not None and size > last / 2):
                break
            last = size
    return X


# The backward's solve r_t = A_t^{-1} dp_t goes on refining while its corrections still shrink
# (BACKWARD_REFINE: stop below 1e-5 relative, at most 4 steps). Why more than the forward: in
# dK the terms (dO V^T) P and (R K^T) P cancel to ~1/100 of their size when the memory fits its
# pairs well (r_t . k_i = do_t . M_t k_i, and M_t k_i ~ v_i), so R's error is amplified ~100x.
# Measured (float32 against a float64 recurrence, T = 200, D = 60, relative RMSE of dK), one
# refinement step / this rule / autograd through the algorithm (before session 12): lambda =
# 0.01, elu+1 keys: 2.3e-2 / 2.4e-4 / 8.9e-4; lambda = 1e-3, N(0, 1) keys: 3.6e-1 / 1.8e-3 /
# 4.8e-3. Relative corrections per step there: 6.5e-3, 8.0e-4, 1.6e-4, 1.5e-4 (elu, lambda =
# 0.01); at the bench's lambda = 1, 3e-7 after the first step, which stops it.
BACKWARD_REFINE = (1e-5, 4)


class _ChunkRLS(torch.autograd.Function):
    """`_forward` as one function with the gradient of the exact map written out (not the
    gradient of the algorithm: no backward through either factorization or the refinement).

    With A_t = H_kk,t + lambda I, p_t = A_t^{-1} q_t and o_t = H_kv,t^T p_t, the gradient dO
    gives, per position (A_t symmetric),
        dp_t = H_kv,t do_t = H_kv,start do_t + sum_{i<=t} k_i (v_i . do_t),
        r_t = A_t^{-1} dp_t   (the forward's prefix solve, refined to BACKWARD_REFINE),
        dq_t = r_t,   dA_t = -r_t p_t^T,   dH_kv,t = p_t do_t^T.
    Every A_t and H_kv,t inside chunk c is its chunk-start state plus the chunk's own pairs
    i <= t, so with M1 = tril(dO V^T), M3 = tril(R K^T) and scores = tril(P K^T) ([t, i]):
        dV = scores^T dO + K dG_kv,     dK = (M1 - M3)^T P - scores^T R + V dG_kv^T
                                              + K (dG_kk + dG_kk^T),
    where dG_kk, dG_kv, the gradients of the chunk Grams K^T K, K^T V, are the reverse
    exclusive sums over chunks (`_scan_back`) of the chunk-start gradients -R^T P and P^T dO
    (plus the final states' gradients); those sums' totals are the initial states' gradients,
    and d ridge = -sum_t r_t * p_t. Through autograd the backward ran ~60 batched matmuls and
    both blocked factorizations' backwards; here it is 21 matmuls with one refinement step, 6
    more for each further step BACKWARD_REFINE takes."""

    @staticmethod
    def forward(ctx, qc, kc, vc, ridge, hkk0, hkv0, bhn, refine):
        o, final_kk, final_kv, saved = _forward(qc, kc, vc, ridge, hkk0, hkv0, bhn, refine)
        ctx.save_for_backward(kc, vc, *saved)
        ctx.bhn, ctx.refine = bhn, refine
        return o, final_kk, final_kv

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, d_final_kk, d_final_kv):
        kc, vc, hkv, A, A_inv, U, P, scores = ctx.saved_tensors
        B, H, N = ctx.bhn
        Dk, Dv = kc.shape[2], vc.shape[2]
        do = do.contiguous()  # the gradient of a permute: strided batches make bmm loop
        M1 = torch.bmm(do, vc.mT).tril_()  # [B H N, C(t), C(i)]: do_t . v_i
        dp = torch.bmm(M1, kc).baddbmm_(do, hkv.mT)  # H_kv,t do_t
        R = _solve_prefixes(dp, kc, A, A_inv, U, ctx.refine, BACKWARD_REFINE)  # = dq
        # chunk-start gradients, then their reverse exclusive sums over chunks
        dA = torch.bmm(R.mT, P).neg_().view(B, H, N, Dk, Dk)
        dHkv = torch.bmm(P.mT, do).view(B, H, N, Dk, Dv)
        dG_kk, d_hkk0 = _scan_back(dA, d_final_kk, None)
        dG_kv, d_hkv0 = _scan_back(dHkv, d_final_kv, None)
        dG_kk, dG_kv = dG_kk.view(-1, Dk, Dk), dG_kv.view(-1, Dk, Dv)
        M3 = (R @ kc.mT).tril_()
        dk = torch.bmm((M1 - M3).mT, P).baddbmm_(scores.mT, R, alpha=-1)
        dk.baddbmm_(vc, dG_kv.mT).baddbmm_(kc, dG_kk + dG_kk.mT)
        dv = torch.bmm(scores.mT, do).baddbmm_(kc, dG_kv)
        dridge = None
        if ctx.needs_input_grad[3]:
            dridge = -(R * P).sum((0, 1))  # [Dk]
        return (R, dk, dv, dridge, d_hkk0 if ctx.needs_input_grad[4] else None,
                d_hkv0 if ctx.needs_input_grad[5] else None, None, None)

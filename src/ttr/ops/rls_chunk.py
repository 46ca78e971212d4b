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
4. Apply to the queries. With R = K Q~^T ([C, C], R_jt = k_j^T A^{-1} q_t) and Z = W R,
       p_t := (H_kk,t + lambda I)^{-1} q_t = q~_t - sum_{i<=t} Z_it u_i,   U = W K~,
   i.e. P = Q~ - (Z masked to i <= t)^T U. Row i of W only touches columns <= i <= t, so the
   mask is all the causality needed.
   One step of iterative refinement (p += solve(q - A_t p)) repairs the float32 digits the
   Woodbury subtraction loses on ill-conditioned prefixes.
5. Output o_t = H_kv,t^T p_t = H_kv,start^T p_t + sum_{i<=t} v_i (k_i^T p_t): an intra-chunk
   causal product plus the chunk-start state, as in chunkwise linear attention.

Cost per chunk: one Dk^3 inverse, one C^3 Cholesky and triangular inverse, and O(C^2 Dk + C Dk^2)
matmuls, all batched over chunks; measured 14.9x (forward) and 12.4x (forward+backward) faster
than the per-token batched solve at T=2048, Dk=64, B*H=16 with glibc's default allocator, and
10.2x / 8.8x (91 / 224 ms against 926 / 1976 ms) once `ttr.tune_allocator` also sped up the
batched solve's large tensors (docs/benchmarks.md, session 7). Decayed weights
(g != 0) break step 3 (the ridge is not decayed, so the base matrix changes with t) and are left
to the parallel and recurrent forms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ttr.ops.inverse_cholesky import inverse_cholesky
from ttr.ops.linear import _pass_states


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

    def chunks(x):  # [B, N*C, H, D] -> [B, H, N, C, D], contiguous
        # one transposing copy here: as a permuted view, every matmul below that reads it
        # copied it again (~1.4 ms per copy, 7 per call)
        return x.reshape(B, N, C, H, x.shape[-1]).permute(0, 3, 1, 2, 4).contiguous()

    qc, kc, vc = chunks(q), chunks(k), chunks(v)
    kT = kc.transpose(-1, -2)  # [B, H, N, Dk, C]

    # 1. chunk-start states by exclusive cumulative sums over chunks
    gram_kk = kT @ kc  # [B, H, N, Dk, Dk]
    gram_kv = kT @ vc  # [B, H, N, Dk, Dv]
    hkk0 = hkv0 = None
    if initial_state is not None:
        # symmetrized, so that the gradient w.r.t. H_kk,0 is the one of the symmetric matrix
        # every other form also sees
        hkk0, hkv0 = 0.5 * (initial_state[0] + initial_state[0].mT), initial_state[1]
    # exclusive sums over chunks (`_pass_states` without decay; torch.cumsum along the chunk
    # axis ran ~4 ms per call here), which also hand back the final states
    hkk, final_kk = _pass_states(gram_kk, None, hkk0)  # [B, H, N, Dk, Dk], [B, H, Dk, Dk]
    hkv, final_kv = _pass_states(gram_kv, None, hkv0)

    # 2. base inverse A^{-1} = W_A^T W_A, A = H_kk,start + lambda I (SPD: lambda > 0), W_A its
    # inverse Cholesky factor by blocks (ttr.ops.inverse_cholesky): batched matmuls, where
    # batched LAPACK calls were slow on some CPUs (LU `inv`: 19 ms forward + backward for 512
    # matrices of 64 x 64 on the Xeon of sessions 1-7, 66 ms on an AVX2 EPYC, against 34 ms)
    A = hkk + torch.diag_embed(ridge.to(hkk.dtype))  # [B, H, N, Dk, Dk]
    W_A = inverse_cholesky(A)
    A_inv = W_A.mT @ W_A
    k_t = kc @ A_inv  # [B, H, N, C, Dk]   (A symmetric: A^-1 = A^-T to rounding)

    # 3. one Cholesky of the chunk capacitance matrix S = I + K A^{-1} K^T serves every prefix
    S = k_t @ kT  # [B, H, N, C, C]
    S.diagonal(dim1=-2, dim2=-1).add_(1)
    W = inverse_cholesky(S)  # L^{-1}, lower
    U = W @ k_t  # [B, H, N, C, Dk]

    def solve(R):
        """4. rows p_t = (H_kk,t + lambda I)^{-1} r_t for every position t of every chunk."""
        R_t = R @ A_inv  # [B, H, N, C, Dk]
        # the causal masks below zero matmul outputs in place (triu_ / tril_ on [i, t] / [t, i]:
        # i <= t), which no backward needs
        Z = (W @ (kc @ R_t.transpose(-1, -2))).triu_()  # [.., C(i), C(t)]
        return R_t - Z.transpose(-1, -2) @ U

    P = solve(qc)  # [B, H, N, C, Dk]
    for _ in range(refine):
        # Iterative refinement: the Woodbury subtraction loses digits in float32 when the
        # prefix systems are ill-conditioned; one correction from the residual
        # q_t - (A + K_{<=t}^T K_{<=t}) p_t recovers them (measured: 5-10x smaller error
        # than without, and below the batched-solve parallel form, at lambda = 0.1..0.01).
        Ap = P @ A + (P @ kT).tril_() @ kc  # [B, H, N, C, Dk]
        P = P + solve(qc - Ap)

    # 5. o_t = H_kv,start^T p_t + sum_{i<=t} v_i k_i^T p_t
    scores = (P @ kT).tril_()  # [B, H, N, C(t), C(i)]: i <= t
    o = P @ hkv + scores @ vc  # [B, H, N, C, Dv]
    o = o.permute(0, 2, 3, 1, 4).reshape(B, N * C, H, Dv)[:, :T]

    final = (final_kk, final_kv) if output_final_state else None  # [B, H, Dk, Dk | Dv]
    return o, final

"""Chunkwise-parallel (gated) delta rule: online SGD on the newest pair, C tokens at a time.

The memory is fitted by one SGD step per token on L_t(M) = 1/2 ||v_t - M k_t||^2, warm-started
from the decayed previous memory (Eq. 26-29; with weight decay Eq. 37, reparameterized as
Gated DeltaNet, Eq. 38-41). In the op layout, S = M^T: [B, H, Dk, Dv],

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,     o_t = S_t^T q_t.

g = None is DeltaNet (Eq. 29). `ttr.ops.delta_rule(..., form="recurrent")` is the spec: the
loop above, T sequential steps. Here a sequence is cut into N chunks of C tokens and all the
work inside chunks is done at once with matmuls; only a pass of N steps carries the state.
The derivation is docs/delta_rule_chunk.md; the numbered steps below follow it. Inside a chunk
with start state S_0 and G_r = g_1 + ... + g_r (log decay from the chunk start through r):

1. Decay ratios, in log space. Gamma_ri = exp(G_r - G_i) for r >= i, the decay from token i
   to token r; the exponent is <= 0, masked before exp, so nothing overflows.
2. WY/UT form. Unrolling the recurrence, S_r = e^{G_r} S_0 + sum_{i<=r} Gamma_ri k_i u_i^T with
   pseudo-values u_r = beta_r (v_r - e^{G_r} S_0^T k_r - sum_{i<r} Gamma_ri (k_r.k_i) u_i).
   Stacked over the chunk that is (I + A) u = diag(beta) (V - (e^G * K) S_0) with
   A = strictly_lower(diag(beta) K K^T * Gamma): u = U - W S_0 with
   Tc = (I + A)^{-1} diag(beta), W = Tc (e^G * K), U = Tc V (the UT transform).
3. Triangular inverse of the unit-lower-triangular I + A, all chunks in one batched call.
4. State pass over chunks: u = U - W S_0, S_next = e^{G_C} S_0 + (e^{G_C - G} * K)^T u.
5. Outputs, all chunks at once: o = (e^G * Q) S_0 + (Q K^T * Gamma, causal) u.

On the CPU (eager), when every chunk decays by at most e^-FACTOR_SPAN (always without decay),
the same steps run with the decay factored through the chunk start (Gamma_ri = e^{G_r} e^{-G_i})
as one function with a written-out backward: `delta_factored.py`. The steps below are the
general path (strong decay, torch.compile, other devices), which autograd differentiates.

Cost: O(T C (Dk + Dv) + T Dk Dv) matmul work plus N small C x C triangular inverses, versus
the recurrent form's T sequential rank-1 updates; the sequential depth drops from T to T / C.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ttr.ops.common import (
    _is_compiling,
    check_chunk_size,
    check_like,
    check_log_decay,
    check_qkv,
    check_state,
    compute_dtype,
    contiguous_as,
    half_matmul_dtype,
)
from ttr.ops.decay import decay_exp, decay_matrix, must_flush
from ttr.ops.delta_factored import factored_delta_rule
from ttr.ops.inverse_cholesky import inverse_lower
from ttr.ops.linear_chunk import FACTOR_SPAN

# Step 3, measured on the dev machine (2-core Xeon, torch 2.13 CPU, 1 thread, fp32; a batch of
# 512 unit-lower-triangular 64 x 64 systems = B*H=16, T=2048, C=64 with Dk = Dv = 64; median
# ms of repeated runs, fwd / fwd+bwd, through plain autograd):
#   solve_triangular(I + A, I), then two matmuls     15 /  64-69   <- used until session 11
#   solve_triangular(I + A, [V, K]) directly       16-32 /  92-100
#   recursive 2 x 2 block inverse, log2 C levels      28 / 166-170
#   Neumann doubling prod_k (I + (-A)^{2^k})      94-114 / 328-348
#   forward substitution, a row of the inverse   93-112 / 402-683  (C Python steps)
#   forward substitution, a row of [U, W]       248-294 / 979-1325
# (2 threads on the shared box only added contention noise.) LAPACK's batched trsm is also
# backward-stable. Since session 11 the inverse is `inverse_lower`: the same 2 x 2 blocks with
# LAPACK's solve at the 16 x 16 leaves (so as stable as a blocked trsm) and a written-out backward,
# two matmuls; autograd through the recursion was what made the block inverse above slow. On an
# AVX2 EPYC, 512 systems, 2 threads: forward 11.0 -> 11.8 ms, forward + backward 49.6 -> 26.8 ms.
# The doubling trick is not stable: for nearly collinear keys with beta = 1 the
# inverse has entries <= 1 but the Neumann terms A^n reach 1e17, and the fp32 result was off
# by a relative 7e9 (solve_triangular: 5e-10) -- it is fast only where it is also unsafe.


def chunk_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule, chunkwise: S_t = e^{g_t}(I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T.

    q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; beta: [B, T, H]; g: [B, T, H] log-decay (<= 0) or
    None (DeltaNet); initial_state: [B, H, Dk, Dv] or None (zeros). Half-precision inputs are
    computed in float32 and the output is cast back; float64 stays float64. Under
    `torch.autocast` to a half dtype (float32 inputs) the chunk-local matmuls run in that dtype
    and o is returned in it; the decays, the triangular solve and the state passed between
    chunks (with the pseudo-values it is read against) stay float32. The final state is
    returned in the compute dtype (float32 for half inputs) so that carrying it loses nothing.
    Returns (o [B, T, H, Dv], S_T [B, H, Dk, Dv] or None).
    """
    B, T, H, Dk, Dv = check_qkv(q, k, v)
    if beta is None:
        raise ValueError("beta: the delta rule needs step sizes of shape [B, T, H], got None")
    check_like("beta", beta, q, (B, T, H), "[B, T, H]")
    check_log_decay(g, q, per_dim_ok=False)
    check_state("initial_state", initial_state, (B, H, Dk, Dv), "[B, H, Dk, Dv]", q)
    check_chunk_size(chunk_size)
    return _chunk_delta_rule(q, k, v, beta, g, initial_state, output_final_state, chunk_size)


def _chunk_delta_rule(q, k, v, beta, g, initial_state, output_final_state, chunk_size):
    """`chunk_delta_rule` on validated inputs (`delta_rule` validates once, then calls this)."""
    half = half_matmul_dtype(q)
    if half is not None:  # autocast off inside: the operands are cast once, in `chunks`
        with torch.autocast(q.device.type, enabled=False):
            return _chunk(q, k, v, beta, g, initial_state, output_final_state, chunk_size, half)
    return _chunk(q, k, v, beta, g, initial_state, output_final_state, chunk_size, None)


def _chunk(q, k, v, beta, g, initial_state, output_final_state, chunk_size, half):
    """The chunk form; `half` None or the dtype of the chunk-local matmuls (md below)."""
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    cd = compute_dtype(q)  # decays, solve, state: float32 for half inputs
    md = half or cd  # q, k, v and the chunk-local matmuls
    C = min(chunk_size, T)
    N = -(-T // C)
    pad = N * C - T

    def chunks(x, dtype=cd):  # [B, T, H, *D] -> [B, H, N, C, *D]
        if pad:
            # Padded tokens have k = v = q = 0, beta = 0 and g = 0 (no decay): each is an exact
            # identity step on the state, and their outputs are trimmed.
            x = F.pad(x, (0, 0) * (x.ndim - 2) + (0, pad))
        x = x.reshape(B, N, C, H, *x.shape[3:]).permute(0, 3, 1, 2, *range(4, x.ndim + 1))
        # One (casting) copy here; batched matmuls would otherwise copy the permuted view at
        # every use.
        return contiguous_as(x, dtype)

    qc, kc, vc = chunks(q, md), chunks(k, md), chunks(v, md)  # [B, H, N, C, D]
    bc = chunks(beta)  # [B, H, N, C]
    gc = None if g is None else chunks(g)  # [B, H, N, C]
    if q.device.type == "cpu" and not _is_compiling() and (
            gc is None or bool(gc.sum(-1).amin() >= -FACTOR_SPAN)):
        # every chunk mild: the decay factored through the chunk start, the backward written
        # out (delta_factored.py); the steps below are what autograd differentiates otherwise
        o, S = factored_delta_rule(qc, kc, vc, bc, gc, initial_state)
        o = o.permute(0, 2, 3, 1, 4).reshape(B, N * C, H, Dv)[:, :T].to(half or q.dtype)
        return o, (S if output_final_state else None)
    eye = torch.eye(C, dtype=cd, device=q.device)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()  # r >= i

    # 1. decay ratios Gamma_ri = exp(G_r - G_i) for r >= i, and e^{G_r}, e^{G_C - G_r}
    if g is None:
        gamma = causal.to(cd)  # [C, C]
        qd, kd, kend, total = qc, kc, kc, None
    else:
        # log Gamma_ri as the segment sum g_{i+1} + ... + g_r, not as G_r - G_i: both are <= 0,
        # but the difference leaves rounding noise of size eps * Gamma in the gradient of every
        # g_j, which swamps the true gradient when the decay is strong (it is then tiny).
        # decay_matrix sums only over i < j <= r, and flushes factors that would underflow
        # (whose exp is ~60x slower) to 0 when the chunk's total decay reaches that far.
        G = gc.cumsum(-1)  # [B, H, N, C], log decay from the chunk start through r
        flush = must_flush(G[..., -1])
        gamma = decay_matrix(gc, flush)  # [B, H, N, C, C], zero above the diagonal
        eG = decay_exp(G, flush).unsqueeze(-1)  # [B, H, N, C, 1]
        qd, kd = qc * eG.to(md), kc * eG.to(md)  # [B, H, N, C, Dk]
        kend = kc * gamma[..., -1, :].unsqueeze(-1).to(md)  # decay from r to the chunk end
        total = eG[..., -1, 0]  # [B, H, N]

    # 2. A = strictly_lower(diag(beta) K K^T * Gamma); the rows of I + A are the WY recurrence
    kkt = kc @ kc.transpose(-1, -2)  # [B, H, N, C, C] (the product with bc is in cd)
    A = torch.tril(bc.unsqueeze(-1) * kkt * gamma, diagonal=-1)

    # 3. Tc = (I + A)^{-1} diag(beta); W, U by matmuls (timings of the alternatives above)
    Linv = inverse_lower(eye + A)  # [B, H, N, C, C]
    Tc = (Linv * bc.unsqueeze(-2)).to(md)  # scales column i by beta_i
    # W and U are read against the state in the pass below: in cd, where u = U - W S cancels
    W = (Tc @ kd).to(cd)  # [B, H, N, C, Dk]
    U = (Tc @ vc).to(cd)  # [B, H, N, C, Dv]

    # 4. the only sequential part: N steps carrying S from chunk to chunk
    S = (
        q.new_zeros(B, H, Dk, Dv, dtype=cd)
        if initial_state is None
        else initial_state.to(cd)
    )  # [B, H, Dk, Dv]
    # unbind, not U[:, :, n]: the backward of indexing writes a full-size zero gradient per
    # chunk (quadratic in N), the backward of unbind is one stack.
    Us, Ws, Ks = U.unbind(2), W.unbind(2), kend.to(cd).transpose(-1, -2).unbind(2)  # per chunk
    decays = [None] * N if total is None else total[..., None, None].unbind(2)  # [B, H, 1, 1]
    starts, us = [], []
    for n in range(N):
        u = Us[n] - Ws[n] @ S  # [B, H, C, Dv], the chunk's pseudo-values
        starts.append(S)
        us.append(u)
        S = Ks[n] @ u + (S if decays[n] is None else decays[n] * S)
    S0 = torch.stack(starts, dim=2)  # [B, H, N, Dk, Dv]
    u = torch.stack(us, dim=2)  # [B, H, N, C, Dv]

    # 5. outputs: contribution of the chunk-start state plus the causal intra-chunk part
    attn = (qc @ kc.transpose(-1, -2)) * gamma.to(md)  # [B, H, N, C, C], 0 above the diagonal
    o = qd @ S0.to(md) + attn @ u.to(md)  # [B, H, N, C, Dv]
    o = o.permute(0, 2, 3, 1, 4).reshape(B, N * C, H, Dv)[:, :T].to(half or q.dtype)
    return o, (S if output_final_state else None)

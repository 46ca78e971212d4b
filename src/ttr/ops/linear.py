"""Linear attention = one step of gradient descent from zero on (decayed) least squares.

Objective (paper Eq. 14 with the linear class, Eq. 10): at every step t fit M to the pairs seen,

    L_t(M) = 1/2 sum_{i<=t} gamma_i^(t) ||v_i - M k_i||^2,  gamma_i^(t) = prod_{j=i+1}^t exp(g_j),

and take ONE gradient step of unit size from M = 0 (Eq. 24): M_t = sum_i gamma_i^(t) v_i k_i^T.
In the op layout S = M^T ([Dk, Dv]) this is the recurrence of gated linear attention (Eq. 2, 4, 16)

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,      o_t = S_t^T q_t,

with `g` None (no decay, Eq. 2), a scalar per head `[B, T, H]` (RetNet / Mamba-2 style, Eq. 4) or
one log-decay per key dimension `[B, T, H, Dk]` (GLA style: it decays the Dk rows of S).

Forms
  recurrent  the loop above, token by token (the spec).
  parallel   o = (Q K^T * Dec) V with Dec[t, i] = exp(G_t - G_i) for i <= t, G = cumsum(g):
             O(T^2) memory (O(T^2 Dk) for per-dimension decay).
  chunk      intra-chunk masked quadratic form + a recurrence over chunk states (as in GLA and
             Mamba-2's SSD), O(T C) memory: linear_chunk.py, derived in docs/linear_chunk.md.

Numerics: every decay factor is evaluated as exp(a - b) with a <= b, i.e. exp of a non-positive
number (masked entries become exp(-inf) = 0 before the exp, never after, so gradients stay finite).
A decay that underflows to 0 is the correct value to float precision, so there is no limit on T or
on how strong the decay is (g = -20 per step is fine); the parallel form accumulates G over the
whole sequence and so loses float32 resolution for very long T, the chunk form only within a chunk.
"""

from __future__ import annotations

import torch

from ttr.ops.common import (
    check_chunk_size,
    check_cu_seqlens,
    check_form,
    check_log_decay,
    check_qkv,
    check_state,
    check_step_decay,
    check_step_qkv,
    compute_dtype,
    float32_under_autocast,
    half_matmul_dtype,
    scan,
    varlen,
)
from ttr.ops.decay import segment_sums, segment_sums_dim, sums_after
from ttr.ops.linear_chunk import chunk_linear_attention

FORMS = ("recurrent", "parallel", "chunk")


def linear_attention(q, k, v, g=None, *, initial_state=None, output_final_state=False,
                     cu_seqlens=None, form="chunk", chunk_size=64):
    """Gated linear attention, `o_t = S_t^T q_t`, `S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T`.

    q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; g: None, [B, T, H] or [B, T, H, Dk] (log-decay <= 0);
    initial_state: [B, H, Dk, Dv] (N sequences: [N, H, Dk, Dv] with cu_seqlens).
    Returns o [B, T, H, Dv] in the dtype of q and the final state [B, H, Dk, Dv] (float32 for
    half-precision inputs, where it is the accumulator) or None.

    Under `torch.autocast` to a half dtype (float32 inputs), the chunk form runs its matmuls in
    that dtype and keeps decays and the state passed between chunks in float32; o comes back in
    the half dtype (as autocast's own matmuls return it). The recurrent and parallel forms, the
    specs, compute in float32.
    """
    B, T, H, Dk, Dv = check_qkv(q, k, v)
    check_log_decay(g, q)
    check_form(form, FORMS)
    check_chunk_size(chunk_size)
    check_cu_seqlens(cu_seqlens, q)
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    check_state("initial_state", initial_state, (N, H, Dk, Dv), "[B, H, Dk, Dv]", q)

    def run(q, k, v, g, initial_state, output_final_state):
        dt = compute_dtype(q)
        g_ = None if g is None else g.to(dt)
        s0 = None if initial_state is None else initial_state.to(dt)
        half = half_matmul_dtype(q) if form == "chunk" else None
        if half is not None:
            # matmuls in half precision (the chunking copy casts), decays and states in float32;
            # autocast off inside so that it does not cast the operands a second time
            with torch.autocast(q.device.type, enabled=False):
                o, s = chunk_linear_attention(q, k, v, g_, s0, chunk_size, half)
            return o, (s if output_final_state else None)
        q_, k_, v_ = q.to(dt), k.to(dt), v.to(dt)
        with float32_under_autocast(q):  # the specs (and float64 chunks) as without autocast
            if form == "recurrent":
                o, s = _recurrent(q_, k_, v_, g_, s0)
            elif form == "parallel":
                o, s = _parallel(q_, k_, v_, g_, s0)
            else:
                o, s = chunk_linear_attention(q_, k_, v_, g_, s0, chunk_size)
        return o.to(q.dtype), (s if output_final_state else None)

    if cu_seqlens is not None:
        return varlen(run, cu_seqlens, {"q": q, "k": k, "v": v, "g": g}, initial_state,
                      output_final_state, pad_neutral=True)
    return run(q, k, v, g, initial_state, output_final_state)


def linear_attention_step(q_t, k_t, v_t, g_t=None, state=None):
    """One decoding step: q_t, k_t [B, H, Dk], v_t [B, H, Dv], g_t None / [B, H] / [B, H, Dk].

    Returns (o_t [B, H, Dv], new state [B, H, Dk, Dv]).
    """
    B, H, Dk, Dv = check_step_qkv(q_t, k_t, v_t)
    check_step_decay(g_t, q_t)
    check_state("state", state, (B, H, Dk, Dv), "[B, H, Dk, Dv]", q_t)
    dt = compute_dtype(q_t)
    if state is None:
        state = q_t.new_zeros(B, H, Dk, Dv, dtype=dt)
    g_ = None if g_t is None else g_t.to(dt)
    o, s = _step(q_t.to(dt), k_t.to(dt), v_t.to(dt), g_, state.to(dt))
    return o.to(q_t.dtype), s


def _step(q, k, v, g, S):
    """S <- diag(exp(g)) S + k v^T; o = S^T q. Shapes [B, H, D...] without a time axis."""
    if g is not None:
        # scalar g [B, H] scales the whole state, per-dimension g [B, H, Dk] its rows
        S = S * torch.exp(g if g.ndim == 3 else g.unsqueeze(-1)).unsqueeze(-1)
    S = S + k.unsqueeze(-1) * v.unsqueeze(-2)  # [B, H, Dk, Dv]
    # a broadcast product, not a matmul: decoding-size matmuls pay a thread-pool round trip
    return (q.unsqueeze(-1) * S).sum(-2), S


def _recurrent(q, k, v, g, s0):
    B, T, H, Dk = q.shape
    S = s0 if s0 is not None else q.new_zeros(B, H, Dk, v.shape[-1])
    return scan(_step, S, q, k, v, g)


def _parallel(q, k, v, g, s0):
    """Quadratic form. With G_t = sum_{j<=t} g_j (inclusive cumsum):

    S_t = diag(exp(G_t)) S_0 + sum_{i<=t} diag(exp(G_t - G_i)) k_i v_i^T, hence
    o_t = (q_t * exp(G_t))^T S_0 + sum_{i<=t} [sum_d q_td k_id exp(G_td - G_id)] v_i.
    """
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
    T = q.shape[2]
    if g is None:
        # 1. no decay: the causal mask alone
        A = (q @ k.mT).tril()  # [B, H, T, T]
        o = A @ v  # [B, H, T, Dv]
        S = k.mT @ v  # [B, H, Dk, Dv]
        if s0 is not None:
            o, S = o + q @ s0, S + s0
        return o.transpose(1, 2), S
    per_dim = g.ndim == 4
    G = torch.cumsum(g.transpose(1, 2), dim=2)  # [B, H, T] or [B, H, T, Dk]
    # 1. intra-sequence scores with the decay folded in
    if per_dim:
        L = segment_sums_dim(g.transpose(1, 2))  # [B, H, T, T, Dk]
        A = torch.einsum("bhtd,bhid,bhtid->bhti", q, k, torch.exp(L))
    else:
        A = (q @ k.mT) * torch.exp(segment_sums(g.transpose(1, 2)))  # [B, H, T, T]
    o = A @ v  # [B, H, T, Dv]
    # 2. final state: each key decayed from its step to T (exponent G_T - G_i <= 0; for scalar
    # decay summed over the segment, see segment_sums)
    w = torch.exp(sums_after(g.transpose(1, 2), per_dim))  # [B, H, T, Dk] or [B, H, T]
    S = (k * (w if per_dim else w.unsqueeze(-1))).mT @ v  # [B, H, Dk, Dv]
    # 3. the initial state, decayed by exp(G_t) from the start
    if s0 is not None:
        eG = torch.exp(G if per_dim else G.unsqueeze(-1))  # [B, H, T, Dk or 1]
        o = o + (q * eG) @ s0
        S = S + eG[:, :, T - 1].unsqueeze(-1) * s0
    return o.transpose(1, 2), S

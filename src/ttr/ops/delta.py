"""The delta rule = online SGD on the newest key-value pair (DeltaNet; gated: Gated DeltaNet).

Objective: the streaming least-squares loss of Eq. 17-18, minimized by single-example SGD
warm-started from the previous memory (Eq. 26-28): one step of size beta_t on
L_t(M) = 1/2 ||v_t - M k_t||^2 gives Eq. 29 (= Eq. 5-6),

    M_t = M_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T.

With geometric weights the old memory is first decayed, M' = exp(g_t) M_{t-1}, then the SGD step
is taken from M' (Gated DeltaNet). In the op layout S = M^T ([Dk, Dv]) the (I - beta k k^T)
factor multiplies from the LEFT:

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,      o_t = S_t^T q_t,

computed as S' = exp(g_t) S_{t-1};  S_t = S' + k_t (beta_t (v_t - S'^T k_t))^T, i.e. the state
moves towards storing v_t under k_t by a fraction beta_t of the current prediction error.

Forms: "recurrent" (the loop above, the spec) and "chunk" (default), the chunkwise WY / UT form
of src/ttr/ops/delta_chunk.py, derived in docs/delta_rule_chunk.md.
"""

from __future__ import annotations

import torch

from ttr.ops.common import (
    check_chunk_size,
    check_cu_seqlens,
    check_form,
    check_like,
    check_log_decay,
    check_qkv,
    check_state,
    check_step_decay,
    check_step_qkv,
    compute_dtype,
    scan,
    varlen,
)
from ttr.ops.delta_chunk import _chunk_delta_rule

FORMS = ("recurrent", "chunk")


def delta_rule(q, k, v, beta, g=None, *, initial_state=None, output_final_state=False,
               cu_seqlens=None, form="chunk", chunk_size=64):
    """Delta rule with optional scalar decay.

    q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; beta: [B, T, H] step sizes; g: None or [B, T, H]
    log-decay <= 0; initial_state: [B, H, Dk, Dv] ([N, H, Dk, Dv] with cu_seqlens).
    `chunk_size` is the chunk length of the chunk form.
    Returns o [B, T, H, Dv] (dtype of q) and the final state [B, H, Dk, Dv] (float32 for
    half-precision inputs) or None.
    """
    B, T, H, Dk, Dv = check_qkv(q, k, v)
    if beta is None:
        raise ValueError("beta: the delta rule needs step sizes of shape [B, T, H], got None")
    check_like("beta", beta, q, (B, T, H), "[B, T, H]")
    check_log_decay(g, q, per_dim_ok=False)
    check_form(form, FORMS)
    check_chunk_size(chunk_size)
    check_cu_seqlens(cu_seqlens, q)
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    check_state("initial_state", initial_state, (N, H, Dk, Dv), "[B, H, Dk, Dv]", q)

    def run(q, k, v, beta, g, initial_state, output_final_state):
        if form == "chunk":
            return _chunk_delta_rule(q, k, v, beta, g, initial_state, output_final_state,
                                     chunk_size)
        return recurrent(_step, q, k, v, beta, g, initial_state, output_final_state)

    if cu_seqlens is not None:
        return varlen(run, cu_seqlens, {"q": q, "k": k, "v": v, "beta": beta, "g": g},
                      initial_state, output_final_state, pad_neutral=True)
    return run(q, k, v, beta, g, initial_state, output_final_state)


def recurrent(step, q, k, v, beta, g, initial_state, output_final_state):
    """The loop form of the delta-rule family: `step(q_t, k_t, v_t, beta_t, g_t, S) -> (o_t, S)`
    over time with state S [B, H, Dk, Dv] in the compute dtype (float32 for half inputs)."""
    dt = compute_dtype(q)
    B, H, Dk, Dv = q.shape[0], q.shape[2], q.shape[-1], v.shape[-1]
    S = q.new_zeros(B, H, Dk, Dv, dtype=dt) if initial_state is None else initial_state.to(dt)
    o, S = scan(step, S, *(None if x is None else x.to(dt) for x in (q, k, v, beta, g)))
    return o.to(q.dtype), (S if output_final_state else None)  # [B, T, H, Dv]


def delta_rule_step(q_t, k_t, v_t, beta_t, g_t=None, state=None):
    """One decoding step: q_t, k_t [B, H, Dk], v_t [B, H, Dv], beta_t [B, H], g_t None / [B, H].

    Returns (o_t [B, H, Dv], new state [B, H, Dk, Dv]).
    """
    B, H, Dk, Dv = check_step_qkv(q_t, k_t, v_t)
    if beta_t is None:
        raise ValueError("beta_t: the delta rule needs step sizes of shape [B, H], got None")
    check_like("beta_t", beta_t, q_t, (B, H), "[B, H]")
    check_step_decay(g_t, q_t, per_dim_ok=False)
    check_state("state", state, (B, H, Dk, Dv), "[B, H, Dk, Dv]", q_t)
    dt = compute_dtype(q_t)
    S = q_t.new_zeros(B, H, Dk, Dv, dtype=dt) if state is None else state.to(dt)
    o, S = _step(q_t.to(dt), k_t.to(dt), v_t.to(dt), beta_t.to(dt),
                 None if g_t is None else g_t.to(dt), S)
    return o.to(q_t.dtype), S


def _step(q, k, v, beta, g, S):
    """S' = exp(g) S;  S = S' + k (beta (v - S'^T k))^T;  o = S^T q.  Shapes [B, H, ...]."""
    if g is not None:
        S = S * torch.exp(g)[..., None, None]
    pred = _read(S, k)  # [B, H, Dv]: what S' retrieves for k_t
    err = beta.unsqueeze(-1) * (v - pred)  # [B, H, Dv]: the SGD step on the newest pair
    S = S + k.unsqueeze(-1) * err.unsqueeze(-2)  # [B, H, Dk, Dv]
    return _read(S, q), S


def _read(S, x):
    """S^T x for S [B, H, Dk, Dv], x [B, H, Dk]. A broadcast product: decoding-size matmuls pay
    a thread-pool round trip that costs more than the arithmetic."""
    return (x.unsqueeze(-1) * S).sum(-2)

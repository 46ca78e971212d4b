"""RWKV-6 "Finch": per-dimension data-dependent decay and a bonus for the current token.

Peng et al. 2024, "Eagle and Finch: RWKV with Matrix-Valued States and Dynamic Recurrence"
(the Finch time-mixing wkv). In the op layout (S [Dk, Dv], receptance r in the role
of the query), with log-decay w_t <= 0 per key dimension (the paper's decay is exp(-exp(.)),
so w = -exp(.)) and bonus u [H, Dk]:

    o_t = S_{t-1}^T r_t + (r_t . (u * k_t)) v_t                   [Dv]
    S_t = diag(exp(w_t)) S_{t-1} + k_t v_t^T                       [Dk, Dv]

i.e. the paper's wkv_t = diag(u) k_t v_t^T + sum_{j<t} diag(prod_{l=j+1}^{t-1} exp(w_l)) k_j v_j^T
read by r_t. The state is S after the last token, [B, H, Dk, Dv].

Test-time regression view (paper Section 4, Eq. 14-16): S_{t-1} is gated linear attention, one
gradient step from zero on least squares with geometric weights prod exp(w) per key dimension
(GLA style), over the PAST pairs only; the bonus adds the current pair (k_t, v_t) with its own
weight diag(u) instead of the weight 1 it gets in S_t. Without the bonus (u = 0) the read is
exclusive; with u = 1 it is gated linear attention whose decay exp(w_t) acts after step t's read.

Forms
  recurrent  the loop above (the spec).
  chunk      the exclusive read through `ttr.ops.linear`'s chunk form on the sequence shifted
             by one token, plus the bonus; see `_chunk`. O(T C); no decay is ever divided by.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from ttr.ops.common import (
    _is_compiling,
    check_chunk_size,
    check_cu_seqlens,
    check_finite,
    check_form,
    check_like,
    check_qkv,
    check_state,
    check_step_qkv,
    check_tensor,
    compute_dtype,
    computes_in_float32_under_autocast,
    scan,
    varlen,
)
from ttr.ops.linear_chunk import chunk_linear_attention

FORMS = ("recurrent", "chunk")


@computes_in_float32_under_autocast
def rwkv6(r, k, v, w, u, *, initial_state=None, output_final_state=False, cu_seqlens=None,
          form="chunk", chunk_size=64):
    """RWKV-6 wkv: o_t = S_{t-1}^T r_t + (r_t . (u * k_t)) v_t (see the module docstring).

    r, k: [B, T, H, Dk]; v: [B, T, H, Dv]; w: [B, T, H, Dk] log-decay <= 0; u: [H, Dk] bonus;
    initial_state: None or S [B, H, Dk, Dv] (N sequences: [N, H, Dk, Dv] with cu_seqlens).
    Returns o [B, T, H, Dv] in the dtype of r and the final state [B, H, Dk, Dv] (float32 for
    half-precision inputs) or None.
    """
    _check_r("r", "k", r, k, 4)
    B, T, H, Dk, Dv = check_qkv(r, k, v)
    _check_w("w", w, r, (B, T, H, Dk), "[B, T, H, Dk]")
    _check_u("u", u, r, H, Dk)
    check_form(form, FORMS)
    check_chunk_size(chunk_size)
    check_cu_seqlens(cu_seqlens, r)
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    check_state("initial_state", initial_state, (N, H, Dk, Dv), "[B, H, Dk, Dv]", r)

    def run(r, k, v, w, initial_state, output_final_state):
        dt = compute_dtype(r)
        r_, k_, v_, w_, u_ = (x.to(dt) for x in (r, k, v, w, u))
        if initial_state is None:
            S = r.new_zeros(r.shape[0], H, Dk, Dv, dtype=dt)
        else:
            S = initial_state.to(dt)
        if form == "recurrent":
            o, S = scan(partial(_step, u=u_), S, r_, k_, v_, w_)
        else:
            o, S = _chunk(r_, k_, v_, w_, u_, S, chunk_size)
        return o.to(r.dtype), (S if output_final_state else None)

    tensors = {"r": r, "k": k, "v": v, "w": w}
    if cu_seqlens is not None:
        return varlen(run, cu_seqlens, tensors, initial_state, output_final_state)
    return run(**tensors, initial_state=initial_state, output_final_state=output_final_state)


@computes_in_float32_under_autocast
def rwkv6_step(r_t, k_t, v_t, w_t, u, state=None):
    """One decoding step: r_t, k_t [B, H, Dk], v_t [B, H, Dv], w_t [B, H, Dk] log-decay <= 0,
    u [H, Dk]; state None or S [B, H, Dk, Dv]. Returns (o_t [B, H, Dv], new state)."""
    _check_r("r_t", "k_t", r_t, k_t, 3)
    B, H, Dk, Dv = check_step_qkv(r_t, k_t, v_t)
    _check_w("w_t", w_t, r_t, (B, H, Dk), "[B, H, Dk]")
    _check_u("u", u, r_t, H, Dk)
    check_state("state", state, (B, H, Dk, Dv), "[B, H, Dk, Dv]", r_t)
    dt = compute_dtype(r_t)
    S = r_t.new_zeros(B, H, Dk, Dv, dtype=dt) if state is None else state.to(dt)
    o, S = _step(*(x.to(dt) for x in (r_t, k_t, v_t, w_t)), S, u=u.to(dt))
    return o.to(r_t.dtype), S


def _step(r, k, v, w, S, *, u):
    """Read S_{t-1} plus the bonus, then write; r, k, w [B, H, Dk], v [B, H, Dv], u [H, Dk]."""
    # broadcast products, not matmuls: decoding-size matmuls pay a thread-pool round trip
    o = (r.unsqueeze(-1) * S).sum(-2) + (r * u * k).sum(-1, keepdim=True) * v  # [B, H, Dv]
    S = torch.exp(w).unsqueeze(-1) * S + k.unsqueeze(-1) * v.unsqueeze(-2)  # [B, H, Dk, Dv]
    return o, S


def _chunk(r, k, v, w, u, S0, C):
    """Chunkwise RWKV-6 through inclusive gated linear attention on a shifted sequence.

    1. Shift keys, values and log-decays one token later: k'_t = k_{t-1}, v'_t = v_{t-1},
       w'_t = w_{t-1}, with k'_1 = 0, v'_1 = 0, w'_1 = 0, and start from S'_0 = S_0.
    2. The inclusive recurrence S'_t = diag(exp(w'_t)) S'_{t-1} + k'_t v'_t^T then gives
       S'_1 = S_0 and, by induction, S'_t = diag(exp(w_{t-1})) S_{t-2} + k_{t-1} v_{t-1}^T
       = S_{t-1}: so linear attention's read S'_t^T r_t is RWKV-6's exclusive read S_{t-1}^T r_t,
       computed by `chunk_linear_attention` (per-dimension decay; no decay is divided by).
    3. Add the bonus (r_t . (u * k_t)) v_t, a per-token term.
    4. Linear attention's final state is S'_T = S_{T-1}; one more write gives
       S_T = diag(exp(w_T)) S'_T + k_T v_T^T.
    """
    shift = lambda x: F.pad(x[:, :-1], (0, 0, 0, 0, 1, 0))  # [B, T, H, D]: x_{t-1}, x_0 = 0
    o, S = chunk_linear_attention(r, shift(k), shift(v), shift(w), S0, C)  # 1-2
    o = o + (r * u * k).sum(-1, keepdim=True) * v  # 3. [B, T, H, Dv]
    S = torch.exp(w[:, -1]).unsqueeze(-1) * S + k[:, -1].unsqueeze(-1) * v[:, -1].unsqueeze(-2)
    return o, S  # 4. S [B, H, Dk, Dv]


# -- validation ----------------------------------------------------------------------------------

def _check_r(r_name, k_name, r, k, ndim):
    """r is checked under its own name before the shared q/k/v checks (which call it q)."""
    check_tensor(r_name, r, ndim)
    if isinstance(k, torch.Tensor) and r.shape != k.shape:
        raise ValueError(f"{r_name}: expected shape {tuple(k.shape)} (that of {k_name}), "
                         f"got {tuple(r.shape)}")
    if isinstance(k, torch.Tensor) and k.dtype != r.dtype:
        raise TypeError(f"{k_name}: expected dtype {r.dtype} (that of {r_name}), got {k.dtype}")
    check_finite(r_name, r)


def _check_w(name, w, ref, shape, what):
    if w is None:
        raise ValueError(f"{name}: RWKV-6 needs a per-dimension log-decay of shape {what} = "
                         f"{list(shape)}, got None")
    check_like(name, w, ref, shape, what)
    if not _is_compiling() and bool(w.amax() > 0):
        raise ValueError(f"{name}: expected log-decay <= 0 (decay exp(w) in (0, 1]), got max "
                         f"{w.max().item():.4g}")


def _check_u(name, u, ref, H, Dk):
    if u is None:
        raise ValueError(f"{name}: RWKV-6 needs a bonus of shape [H, Dk] = [{H}, {Dk}], got None")
    check_like(name, u, ref, (H, Dk), "[H, Dk]")

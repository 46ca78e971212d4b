"""DeltaProduct = several online SGD steps per token (Siems et al. 2025; paper Eq. 26-28, 41).

Objective: the streaming least-squares loss of Eq. 17-18, minimized by single-example SGD
warm-started from the (decayed) previous memory, as in the delta rule (Eq. 26-29), but taking
n_h steps per token, step j on its own pair (k_tj, v_tj) with step size beta_tj:

    S' = exp(g_t) S_{t-1}                                    (once per token, before its steps)
    S <- (I - beta_tj k_tj k_tj^T) S + beta_tj k_tj v_tj^T    for j = 1 .. n_h
    o_t = S_t^T q_t                                          (read after all n_h steps)

in the op layout S = M^T: [B, H, Dk, Dv]. The state transition of one token is the product of
n_h generalized Householder matrices (hence the name). With n_h = 1 this is `delta_rule`; with
the same pair repeated n_h times it is `Optimizer.sgd(steps=n_h)` of `ttr.recipe`, n_h SGD steps
on the newest pair (the reference's meaning of `steps`).

Forms
  recurrent  the loop above, token by token and step by step (the spec).
  chunk      the n_h steps of every token interleaved into one sequence of T * n_h sub-steps
             (the decay on each token's first sub-step, log-decay 0 on the others; the query
             read only at each token's last sub-step) and handed to the chunkwise delta rule
             (src/ttr/ops/delta_chunk.py, docs/delta_rule_chunk.md); every n_h-th output is
             kept. `chunk_size` counts sub-steps, so a chunk holds chunk_size / n_h tokens.
"""

from __future__ import annotations

import torch

from ttr.ops.common import (
    check_chunk_size,
    check_cu_seqlens,
    check_finite,
    check_form,
    check_like,
    check_log_decay,
    check_state,
    check_step_decay,
    check_tensor,
    compute_dtype,
    varlen,
)
from ttr.ops.delta import _read, recurrent
from ttr.ops.delta_chunk import _chunk_delta_rule

FORMS = ("recurrent", "chunk")


def delta_product(q, k, v, beta, g=None, *, initial_state=None, output_final_state=False,
                  cu_seqlens=None, form="chunk", chunk_size=64):
    """DeltaProduct: n_h delta-rule steps per token, one decay per token.

    q: [B, T, H, Dk]; k: [B, T, H, n_h, Dk]; v: [B, T, H, n_h, Dv]; beta: [B, T, H, n_h] step
    sizes; g: None or [B, T, H] log-decay <= 0, applied once per token before its steps;
    initial_state: [B, H, Dk, Dv] ([N, H, Dk, Dv] with cu_seqlens). `chunk_size` is the chunk
    length of the chunk form in sub-steps (tokens x n_h).
    Returns o [B, T, H, Dv] (dtype of q) and the final state [B, H, Dk, Dv] (float32 for
    half-precision inputs) or None.
    """
    B, T, H, n_h, Dk, Dv = _check_inputs(q, k, v, beta)
    check_log_decay(g, q, per_dim_ok=False)
    check_form(form, FORMS)
    check_chunk_size(chunk_size)
    check_cu_seqlens(cu_seqlens, q)
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    check_state("initial_state", initial_state, (N, H, Dk, Dv), "[B, H, Dk, Dv]", q)

    def run(q, k, v, beta, g, initial_state, output_final_state):
        if form == "chunk":
            return _chunk(q, k, v, beta, g, initial_state, output_final_state, chunk_size)
        return recurrent(_step, q, k, v, beta, g, initial_state, output_final_state)

    if cu_seqlens is not None:
        return varlen(run, cu_seqlens, {"q": q, "k": k, "v": v, "beta": beta, "g": g},
                      initial_state, output_final_state, pad_neutral=True)
    return run(q, k, v, beta, g, initial_state, output_final_state)


def delta_product_step(q_t, k_t, v_t, beta_t, g_t=None, state=None):
    """One decoding step: q_t [B, H, Dk], k_t [B, H, n_h, Dk], v_t [B, H, n_h, Dv],
    beta_t [B, H, n_h], g_t None / [B, H].

    Returns (o_t [B, H, Dv], new state [B, H, Dk, Dv]).
    """
    B, H, n_h, Dk, Dv = _check_inputs(q_t, k_t, v_t, beta_t, sfx="_t")
    check_step_decay(g_t, q_t, per_dim_ok=False)
    check_state("state", state, (B, H, Dk, Dv), "[B, H, Dk, Dv]", q_t)
    dt = compute_dtype(q_t)
    S = q_t.new_zeros(B, H, Dk, Dv, dtype=dt) if state is None else state.to(dt)
    o, S = _step(q_t.to(dt), k_t.to(dt), v_t.to(dt), beta_t.to(dt),
                 None if g_t is None else g_t.to(dt), S)
    return o.to(q_t.dtype), S


def _step(q, k, v, beta, g, S):
    """One token: decay once, then n_h delta steps; o = S^T q. q [B, H, Dk], k [B, H, n_h, Dk],
    v [B, H, n_h, Dv], beta [B, H, n_h], g None / [B, H], S [B, H, Dk, Dv]."""
    if g is not None:
        S = S * torch.exp(g)[..., None, None]
    for k_j, v_j, b_j in zip(k.unbind(2), v.unbind(2), beta.unbind(2), strict=True):
        err = b_j.unsqueeze(-1) * (v_j - _read(S, k_j))  # [B, H, Dv], step j's scaled error
        S = S + k_j.unsqueeze(-1) * err.unsqueeze(-2)  # [B, H, Dk, Dv]
    return _read(S, q), S


def _chunk(q, k, v, beta, g, initial_state, output_final_state, chunk_size):
    """Interleave the sub-steps into a delta rule over T * n_h steps (validated inputs)."""
    B, T, H, n_h, Dk = k.shape
    Dv = v.shape[-1]

    def flat(x):  # [B, T, H, n_h, *D] -> [B, T * n_h, H, *D], token t's steps consecutive
        return x.transpose(2, 3).reshape(B, T * n_h, H, *x.shape[4:])

    # 1. the query only at each token's last sub-step, the decay only at its first
    q_f = torch.cat([q.new_zeros(B, T, n_h - 1, H, Dk), q.unsqueeze(2)], dim=2)
    q_f = q_f.reshape(B, T * n_h, H, Dk)  # [B, T n_h, H, Dk]
    g_f = None
    if g is not None:
        g_f = torch.cat([g.unsqueeze(2), g.new_zeros(B, T, n_h - 1, H)], dim=2)
        g_f = g_f.reshape(B, T * n_h, H)  # [B, T n_h, H]
    # 2. the chunkwise delta rule on the interleaved sequence
    o, S = _chunk_delta_rule(q_f, flat(k), flat(v), flat(beta), g_f,
                             initial_state, output_final_state, chunk_size)
    # 3. keep the read after each token's last step
    return o.reshape(B, T, n_h, H, Dv)[:, :, -1], S


# -- validation ------------------------------------------------------------------------------------

def _check_inputs(q, k, v, beta, sfx=""):
    """Full sequence (sfx "") q [B, T, H, Dk], k [B, T, H, n_h, Dk], v [B, T, H, n_h, Dv],
    beta [B, T, H, n_h]; or one decoding step (sfx "_t") without the T axis.
    Returns (*lead, n_h, Dk, Dv) with lead = (B, T, H) or (B, H)."""
    nq, nk, nv, nb = (f"{n}{sfx}" for n in ("q", "k", "v", "beta"))
    axes = "B, T, H" if sfx == "" else "B, H"
    nd = 4 if sfx == "" else 3
    check_tensor(nq, q, nd)
    check_tensor(nk, k, nd + 1)
    check_tensor(nv, v, nd + 1)
    lead, Dk = tuple(q.shape[:-1]), q.shape[-1]
    n_h = k.shape[-2]
    if tuple(k.shape[:-2]) != lead or k.shape[-1] != Dk:
        raise ValueError(f"{nk}: expected shape [{axes}, n_h, Dk] = {list(lead)} + [n_h, {Dk}] "
                         f"to match {nq}, got {tuple(k.shape)}")
    if v.shape[:-1] != k.shape[:-1]:
        raise ValueError(f"{nv}: expected shape [{axes}, n_h, Dv] = {list(lead)} + [{n_h}, Dv] "
                         f"to match {nk}, got {tuple(v.shape)}")
    _same_dtype_device(q, nq, (nk, k), (nv, v))
    if 0 in (*lead, n_h, Dk, v.shape[-1]):
        raise ValueError(f"{nq}/{nk}/{nv}: expected non-empty dimensions, got {nq} "
                         f"{tuple(q.shape)}, {nk} {tuple(k.shape)}, {nv} {tuple(v.shape)}")
    for name, x in ((nq, q), (nk, k), (nv, v)):
        check_finite(name, x)
    if beta is None:
        raise ValueError(f"{nb}: DeltaProduct needs step sizes of shape [{axes}, n_h] = "
                         f"{[*lead, n_h]}, got None")
    check_like(nb, beta, q, (*lead, n_h), f"[{axes}, n_h]")
    return (*lead, n_h, Dk, v.shape[-1])


def _same_dtype_device(ref, ref_name, *others):
    for name, x in others:
        if x.dtype != ref.dtype:
            raise TypeError(f"{name}: expected dtype {ref.dtype} (that of {ref_name}), "
                            f"got {x.dtype}")
        if x.device != ref.device:
            raise ValueError(f"{name}: expected device {ref.device} (that of {ref_name}), "
                             f"got {x.device}")

"""Exact weighted ridge least squares (recursive least squares, the mesa layer).

Objective (paper Eq. 8 with the linear class; Eq. 10-11 uniform, Eq. 14-15 geometric weights),
solved exactly at every step t (= one Newton step, Eq. 25):

    M_t = argmin_M 1/2 sum_{i<=t} gamma_i^(t) beta_i ||v_i - M k_i||^2
                   + 1/2 sum_d ridge_d ||M e_d||^2

with gamma_i^(t) = prod_{j=i+1}^t exp(g_j) (scalar log-decay g [B, T, H]), per-token sample
weights beta_i >= 0 (default 1) and ridge > 0 (a float, or one value per key dimension [Dk]).
With the decayed Grams (the exact sums Eq. 16 approximates)

    H_kk,t = exp(g_t) H_kk,t-1 + beta_t k_t k_t^T      [Dk, Dk]
    H_kv,t = exp(g_t) H_kv,t-1 + beta_t k_t v_t^T      [Dk, Dv]

the answer is o_t = M_t q_t = H_kv,t^T (H_kk,t + diag(ridge))^{-1} q_t. The ridge is NOT decayed
(it is a prior on M, not a pseudo-sample). ridge = 0 is the min-norm solution of Eq. 11/15, which
only `ttr.reference` computes. The state is the pair (H_kk, H_kv); the ridge is not part of it.

Forms
  recurrent  accumulate the two Grams token by token and solve at every step (the spec).
  parallel   all prefix Grams at once, then one batched solve for all T systems:
             1. H_kk,t for every t is a scalar-decayed linear attention whose value is
                vec(beta_t k_t k_t^T) (unit query and key), so it reuses the chunk form of
                `linear_attention`: relative weights exp(G_t - G_i) <= 1, never an overflowing
                cumulative product, any T and any decay (T = 4096 with g = -0.1 is fine).
             2. x_t = (H_kk,t + diag(ridge))^{-1} q_t: one batched SPD solve of B T H systems.
             3. o_t = H_kv,t^T x_t = sum_i gamma_i^(t) beta_i (k_i . x_t) v_i: linear attention
                with query x_t, key beta_t k_t, value v_t. H_kv,t is never materialized.
             Memory O(B T H Dk^2): a [T, Dk, Dk] tensor is 64 MiB per (batch, head) at
             T = 4096, Dk = 64 in float32, and about three are alive at once (the outer
             products, the prefix Grams, the LU factors), plus O(B H T C) for chunks of C.
             Time O(B T H (C Dk^2 + Dk^3)).
  chunk      without decay (g = None) exact: per chunk one Woodbury capacitance Cholesky
             serves every prefix system (src/ttr/ops/rls_chunk.py, docs/rls_chunk.md).
             With decay, conjugate gradient on all prefix systems at once, each iteration one
             chunked linear attention (src/ttr/ops/rls_cg.py, as in MesaNet): stops at relative
             residual `cg_tol` (default 1e-5 float32, 1e-12 float64) or `cg_max_iter`
             iterations (default 2 Dk); gradients by implicit differentiation.
  The default (form=None) is "chunk" without decay and "parallel" (exact) with it.
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
    check_qkv,
    check_state,
    check_step_decay,
    check_step_qkv,
    check_tensor,
    compute_dtype,
    computes_in_float32_under_autocast,
    scan,
    varlen,
)
from ttr.ops.linear_chunk import chunk_linear_attention
from ttr.ops.rls_cg import cg_rls
from ttr.ops.rls_chunk import chunk_rls

FORMS = ("recurrent", "parallel", "chunk")


@computes_in_float32_under_autocast
def rls(q, k, v, g=None, beta=None, *, ridge, initial_state=None, output_final_state=False,
        cu_seqlens=None, form=None, chunk_size=64, cg_tol=None, cg_max_iter=None):
    """Exact ridge regression memory, `o_t = H_kv,t^T (H_kk,t + diag(ridge))^{-1} q_t`.

    q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; g: None or [B, T, H] log-decay <= 0; beta: None or
    [B, T, H] sample weights >= 0; ridge: float > 0 or tensor [Dk] > 0; initial_state: a pair
    (H_kk [B, H, Dk, Dk], H_kv [B, H, Dk, Dv]) (leading dim N with cu_seqlens).
    `chunk_size` is the chunk of the chunk form and of the parallel form's prefix-Gram scan;
    `cg_tol` (relative residual) and `cg_max_iter` bound the chunk form's conjugate gradient
    when g is given (see the module docstring).
    Returns o [B, T, H, Dv] (dtype of q) and the final pair (float32 for half inputs) or None.
    """
    B, T, H, Dk, Dv = check_qkv(q, k, v)
    check_log_decay(g, q, per_dim_ok=False)
    check_like("beta", beta, q, (B, T, H), "[B, T, H]")
    _check_weights("beta", beta)
    ridge = _check_ridge(ridge, q)
    if form is None:
        # The exact chunk form (docs/rls_chunk.md) is the fast one, but only for uniform weights.
        form = "chunk" if g is None else "parallel"
    check_form(form, FORMS)
    check_chunk_size(chunk_size)
    _check_cg(cg_tol, cg_max_iter)
    check_cu_seqlens(cu_seqlens, q)
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    _check_pair("initial_state", initial_state, N, H, Dk, Dv, q)

    def run(q, k, v, g, beta, initial_state, output_final_state):
        dt = compute_dtype(q)
        q_, k_, v_ = q.to(dt), k.to(dt), v.to(dt)
        g_ = None if g is None else g.to(dt)
        beta_ = None if beta is None else beta.to(dt)
        s0 = None if initial_state is None else tuple(s.to(dt) for s in initial_state)
        if form == "recurrent":
            o, s = _recurrent(q_, k_, v_, g_, beta_, ridge.to(dt), s0)
        elif form == "chunk" and g_ is not None:
            o, s = cg_rls(q_, k_, v_, g_, beta_, ridge.to(dt), s0, chunk_size, tol=cg_tol,
                          max_iter=cg_max_iter)
        elif form == "chunk":
            o, s = chunk_rls(q_, k_, v_, beta_, ridge.to(dt), initial_state=s0,
                             output_final_state=True, chunk_size=chunk_size)
        else:
            o, s = _parallel(q_, k_, v_, g_, beta_, ridge.to(dt), s0, chunk_size)
        return o.to(q.dtype), (s if output_final_state else None)

    if cu_seqlens is not None:
        # padding is neutral (k = 0 adds nothing to either Gram); conjugate gradient stops each
        # system on its own residual, so batching the sequences leaves every solve as it was
        return varlen(run, cu_seqlens, {"q": q, "k": k, "v": v, "g": g, "beta": beta},
                      initial_state, output_final_state, pad_neutral=True)
    return run(q, k, v, g, beta, initial_state, output_final_state)


@computes_in_float32_under_autocast
def rls_step(q_t, k_t, v_t, g_t=None, beta_t=None, state=None, *, ridge):
    """One decoding step: q_t, k_t [B, H, Dk], v_t [B, H, Dv], g_t / beta_t None or [B, H].

    Returns (o_t [B, H, Dv], (H_kk [B, H, Dk, Dk], H_kv [B, H, Dk, Dv])).
    """
    B, H, Dk, Dv = check_step_qkv(q_t, k_t, v_t)
    check_step_decay(g_t, q_t, per_dim_ok=False)
    check_like("beta_t", beta_t, q_t, (B, H), "[B, H]")
    _check_weights("beta_t", beta_t)
    ridge = _check_ridge(ridge, q_t)
    _check_pair("state", state, B, H, Dk, Dv, q_t)
    dt = compute_dtype(q_t)
    if state is None:
        state = (q_t.new_zeros(B, H, Dk, Dk, dtype=dt), q_t.new_zeros(B, H, Dk, Dv, dtype=dt))
    o, s = _step(q_t.to(dt), k_t.to(dt), v_t.to(dt), None if g_t is None else g_t.to(dt),
                 None if beta_t is None else beta_t.to(dt), ridge.to(dt),
                 tuple(x.to(dt) for x in state))
    return o.to(q_t.dtype), s


# -- validation ------------------------------------------------------------------------------------

def _check_ridge(ridge, q: torch.Tensor) -> torch.Tensor:
    """ridge > 0 as a float or a [Dk] tensor; returned as a [Dk] tensor (keeps its autograd)."""
    Dk = q.shape[-1]
    min_norm = "the min-norm (ridge=0) solution is computed by ttr.reference only"
    if isinstance(ridge, torch.Tensor):
        check_tensor("ridge", ridge, 1)
        if tuple(ridge.shape) != (Dk,):
            raise ValueError(f"ridge: expected a float or a tensor of shape [Dk] = [{Dk}], "
                             f"got shape {tuple(ridge.shape)}")
        if ridge.device != q.device:
            raise ValueError(f"ridge: expected device {q.device} (that of q), got {ridge.device}")
        check_finite("ridge", ridge)
        if bool((ridge <= 0).any()):
            raise ValueError(f"ridge: expected every entry > 0, got min "
                             f"{ridge.min().item():.4g}; {min_norm}")
        return ridge
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)):
        raise TypeError(f"ridge: expected a float > 0 or a [Dk] tensor, got "
                        f"{type(ridge).__name__} {ridge!r}")
    if not 0 < ridge < float("inf"):
        raise ValueError(f"ridge: expected a finite value > 0, got {ridge!r}; {min_norm}")
    return torch.full((Dk,), float(ridge), dtype=compute_dtype(q), device=q.device)


def _check_cg(tol, max_iter) -> None:
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float))
                            or not 0 < tol < 1):
        raise ValueError(f"cg_tol: expected a relative residual in (0, 1) or None, got {tol!r}")
    if max_iter is not None and (isinstance(max_iter, bool) or not isinstance(max_iter, int)
                                 or max_iter < 1):
        raise ValueError(f"cg_max_iter: expected a positive int or None, got {max_iter!r}")


def _check_weights(name: str, beta) -> None:
    # Negative sample weights would make H_kk indefinite: no longer a least-squares problem.
    if beta is not None and bool((beta < 0).any()):
        raise ValueError(f"{name}: expected sample weights >= 0, got min {beta.min().item():.4g}")


def _check_pair(name, s, B, H, Dk, Dv, ref):
    if s is None:
        return
    if not isinstance(s, (tuple, list)) or len(s) != 2:
        raise TypeError(f"{name}: expected a pair (H_kk, H_kv), got {type(s).__name__}")
    check_state(f"{name}[0] (H_kk)", s[0], (B, H, Dk, Dk), "[B, H, Dk, Dk]", ref)
    check_state(f"{name}[1] (H_kv)", s[1], (B, H, Dk, Dv), "[B, H, Dk, Dv]", ref)


# -- forms -------------------------------------------------------------------------------------

def solve_spd(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x = A^{-1} b for a batch of symmetric positive definite A [..., D, D] and b [..., D].

    Measured on this 2-core CPU (torch 2.13, 8192 SPD 64x64 systems, one right-hand side, 1
    thread, median of 5 interleaved runs; the machine was shared, so +-20%):
                                   float32 fwd / fwd+bwd     float64 fwd / fwd+bwd
        linalg.solve (LU)            572 /  946 ms             675 / 1285 ms
        linalg.solve_ex              555 /  913 ms             798 / 1248 ms
        cholesky + cholesky_solve    571 / 3272 ms             777 / 4753 ms
        cholesky_ex + cholesky_solve 563 / 3121 ms             690 / 4636 ms
    Forward is a tie; the Cholesky backward is 3-4x slower, so LU wins for training. LU with
    partial pivoting is backward stable, and ridge > 0 keeps A well defined.
    """
    return torch.linalg.solve(A, b.unsqueeze(-1)).squeeze(-1)


def _step(q, k, v, g, beta, ridge, state):
    """Accumulate the decayed Grams, then solve. Shapes [B, H, ...] without a time axis."""
    Hkk, Hkv = state
    if g is not None:
        a = torch.exp(g)[..., None, None]  # [B, H, 1, 1]
        Hkk, Hkv = a * Hkk, a * Hkv
    bk = k if beta is None else beta.unsqueeze(-1) * k  # [B, H, Dk]
    Hkk = Hkk + bk.unsqueeze(-1) * k.unsqueeze(-2)  # [B, H, Dk, Dk]
    Hkv = Hkv + bk.unsqueeze(-1) * v.unsqueeze(-2)  # [B, H, Dk, Dv]
    x = solve_spd(Hkk + torch.diag(ridge), q)  # [B, H, Dk]
    return (x.unsqueeze(-1) * Hkv).sum(-2), (Hkk, Hkv)  # H_kv^T x


def _recurrent(q, k, v, g, beta, ridge, s0):
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    state = s0 if s0 is not None else (q.new_zeros(B, H, Dk, Dk), q.new_zeros(B, H, Dk, Dv))
    return scan(lambda q_t, k_t, v_t, g_t, b_t, st: _step(q_t, k_t, v_t, g_t, b_t, ridge, st),
                state, q, k, v, g, beta)


def _parallel(q, k, v, g, beta, ridge, s0, C):
    B, T, H, Dk = q.shape
    bk = k if beta is None else beta.unsqueeze(-1) * k  # [B, T, H, Dk]
    Hkk0, Hkv0 = (None, None) if s0 is None else s0
    # 1. prefix Grams: linear attention with unit query/key and value vec(beta_t k_t k_t^T)
    ones = q.new_ones(B, T, H, 1)
    kk = (bk.unsqueeze(-1) * k.unsqueeze(-2)).reshape(B, T, H, Dk * Dk)  # [B, T, H, Dk^2]
    P0 = None if Hkk0 is None else Hkk0.reshape(B, H, 1, Dk * Dk)
    Hkk, P = chunk_linear_attention(ones, ones, kk, g, P0, C)  # [B, T, H, Dk^2]
    # 2. one batched SPD solve for every prefix system
    x = solve_spd(Hkk.reshape(B, T, H, Dk, Dk) + torch.diag(ridge), q)  # [B, T, H, Dk]
    # 3. o_t = H_kv,t^T x_t: linear attention with query x, key beta k, value v
    o, Hkv = chunk_linear_attention(x, bk, v, g, Hkv0, C)  # [B, T, H, Dv]
    return o, (P.reshape(B, H, Dk, Dk), Hkv)

"""Chunkwise recursive least squares with decay: every prefix system solved by conjugate gradient.

With a scalar log-decay g the Grams are decayed but the ridge is not,

    (H_kk,t + diag(ridge)) x_t = q_t,   o_t = H_kv,t^T x_t,
    H_kk,t = e^{G_t} H_kk,0 + sum_{i<=t} gamma_i^(t) beta_i k_i k_i^T,

so the base matrix of the exact Woodbury chunk form (rls_chunk.py) changes with t and that form
does not apply. MesaNet (von Oswald et al. 2025, "MesaNet: sequence modeling by locally optimal
test-time training") solves these systems by conjugate gradient instead, which needs only
products H_kk,t p_t -- and for all t at once that product is a chunked gated linear attention
with query p_t, key beta_t k_t and value k_t (S_t = H_kk,t is symmetric, so S_t^T p_t = H_kk,t p_t).
One CG iteration therefore costs one chunked linear attention with Dv = Dk, O(T (C Dk + Dk^2)),
and never materializes a [T, Dk, Dk] tensor.

Accuracy, stated: CG runs on all B T H systems together and stops when every relative residual
||q_t - A_t x_t|| / ||q_t|| is at most `tol` (default 1e-5 in float32, 1e-12 in float64), or after
`max_iter` iterations (default 2 Dk; in exact arithmetic CG ends in at most Dk). Systems that are
already converged take zero steps. Iterations needed grow with sqrt(cond(A_t)): a ridge that is
small next to the largest Gram eigenvalue (slow decay, long windows) makes it slow, and float32
cannot reach residuals much below eps * cond. Under torch.compile the loop runs exactly
`max_iter` iterations (an early exit would read tensor data and break the graph).

Gradients by implicit differentiation, not through the iterations: with x* the CG solution
(computed without autograd) and the residual r(q, theta) = q - A(theta) x*, which is ~0, the
output is x = x* + Z(r), where Z returns 0 and its backward applies A^{-1} (one more CG solve;
A is symmetric). Then dx/dq = A^{-1} and dx/dtheta = -A^{-1} (dA/dtheta) x*, the implicit
function theorem, for every input theta = (beta k, k, g, H_kk,0, ridge) of the Gram, with the
product A(theta) x* differentiated by ordinary autograd (one chunked linear attention). Nothing
calls torch.autograd.grad inside a backward, so the form traces under torch.compile.
The output o_t = H_kv,t^T x_t is an ordinary chunked linear attention.
"""

from __future__ import annotations

import torch

from ttr.ops.common import _is_compiling
from ttr.ops.decay import sums_after
from ttr.ops.linear_chunk import chunk_linear_attention


def default_tol(dtype: torch.dtype) -> float:
    return 1e-12 if dtype == torch.float64 else 1e-5


def _system(q, k, beta, ridge, s0, tol, max_iter):
    """What both entry points share: (the Gram's inputs minus g, i.e. (beta k, k); H_kk,0;
    H_kv,0; ridge as [Dk]; tol; max_iter) with the documented defaults filled in."""
    Dk = q.shape[-1]
    ridge = torch.as_tensor(ridge, dtype=q.dtype, device=q.device).expand(Dk)
    bk = k if beta is None else beta.unsqueeze(-1) * k  # [B, T, H, Dk]
    Hkk0, Hkv0 = (None, None) if s0 is None else s0
    return (bk, k, Hkk0, Hkv0, ridge, default_tol(q.dtype) if tol is None else tol,
            2 * Dk if max_iter is None else max_iter)


def cg_rls(q, k, v, g, beta, ridge, s0, C, *, tol=None, max_iter=None):
    """q, k [B, T, H, Dk], v [B, T, H, Dv], g None or [B, T, H] log-decay, beta None or [B, T, H],
    ridge [Dk], s0 None or (H_kk [B, H, Dk, Dk], H_kv [B, H, Dk, Dv]); validated, in one dtype.
    Returns o [B, T, H, Dv] and the final pair (H_kk, H_kv)."""
    bk, k, Hkk0, Hkv0, ridge, tol, max_iter = _system(q, k, beta, ridge, s0, tol, max_iter)
    gram = (bk, k, g, Hkk0, ridge)
    with torch.no_grad():
        x, _ = _cg(q, lambda p: _matvec(p, *gram, C), tol, max_iter)  # [B, T, H, Dk]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, *gram)):
        r = q - _matvec(x, *gram, C)  # ~0 in value; carries the gradient to q and the Gram
        x = x + _Inverse.apply(r, C, tol, max_iter, *(
            None if t is None else t.detach() for t in gram))
    o, Hkv = chunk_linear_attention(x, bk, v, g, Hkv0, C)  # [B, T, H, Dv]
    return o, (_final_gram(bk, k, g, Hkk0), Hkv)


def _final_gram(bk, k, g, Hkk0):
    """H_kk,T = e^{G_T} H_kk,0 + sum_i exp(g_{i+1} + ... + g_T) beta_i k_i k_i^T. [B, H, Dk, Dk]"""
    if g is None:
        H = torch.einsum("bthi,bthj->bhij", bk, k)
        return H if Hkk0 is None else H + Hkk0
    # sum_{j>i} g_j as a shifted reverse cumsum, not a difference (see decay.segment_sums)
    w = torch.exp(sums_after(g.transpose(1, 2), per_dim=False)).transpose(1, 2)  # [B, T, H]
    H = torch.einsum("bthi,bthj->bhij", bk * w.unsqueeze(-1), k)
    if Hkk0 is not None:
        H = H + torch.exp(g.sum(1))[..., None, None] * Hkk0
    return H


def cg_iterations(q, k, g, beta=None, *, ridge, initial_state=None, chunk_size=64, tol=None,
                  max_iter=None) -> int:
    """How many CG iterations the chunk form's forward takes on these inputs (the slowest of the
    B T H systems decides): a diagnostic for choosing ridge, tol and max_iter, and the count
    behind `ttr bench`'s FLOP rate of the decayed chunk form. Inputs as for `ttr.ops.rls`
    (q, k [B, T, H, Dk], g [B, T, H], ridge a float or [Dk])."""
    bk, k, Hkk0, _, ridge, tol, max_iter = _system(q, k, beta, ridge, initial_state, tol,
                                                   max_iter)
    with torch.no_grad():
        _, n = _cg(q, lambda p: _matvec(p, bk, k, g, Hkk0, ridge, chunk_size), tol, max_iter)
    return n


def _matvec(p, bk, k, g, Hkk0, ridge, C):
    """A_t p_t = H_kk,t p_t + ridge * p_t for every t: [B, T, H, Dk]. The state entering the
    scan is H_kk,0^T, so that S_0^T p = H_kk,0 p also for the gradient (a Gram is symmetric, but
    its gradient must be that of H_kk,0 p, as in the recurrent form)."""
    Hp, _ = chunk_linear_attention(p, bk, k, g, None if Hkk0 is None else Hkk0.mT, C)
    return Hp + ridge * p


def _cg(b, matvec, tol, max_iter):
    """Solve A_t x_t = b_t for all t by conjugate gradient from x = 0 (A_t SPD). Returns x and
    the number of iterations taken."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = (r * r).sum(-1, keepdim=True)  # [B, T, H, 1]
    bound = (tol * tol) * rs  # stop when ||r||^2 <= tol^2 ||b||^2
    tiny = torch.finfo(b.dtype).tiny
    n = 0
    for n in range(max_iter + 1):
        if n == max_iter or (not _is_compiling() and bool((rs <= bound).all())):
            break
        Ap = matvec(p)
        pAp = (p * Ap).sum(-1, keepdim=True)
        # converged (or zero) systems take no step: alpha = 0 keeps x and r as they are
        active = rs > bound
        alpha = torch.where(active, rs / pAp.clamp_min(tiny), 0.0)
        x = x + alpha * p
        r = r - alpha * Ap
        rs_new = (r * r).sum(-1, keepdim=True)
        p = r + torch.where(active, rs_new / rs.clamp_min(tiny), 0.0) * p
        rs = rs_new
    return x, n


class _Inverse(torch.autograd.Function):
    """Z(r) = 0 in value, with backward dr = A^{-1} dz by CG (module docstring): the solution's
    sensitivity, without differentiating through the CG iterations."""

    @staticmethod
    def forward(ctx, r, C, tol, max_iter, bk, k, g, Hkk0, ridge):
        ctx.save_for_backward(bk, k, g, Hkk0, ridge)
        ctx.C, ctx.tol, ctx.max_iter = C, tol, max_iter
        return torch.zeros_like(r)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dz):
        gram = ctx.saved_tensors
        w, _ = _cg(dz, lambda p: _matvec(p, *gram, ctx.C), ctx.tol, ctx.max_iter)
        return (w,) + (None,) * 8

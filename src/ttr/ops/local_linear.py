"""Local linear attention = the p = 1 local polynomial regressor ("higher-order attention").

Objective (paper Eq. 48-49 with p = 1): for each query q_t fit an affine map of the offsets
d_ti = k_i - q_t to the values, weighting pair i by the Gaussian smoothing kernel,

    (M0, M1) = argmin 1/2 sum_{i<=t} w_ti ||v_i - M0 - M1 d_ti||^2 + ridge/2 * m0 ||M1||_F^2,
    w_ti = exp(-||k_i - q_t||^2 / bandwidth),   m0 = sum_i w_ti,   o_t = M0,

with bandwidth 2 sqrt(Dk) by default (Eq. 51). The ridge acts on the slope only and is scaled
by the total weight m0, i.e. it is a ridge on the normalized-weight problem (p_i = w_ti / m0).
Eq. 52-53 pose it as weighted least squares on the design rows x_i = [1, d_i]:

    G = sum_i p_i x_i x_i^T = [[1, dbar^T], [dbar, E_p[d d^T]]],   R = sum_i p_i x_i v_i^T,
    ridge > 0:  M1 = Cov_vd (Cov_dd + ridge I)^-1,  M0 = vbar - M1 dbar            (Eq. 54)
    ridge = 0:  [M0; M1^T] = pinv(G) R

For ridge = 0 this is the min-norm solution of the joint problem over (M0, M1), which is what
`ttr.reference` computes with pinv of the weighted design (pinv(X) = pinv(X^T X) X^T). On a
rank-deficient prefix (t <= Dk, e.g. the first step) it differs from the centered formula with
pinv(Cov_dd): at t = 1 it gives M0 = v_1 / (1 + ||d_1||^2), not v_1. The eigenvalue cut-off of
pinv(G) is relative, `PINV_RTOL` per dtype: G's eigenvalues are the squared singular values
of the design, so directions below sqrt(rtol) of the largest singular value are dropped (the
reference keeps them down to ~T eps; only matters for nearly degenerate prefixes).

Everything reduces to weighted moments of the keys (`local_linear_moments`): each moment over
a block of keys is one matmul, and the per-query solve reads them.

The memory is nonparametric: the state is the KV cache (K [B, Tc, H, Dk], V [B, Tc, H, Dv]) as
in `softmax_attention`; queries attend to the cached keys and their own causal prefix.

Forms
  recurrent  the spec: Eq. 52-53 literally, one query at a time -- the design rows [1, d_ti] of
           the keys it sees, G and R from them, theta = G^-1 R (pinv with ridge = 0). The
           decoding step `ttr.ops.steps.local_linear_attention_step` is this form on
           one query.
  naive    the full weight matrix [B, H, T, T] and the moments as matmuls over all keys.
  blocked  FlashAttention-style (`local_linear_blocked`): per query block, stream the key
           blocks up to the diagonal (once for the row max of the log-weights, once for the
           moments under it), and solve the per-query systems at the end. Peak
           extra memory O(Bq Dk (Dk + Dv)) per (batch, head). With ridge > 0 it makes a second
           pass instead of streaming the v k^T moments and solves one right-hand side per
           query (`_query_block`), and its backward is `_BlockedFn`'s: recomputation from
           per-query statistics (the log-normalizer, kbar, vbar, u = A^-1 dbar and A's LU
           factors), so training memory is O(T Dk^2) per (batch, head), not O(T^2); with
           recompute=True it recomputes them per query block instead (a second forward pass),
           O(T (Dk + Dv)). Derivation in its docstring. Measured (1 thread, B H = 2, T = 1024,
           D = 32): backward 0.11 s and +39 MB peak, against 0.84 s and +561 MB for autograd
           through the loop; at T = 4096, D = 64, B H = 1 (docs/benchmarks.md): peak 149 MB
           (62 MB with recompute) against 814 MB for the naive form. The forward costs
           O(T^2 Dk^2) (the second moments) plus a Dk x Dk LU per query; the backward
           O(T^2 (Dk + Dv)) and two triangular solves per query. The second pass trades some
           float32 accuracy for speed: (k_i - kbar)^T u cancels where u is large outside the
           keys' span (T < Dk, small ridge), so the float32 error against float64 is 2-4x the
           one-pass solve's (T = Dk = 128, ridge 0.1: 2.5e-5 against 8e-6; ridge 0.01: 1.9e-4
           against 5.7e-5); one MQAR training step (d_model 128, T = 128) went 6.0 -> 2.3 s.
With ridge = 0 the gradient goes through pinv (autograd through the loop) and is undefined on
rank-deficient prefixes; use ridge > 0 to train. Not yet here: a decayed variant and a fused kernel.
"""

from __future__ import annotations

import math

import torch

from ttr.ops.common import (
    check_causal,
    check_cu_seqlens,
    check_form,
    check_qkv,
    compute_dtype,
)
from ttr.ops.local import with_caches
from ttr.ops.local_linear_blocked import _blocked
from ttr.ops.local_linear_moments import PINV_RTOL, _intercept, _moments

FORMS = ("recurrent", "naive", "blocked")


def local_linear_attention(q, k, v, *, bandwidth=None, ridge=0.0, initial_state=None,
                           output_final_state=False, cu_seqlens=None, form="blocked",
                           block_size=256, causal=True, recompute=False):
    """Causal local linear regression attention (p = 1 local polynomial, Eq. 52-54).

    q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; bandwidth: float > 0 (default 2 sqrt(Dk));
    ridge: float >= 0 on the slope M1; initial_state: KV cache (K [B, Tc, H, Dk],
    V [B, Tc, H, Dv]). With cu_seqlens, initial_state is a pair with leading dim N or a list
    of N pairs, and the final state is a list of N pairs (as in `softmax_attention`).
    causal=False fits every query to all keys of the call and the cache (non-causal).
    block_size: queries and keys per block of the blocked form (256: larger blocks make larger
    matmuls; measured single-thread at T = 2048, D = 64: 15.8 GFLOP/s at 64, 20.7 at 256).
    recompute: the blocked form's backward (ridge > 0) recomputes the per-query statistics
    (a second forward pass) instead of saving them: training memory O(T (Dk + Dv)) instead of
    O(T Dk^2) per (batch, head), for about twice the forward time.
    Returns o [B, T, H, Dv] (dtype of q) and the final cache or None.
    """
    B, T, H, Dk, Dv = check_qkv(q, k, v)
    check_causal(causal)
    check_number("bandwidth", bandwidth, allow_zero=False, allow_none=True)
    check_number("ridge", ridge, allow_zero=True, allow_none=False)
    check_form(form, FORMS)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size: expected a positive int, got {block_size!r}")
    check_cu_seqlens(cu_seqlens, q)
    bw = float(bandwidth) if bandwidth is not None else 2.0 * math.sqrt(Dk)
    if not isinstance(recompute, bool):
        raise TypeError(f"recompute: expected a bool, got {recompute!r}")
    args = (bw, float(ridge), form, block_size, causal, recompute)
    return with_caches(lambda q, k, v, cache, final: _attend(q, k, v, cache, final, *args),
                       q, k, v, initial_state, output_final_state, cu_seqlens)


def check_number(name, x, *, allow_zero, allow_none) -> None:
    if x is None and allow_none:
        return
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(x).__name__} {x!r}")
    if not math.isfinite(x) or x < 0 or (x == 0 and not allow_zero):
        raise ValueError(f"{name}: expected a finite value {'>= 0' if allow_zero else '> 0'}, "
                         f"got {x!r}")


# -- forms -----------------------------------------------------------------------------------

def _attend(q, k, v, cache, output_final_state, bw, ridge, form, block_size, causal,
            recompute):
    K, V = k, v
    if cache is not None:
        K, V = torch.cat([cache[0].to(k.dtype), k], 1), torch.cat([cache[1].to(v.dtype), v], 1)
    # cached steps before this call; non-causal = every key counts as cached before query 0
    Tc = K.shape[1] - q.shape[1] if causal else K.shape[1]
    B, H = q.shape[0], q.shape[2]
    dt = compute_dtype(q)
    # [B, T, H, D] -> [B*H, T, D]: (batch, head) is one leading batch dim of every matmul
    qf, Kf, Vf = (x.to(dt).transpose(1, 2).flatten(0, 1) for x in (q, K, V))
    fn = {"recurrent": _recurrent, "naive": _naive, "blocked": _blocked}[form]
    o = fn(qf, Kf, Vf, Tc, bw, ridge, block_size, recompute)  # [B*H, T, Dv]
    o = o.unflatten(0, (B, H)).transpose(1, 2).to(q.dtype)  # [B, T, H, Dv]
    return o, ((K, V) if output_final_state else None)


def _naive(q, K, V, Tc, bw, ridge, block_size, recompute):
    """All T x (Tc + T) weights at once, keys uncentered (c = 0)."""
    T, L = q.shape[1], K.shape[1]
    # 1. log-weights -||k_i - q_t||^2 / bw, the ||q_t||^2 term dropped (it cancels in p_i)
    logw = (2 * q @ K.mT - (K * K).sum(-1)[:, None]) / bw  # [BH, T, L]
    keep = torch.arange(L, device=q.device) <= Tc + torch.arange(T, device=q.device)[:, None]
    logw = logw.masked_fill(~keep, -math.inf)
    w = torch.exp(logw - logw.amax(-1, keepdim=True))  # [BH, T, L]
    # 2. moments; the outer products k k^T, v k^T are flattened so each moment is one matmul
    m = _moments(w, K, V)
    return _intercept(*m, q, ridge)


def _recurrent(q, K, V, Tc, bw, ridge, block_size, recompute):
    """The spec, one query at a time: q [BH, T, Dk] after Tc cached keys of K [BH, L, Dk],
    V [BH, L, Dv] -> o [BH, T, Dv]. Query t sees the keys i < Tc + t + 1 (all L when
    non-causal, Tc = L) and solves Eq. 52-53 on its design rows x_i = [1, d_ti]:
        G = sum_i p_i x_i x_i^T + ridge diag(0, 1, ..., 1),   R = sum_i p_i x_i v_i^T,
        theta = G^-1 R (ridge > 0), pinv(G) R (ridge = 0: the joint min-norm fit),  o_t = theta_0.
    The ridge leaves the intercept alone and, on normalized weights p = softmax of the
    log-weights, is scaled by m0 as in the module docstring."""
    L, Dk = K.shape[1], K.shape[2]
    pen = torch.full((Dk + 1,), ridge, dtype=q.dtype, device=q.device)
    pen[0] = 0.0  # the intercept M0 is the output, never shrunk
    outs = []
    for t in range(q.shape[1]):
        n = min(Tc + t + 1, L)
        d = K[:, :n] - q[:, t, None]  # [BH, n, Dk] offsets d_ti = k_i - q_t
        p = torch.softmax(-(d * d).sum(-1) / bw, -1)[..., None]  # [BH, n, 1] (Eq. 48)
        X = torch.cat([torch.ones_like(d[..., :1]), d], -1)  # [BH, n, 1 + Dk] design rows
        G, R = X.mT @ (p * X), X.mT @ (p * V[:, :n])  # [BH, 1 + Dk, 1 + Dk], [BH, 1 + Dk, Dv]
        if ridge > 0:
            theta = torch.linalg.solve(G + torch.diag(pen), R)
        else:
            G = 0.5 * (G + G.mT)  # exactly symmetric for pinv's eigendecomposition
            theta = torch.linalg.pinv(G, rtol=PINV_RTOL[G.dtype], hermitian=True) @ R
        outs.append(theta[:, 0])  # [BH, Dv]
    return torch.stack(outs, 1)

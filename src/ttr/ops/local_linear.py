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

Everything reduces to weighted moments of the keys: d_ti = k_i - q_t, so with any center c
(k' = k - c, q' = q - c; d is unchanged) and m1 = sum w k', S2 = sum w k' k'^T, mv = sum w v,
Mvk = sum w v k'^T,

    dbar = m1/m0 - q',   Cov_dd = S2/m0 - (m1/m0)(m1/m0)^T,   Cov_vd = Mvk/m0 - (mv/m0)(m1/m0)^T.

The memory is nonparametric: the state is the KV cache (K [B, Tc, H, Dk], V [B, Tc, H, Dv]) as
in `softmax_attention`; queries attend to the cached keys and their own causal prefix.

Forms
  naive    the full weight matrix [B, H, T, T] and the moments as matmuls over all keys.
  blocked  FlashAttention-style: per query block, stream the key blocks up to the diagonal with
           an online max of the log-weights, and solve the per-query systems at the end. Peak
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
rank-deficient prefixes; use ridge > 0 to train. Not yet here: a `form="recurrent"` and a
`step()` for decoding (naive with a cache is the per-query spec meanwhile), a decayed variant,
and a fused kernel.
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
    constant,
)
from ttr.ops.local import with_caches

FORMS = ("naive", "blocked")
PINV_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}


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
    fn = _naive if form == "naive" else _blocked
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


def _blocked(q, K, V, Tc, bw, ridge, block_size, recompute):
    """Per query block: online-max streaming of the key moments, then the per-query solve.
    With ridge > 0 and gradients needed, the backward pass is `_BlockedFn`'s (recomputation);
    ridge = 0 goes through pinv, which autograd differentiates through the loop."""
    if ridge > 0 and torch.is_grad_enabled() and any(x.requires_grad for x in (q, K, V)):
        return _BlockedFn.apply(q, K, V, Tc, bw, ridge, block_size, recompute)
    return _blocked_forward(q, K, V, Tc, bw, ridge, block_size, stats=False)[0]


def _query_blocks(q, Tc, block_size):
    """(a, b, c, qc, pos): each query block, its center (the block's mean query, so that the
    second moments of k - c stay well scaled; d = k - q does not depend on c) and positions."""
    for a in range(0, q.shape[1], block_size):
        b = min(a + block_size, q.shape[1])
        c = q[:, a:b].mean(1, keepdim=True)  # [BH, 1, Dk]
        yield a, b, c, q[:, a:b] - c, Tc + torch.arange(a, b, device=q.device)


def _key_blocks(qc, K, V, c, pos, bw, block_size):
    """(s, e, kc, vb, logw) for the key blocks the query block sees: log-weights
    (2 q'.k' - |k'|^2) / bw = -|k - q|^2 / bw + |q'|^2 / bw, causally masked."""
    end = min(int(pos[-1]) + 1, K.shape[1])  # keys visible to the block's last query
    for s in range(0, end, block_size):
        e = min(s + block_size, end)
        kc, vb = K[:, s:e] - c, V[:, s:e]  # [BH, Bk, Dk], [BH, Bk, Dv]
        logw = (2 * qc @ kc.mT - (kc * kc).sum(-1)[:, None]) / bw  # [BH, Bq, Bk]
        if e - 1 > pos[0]:  # block reaches past the first query: causal mask
            keep = torch.arange(s, e, device=qc.device) <= pos[:, None]
            logw = logw.masked_fill(~keep, -math.inf)
        yield s, e, kc, vb, logw


def _blocked_forward(q, K, V, Tc, bw, ridge, block_size, stats):
    outs, saved = [], []
    for _a, _b, c, qc, pos in _query_blocks(q, Tc, block_size):
        o, st = _query_block(qc, K, V, c, pos, bw, ridge, block_size, stats)
        outs.append(o)
        saved.append(st)
    o = torch.cat(outs, 1)  # [BH, T, Dv]
    # the statistics stay per query block, as the backward reads them: joined along the query
    # axis, the LU factors lost LAPACK's column-major layout (a transposing copy of all of
    # them) and, sliced back per block, their batch strides (a copy in every lu_solve).
    # Forward + backward, measured as in `_stream_moments`: B H = 16 2.37 -> 2.06 s; with the
    # two-pass moments, against the code before both, B H = 16 2.87 -> 2.46 s and B H = 64
    # 13.2 -> 9.8 s
    return o, (saved if stats else None)


def _query_block(qc, K, V, c, pos, bw, ridge, block_size, stats):
    """One query block. Returns (o [BH, Bq, Dv], None or the per-query statistics (lse, kbar,
    vbar, u, and the LU factors of A) that `_BlockedFn` saves).

    ridge > 0 takes two passes over the visible key blocks and solves one right-hand side per
    query. Pass 1 streams m0, m1, S2 and mv (not Mvk: its T^2 Dk Dv flops are the largest
    term once Dv ~ Dk). Then u = A^-1 dbar, and pass 2 reads the output off the weights of the
    equivalent attention (`_BlockedFn`'s a_i = p_i (1 - (k_i - kbar)^T u)),
        o = vbar - sum_i p_i ((k_i - kbar)^T u) v_i,
    at T^2 (2 Dk + Dv) flops, instead of solving for M1^T with Dv right-hand sides. Measured
    (one thread, B H = 32, T = 128, Dk = Dv = 128): LU with 129 right-hand sides 3.1 s,
    lu_factor 0.8 s plus a one-column lu_solve 0.06 s; Cholesky (LAPACK, or blocked in bmm) was
    no faster than lu_factor here."""
    mx, acc = _stream_moments(qc, K, V, c, pos, bw, block_size, vk=ridge == 0)
    if ridge == 0:
        return _intercept(*acc, qc, ridge), None
    m0, m1, S2, mv = acc
    inv = (1.0 / m0)[..., None]
    kbar, vbar = m1 * inv, mv * inv  # [BH, Bq, Dk], [BH, Bq, Dv]
    # Eq. 54, A = S2 / m0 - kbar kbar^T + ridge I, formed on the packed triangle and unpacked
    # once: one pass over the [Bq, Dk, Dk] matrices instead of one per term
    A = _unpack(S2 * inv - _packed_outer(kbar), qc.shape[-1])  # [BH, Bq, Dk, Dk]
    A.diagonal(dim1=-2, dim2=-1).add_(ridge)
    # A is symmetric, so A^T, a column-major view, is A: LAPACK's layout without a transpose
    LU, piv = torch.linalg.lu_factor(A.mT)  # [BH, Bq, Dk, Dk]
    u = torch.linalg.lu_solve(LU, piv, (kbar - qc)[..., None])[..., 0]  # A^-1 dbar [BH, Bq, Dk]
    # lse: log of the normalizer sum_i exp(logw_i), so that p_i = exp(logw_i - lse)
    lse = mx + torch.log(m0)
    ukbar, o = (u * kbar).sum(-1, keepdim=True), vbar
    for _s, _e, kc, vb, logw in _key_blocks(qc, K, V, c, pos, bw, block_size):
        cku = u @ kc.mT - ukbar  # (k_i - kbar)^T u [BH, Bq, Bk]
        o = o - (torch.exp(logw - lse[..., None]) * cku) @ vb  # [BH, Bq, Dv]
    return o, ((lse, kbar, vbar, u, LU, piv) if stats else None)


def _stream_moments(qc, K, V, c, pos, bw, block_size, vk):
    """The moments of `_moments` (Mvk only if `vk`) over the visible key blocks, weighted by
    exp(logw - max) with the max over all of them: (max [BH, Bq], moments).

    Two passes over the key blocks: the row max of the log-weights first (one [Bq, Dk] x
    [Dk, Bk] matmul per block), then the moments under that fixed max, accumulated in place by
    the matmuls (baddbmm_). An online max instead rescaled every accumulator, the [Bq,
    Dk (Dk + 1) / 2] second moments above all, once per key block, and summed each block's
    fresh moments into them: three passes over the largest tensor of the forward per block,
    against recomputing the log-weights (4 / Dk of the second moments' flops). Measured with the
    packing written in place (`_packed_outer`), one thread, T = 1024, D = 64, ridge 0.1, old and
    new code interleaved in one process while a sweep ran on the other core: forward at
    B H = 16 1.97 -> 1.80 s, at B H = 64 (fig3's batch) 7.2-8.1 -> 6.5-7.4 s."""
    mx = None
    for *_, logw in _key_blocks(qc, K, V, c, pos, bw, block_size):
        new = logw.amax(-1)  # [BH, Bq]; the first block has an unmasked key for every query
        mx = new if mx is None else torch.maximum(mx, new)
    acc = None
    for _s, _e, kc, vb, logw in _key_blocks(qc, K, V, c, pos, bw, block_size):
        acc = _moments(torch.exp(logw - mx[..., None]), kc, vb, vk, acc)
    return mx, acc


class _BlockedFn(torch.autograd.Function):
    """Blocked local linear attention (ridge > 0) with a backward pass by recomputation, so
    training memory is O(T Dk^2) per (batch, head) -- the per-query statistics below -- and
    not the autograd graph of every (query block, key block) pair.

    Derivation. Per query (center c dropped: k, q stand for k - c, q - c), with p_i the
    normalized weights, kbar, vbar their means, A = Cov_dd + ridge I, dbar = kbar - q,
    u = A^-1 dbar and M1^T = A^-1 Cov_dv (Eq. 54), the output is o = vbar - M1 dbar
        = sum_i a_i v_i,   a_i = p_i (1 - (k_i - kbar)^T u)
    (an attention whose weights sum to one). For an upstream gradient g = dL/do let
    h = M1^T g. Differentiating L = g^T vbar - g^T Cov_vd A^-1 dbar (dA^-1 = -A^-1 dA A^-1):
        dL = g^T dvbar - g^T dCov_vd u + h^T dCov_dd u - h^T dkbar + h^T dq,
    and through the centered sums (sum_i p_i (k_i - kbar) = 0 removes the dkbar terms in the
    covariances), with ck_i = k_i - kbar, cv_i = v_i - vbar:
        dL/dv_i  = a_i g
        dL/dk_i  = p_i [(h^T ck_i - g^T cv_i) u + (ck_i^T u - 1) h]     (direct)
        dL/dq    = h                                                   (direct)
        dL/dp_i  = phi_i = g^T v_i - (g^T cv_i)(ck_i^T u) + (h^T ck_i)(ck_i^T u) - h^T k_i,
    whose mean sum_i p_i phi_i = g^T o - h^T q - ridge h^T u in closed form. The weights are a
    softmax of l_i = -|k_i - q|^2 / bw, so delta_i = p_i (phi_i - mean) is dL/dl_i and
        dL/dq += 2/bw sum_i delta_i k_i,   dL/dk_i += 2/bw delta_i (q - k_i).
    Every term is a (query block x key block) matmul of the saved per-query vectors.
    """

    @staticmethod
    def forward(ctx, q, K, V, Tc, bw, ridge, block_size, recompute):
        o, st = _blocked_forward(q, K, V, Tc, bw, ridge, block_size, stats=not recompute)
        ctx.save_for_backward(q, K, V, o, *(t for block in st or () for t in block))
        ctx.per_block = len(st[0]) if st else 0  # statistics per query block
        ctx.args = (Tc, bw, ridge, block_size)
        return o

    @staticmethod
    def backward(ctx, do):
        q, K, V, o, *saved = ctx.saved_tensors
        Tc, bw, ridge, block_size = ctx.args
        # the incoming gradient may be a broadcast (that of sum(): zero strides); sliced per
        # query block it then gave every matmul below a strided operand (B H = 64, T = 1024:
        # forward + backward of o.sum() 8.7 against 6.6 s with it made contiguous)
        do = do.contiguous()
        dq, dK, dV = torch.zeros_like(q), torch.zeros_like(K), torch.zeros_like(V)
        for i, (a, b, c, qc, pos) in enumerate(_query_blocks(q, Tc, block_size)):
            if saved:  # the statistics of the forward pass, saved flat block after block
                n = ctx.per_block
                lse, kb, vbar, ub, LU, piv = saved[n * i:n * (i + 1)]
            else:  # recompute = True: a second forward pass over this query block
                _, (lse, kb, vbar, ub, LU, piv) = _query_block(qc, K, V, c, pos, bw, ridge,
                                                               block_size, True)
            g = do[:, a:b]  # [BH, Bq, Dv]
            gvbar = (g * vbar).sum(-1)[..., None]  # [BH, Bq, 1]
            # h = M1^T g = A^-1 Cov_dv g, with Cov_dv g = sum_i p_i (g^T cv_i) ck_i from one
            # pass over the key blocks (so that M1^T [Dk, Dv] per query is never formed)
            y = psum = 0
            for _s, _e, kc, vb, logw in _key_blocks(qc, K, V, c, pos, bw, block_size):
                pg = torch.exp(logw - lse[..., None]) * (g @ vb.mT - gvbar)  # [BH, Bq, Bk]
                y, psum = y + pg @ kc, psum + pg.sum(-1, keepdim=True)
            h = torch.linalg.lu_solve(LU, piv, (y - psum * kb)[..., None])[..., 0]  # [BH, Bq, Dk]
            mean = ((g * o[:, a:b]).sum(-1) - (h * qc).sum(-1) - ridge * (h * ub).sum(-1))
            ukbar, hkbar = (ub * kb).sum(-1)[..., None], (h * kb).sum(-1)[..., None]
            dqb = h.clone()
            for s, e, kc, vb, logw in _key_blocks(qc, K, V, c, pos, bw, block_size):
                p = torch.exp(logw - lse[..., None])  # [BH, Bq, Bk]
                gcv = g @ vb.mT - gvbar  # g^T (v_i - vbar)
                cku = ub @ kc.mT - ukbar  # (k_i - kbar)^T u
                hk = h @ kc.mT
                hck = hk - hkbar  # h^T (k_i - kbar)
                phi = gcv + gvbar - gcv * cku + hck * cku - hk
                delta = p * (phi - mean[..., None])
                alpha, beta = p * (hck - gcv), p * (cku - 1)
                dK[:, s:e] += (alpha.mT @ ub + beta.mT @ h
                               + (2 / bw) * (delta.mT @ qc - delta.sum(1)[..., None] * kc))
                dV[:, s:e] -= beta.mT @ g  # a_i = -beta_i
                dqb += (2 / bw) * (delta @ kc)
            dq[:, a:b] = dqb
        return dq, dK, dV, None, None, None, None, None


def _moments(w, k, v, vk=True, acc=None):
    """w [BH, Tq, L], k [BH, L, Dk], v [BH, L, Dv] -> [m0, m1, S2, mv] (and Mvk if `vk`) summed
    over L, added in place to `acc` (the moments of earlier keys under the same weights' scale)
    if given. S2 is packed: its upper triangle [BH, Tq, Dk (Dk + 1) / 2] (`_unpack`); Mvk is
    flattened, [BH, Tq, Dv * Dk] (row-major [Dv, Dk]).

    S2 = w (k k^T) is the largest term of the forward pass (T^2 Dk^2 flops); being symmetric,
    only the products k_a k_b with a <= b are formed and weighted: half the flops and half the
    streamed accumulator; with `_query_block` forming A on the triangle too, measured (one
    thread, T = 1024, D = 64, ridge 0.1, the blocked form): B H = 16, A/B in fresh processes,
    forward 1.52 -> 1.07-1.23 s, forward + backward 2.00-2.07 -> 1.56-1.74 s; B H = 64 (fig3's
    batch), alternating in one process, forward + backward 11.2 -> 7.4 s. (The per-query LU
    stays: Cholesky with its solves was slower here, 307 + 2 x 139 ms against 378 + 2 x 48 ms
    for 16384 systems of 64 x 64.)"""
    rhs = [k, _packed_outer(k), v]
    if vk:
        rhs.append((v[..., :, None] * k[..., None, :]).flatten(-2))  # [BH, L, Dv*Dk]
    if acc is None:
        return [w.sum(-1)] + [w @ x for x in rhs]
    acc[0].add_(w.sum(-1))
    for m, x in zip(acc[1:], rhs, strict=True):
        m.baddbmm_(w, x)
    return acc


def _packed_outer(x: torch.Tensor) -> torch.Tensor:
    """x [..., D] -> the upper triangle of x x^T row by row, x_a x_b for b >= a:
    [..., D (D + 1) / 2]. One broadcast product per row, written into its slice of the result
    (a gather of the index pairs took twice as long as the whole outer product; a cat of the
    rows, one more pass); under autograd, which out= does not record, the cat."""
    D = x.shape[-1]
    if torch.is_grad_enabled() and x.requires_grad:
        return torch.cat([x[..., a:a + 1] * x[..., a:] for a in range(D)], -1)
    out = x.new_empty(*x.shape[:-1], D * (D + 1) // 2)
    start = 0
    for a in range(D):
        torch.mul(x[..., a:a + 1], x[..., a:], out=out[..., start:start + D - a])
        start += D - a
    return out


def _sym_index(D: int, device: torch.device):
    """For every entry (a, b) of a D x D matrix, the position of (min, max) in its upper
    triangle listed row by row (the packing of `_moments`): [D*D]."""
    return constant(("sym", D, device), lambda: _build_sym_index(D, device))


def _build_sym_index(D, device):
    rows, cols = torch.triu_indices(D, D, device=device)  # row by row, b >= a
    pos = torch.empty(D, D, dtype=torch.long, device=device)
    pos[rows, cols] = torch.arange(rows.numel(), device=device)
    pos[cols, rows] = pos[rows, cols]
    return pos.flatten()


def _unpack(S2p: torch.Tensor, D: int) -> torch.Tensor:
    """The packed upper triangle [..., D (D + 1) / 2] -> the symmetric [..., D, D]."""
    full = _sym_index(D, S2p.device)
    # index_select on a 2-d view: on higher-rank tensors torch takes a much slower kernel
    flat = S2p.reshape(-1, S2p.shape[-1]).index_select(1, full)
    return flat.view(*S2p.shape[:-1], D, D)


def _intercept(m0, m1, S2, mv, Mvk, qc, ridge):
    """M0 per query from unnormalized moments of keys centered at c (S2 packed, `_moments`);
    qc = q - c [BH, Tq, Dk].
    Returns M0 [BH, Tq, Dv]. The naive form's solve, and the blocked form's for ridge = 0 (its
    ridge > 0 path is `_query_block`'s)."""
    inv = (1.0 / m0)[..., None]
    kbar, vbar = m1 * inv, mv * inv  # [BH, Tq, Dk], [BH, Tq, Dv]
    S2 = _unpack(S2, qc.shape[-1])  # [BH, Tq, Dk, Dk]
    Mvk = Mvk.unflatten(-1, (mv.shape[-1], qc.shape[-1]))  # [BH, Tq, Dv, Dk]
    cov_dd = S2 * inv[..., None] - kbar[..., :, None] * kbar[..., None, :]
    cov_dv = (Mvk * inv[..., None] - vbar[..., :, None] * kbar[..., None, :]).mT  # [.., Dk, Dv]
    dbar = kbar - qc  # [BH, Tq, Dk]
    if ridge > 0:
        # Eq. 54: M1^T = (Cov_dd + ridge I)^-1 Cov_dv, M0 = vbar - M1 dbar
        eye = torch.eye(cov_dd.shape[-1], dtype=cov_dd.dtype, device=cov_dd.device)
        m1t = torch.linalg.solve(cov_dd + ridge * eye, cov_dv)  # [BH, Tq, Dk, Dv]
        return vbar - (dbar[..., None] * m1t).sum(-2)
    # ridge = 0: the joint min-norm fit [M0; M1^T] = pinv(G) R on the design [1, d]
    dd = cov_dd + dbar[..., :, None] * dbar[..., None, :]  # E_p[d d^T]
    dv = cov_dv + dbar[..., :, None] * vbar[..., None, :]  # E_p[d v^T]
    one = torch.ones_like(m0)[..., None, None]  # [BH, Tq, 1, 1]
    G = torch.cat([torch.cat([one, dbar[..., None, :]], -1),
                   torch.cat([dbar[..., :, None], dd], -1)], -2)  # [BH, Tq, 1+Dk, 1+Dk]
    R = torch.cat([vbar[..., None, :], dv], -2)  # [BH, Tq, 1+Dk, Dv]
    G = 0.5 * (G + G.mT)  # exactly symmetric for the eigendecomposition in pinv
    theta = torch.linalg.pinv(G, rtol=PINV_RTOL[G.dtype], hermitian=True) @ R
    return theta[..., 0, :]

"""Local polynomial attention of any degree p: the general nonparametric regressor of Eq. 48-49.

Objective (paper Eq. 48-49): for each query q_t fit a polynomial of degree p in the offsets
d_ti = k_i - q_t to the values, weighting pair i by the Gaussian smoothing kernel,

    theta_t = argmin 1/2 sum_{i<=t} w_ti ||v_i - theta^T x(d_ti)||^2 + ridge/2 m0 ||theta_1:||^2,
    w_ti = exp(-||k_i - q_t||^2 / bandwidth),   m0 = sum_i w_ti,   o_t = theta_0 = M^[0],

x(d) = all monomials of d up to degree p, [1, d_a, d_a d_b (a <= b), ...] (the basis of
`ttr.reference`; P = C(Dk + p, p) columns), bandwidth 2 sqrt(Dk) by default (Eq. 51). The
conventions are those of `local_linear_attention`, so that degree=1 equals it and degree=0 is
`softmax_attention(bandwidth=...)` (Eq. 50): the ridge acts on every coefficient but the
intercept and is scaled by the total weight m0, i.e. with normalized weights p_i = w_ti / m0

    G_t = sum_i p_i x_i x_i^T + ridge diag(0, 1, ..., 1),   R_t = sum_i p_i x_i v_i^T,
    ridge > 0:  theta_t = G_t^{-1} R_t   (by QR of the sqrt-weighted design with sqrt(ridge) I
                                         rows appended: cond(X), not cond(X)^2)
    ridge = 0:  theta_t = pinv(diag(sqrt(p)) X_t) diag(sqrt(p)) V_t    (min-norm, any rank)

ridge = 0 is the min-norm fit over all P coefficients, computed as `ttr.reference` does: pinv
of the square-root-weighted design with pinv's default cut-off (max(L, P) eps of the largest
singular value). `local_linear_attention` forms pinv(G) with a relative cut-off of 1e-10 /
1e-5 on the moment matrix instead; the two agree on well-posed and on exactly rank-deficient
prefixes (e.g. t <= P - 1 keys: the min-norm intercept, at t = 1 for p = 1 v_1 / (1 +
||d_1||^2)), and differ on nearly degenerate ones. Its gradient goes through pinv and is
undefined on rank-deficient prefixes: train with ridge > 0. The ridge depends on the basis:
it is a ridge on the coefficients of the monomials above, not on the symmetric tensors M^[j].

A common factor on all weights of query t leaves theta_t unchanged, so the weights are
normalized in log space (logsumexp): no overflow or all-zero weights for large-norm queries.

This is a reference-style op for small Dk, to study p = 2: it materializes the design X_t
[L, P] of every query (in blocks of QUERY_BLOCK queries, O(QUERY_BLOCK L P) memory) with a
causal mask (weight 0 for i > t: a zero row changes neither the fit nor the min-norm
solution), O(T L P^2) time. P grows as Dk^p / p!: Dk = 16, p = 2 is P = 153.

The memory is nonparametric: the state is the KV cache (K [B, Tc, H, Dk], V [B, Tc, H, Dv]) as
in `softmax_attention`; queries see the cached keys and their own causal prefix.
"""

from __future__ import annotations

import math

import torch

from ttr.ops.common import check_cu_seqlens, check_qkv, compute_dtype
from ttr.ops.local import with_caches
from ttr.ops.local_linear import check_number

QUERY_BLOCK = 64


def local_polynomial_attention(q, k, v, *, degree, bandwidth=None, ridge=0.0, initial_state=None,
                               output_final_state=False, cu_seqlens=None):
    """Causal local polynomial regression attention of degree p (Eq. 48-49).

    q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; degree: int p >= 0; bandwidth: float > 0 (default
    2 sqrt(Dk)); ridge: float >= 0 on the non-intercept coefficients; initial_state: KV cache
    (K [B, Tc, H, Dk], V [B, Tc, H, Dv]). With cu_seqlens, initial_state is a pair with leading
    dim N or a list of N pairs, and the final state is a list of N pairs.
    Returns o [B, T, H, Dv] (dtype of q) and the final cache or None.
    """
    B, T, H, Dk, Dv = check_qkv(q, k, v)
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 0:
        raise ValueError(f"degree: expected an int >= 0, got {degree!r}")
    check_number("bandwidth", bandwidth, allow_zero=False, allow_none=True)
    check_number("ridge", ridge, allow_zero=True, allow_none=False)
    check_cu_seqlens(cu_seqlens, q)
    bw = float(bandwidth) if bandwidth is not None else 2.0 * math.sqrt(Dk)
    args = (degree, bw, float(ridge))
    return with_caches(lambda q, k, v, cache, final: _attend(q, k, v, cache, final, *args),
                       q, k, v, initial_state, output_final_state, cu_seqlens)


def _attend(q, k, v, cache, output_final_state, degree, bw, ridge):
    K, V = k, v
    if cache is not None:
        K, V = torch.cat([cache[0].to(k.dtype), k], 1), torch.cat([cache[1].to(v.dtype), v], 1)
    Tc = K.shape[1] - q.shape[1]  # cached steps before this call
    B, H = q.shape[0], q.shape[2]
    dt = compute_dtype(q)
    # [B, T, H, D] -> [B*H, T, D]: (batch, head) is one leading batch dim of every matmul
    qf, Kf, Vf = (x.to(dt).transpose(1, 2).flatten(0, 1) for x in (q, K, V))
    T = qf.shape[1]
    outs = [_fit(qf[:, a:a + QUERY_BLOCK], Kf, Vf, Tc + a, degree, bw, ridge)
            for a in range(0, T, QUERY_BLOCK)]
    o = torch.cat(outs, 1).unflatten(0, (B, H)).transpose(1, 2).to(q.dtype)  # [B, T, H, Dv]
    return o, ((K, V) if output_final_state else None)


def monomials(d: torch.Tensor, degree: int) -> torch.Tensor:
    """All monomials of d [.., Dk] up to `degree` (Eq. 49): [.., P], P = C(Dk + degree, degree),
    ordered [1, d_a, d_a d_b (a <= b), ...] as in `ttr.reference`."""
    cols = [torch.ones_like(d[..., 0])]
    prev = [((), cols[0])]  # the degree-(j-1) monomials with their index tuples
    for _ in range(degree):
        # extend each monomial by d_a with a >= its last index: every multiset exactly once,
        # in the order itertools.combinations_with_replacement lists them
        prev = [(idx + (a,), m * d[..., a]) for idx, m in prev
                for a in range(idx[-1] if idx else 0, d.shape[-1])]
        cols += [m for _, m in prev]
    return torch.stack(cols, dim=-1)


def _fit(q, K, V, first, degree, bw, ridge):
    """Weighted least squares for a block of queries q [BH, Tq, Dk] at key positions first..,
    over the keys K [BH, L, Dk], V [BH, L, Dv] they may see; returns the intercepts [BH, Tq, Dv]."""
    Tq = q.shape[1]
    n = first + Tq  # keys visible to the block's last query
    K, V = K[:, :n], V[:, :n]
    # 1. causal, normalized weights p_ti in log space: the max is subtracted (large-norm
    #    queries), and masked keys get p = 0 with gradient 0 also through sqrt(p)
    d = K[:, None] - q[:, :, None]  # [b, t, i] = d_ti = k_i - q_t, [BH, Tq, n, Dk]
    logw = -(d * d).sum(-1) / bw  # [BH, Tq, n]
    keep = torch.arange(n, device=q.device) <= first + torch.arange(Tq, device=q.device)[:, None]
    logw = logw.masked_fill(~keep, -math.inf)  # the query's own key is visible: max finite
    logp = logw - torch.logsumexp(logw, -1, keepdim=True)
    # 2. the design of every query, [BH, Tq, n, P]
    X = monomials(d, degree)
    sp = torch.exp(0.5 * logp).unsqueeze(-1)  # sqrt(p) [BH, Tq, n, 1]
    if ridge == 0:
        # min-norm fit of the sqrt-weighted rows, as the reference (zero rows: masked keys)
        theta = torch.linalg.pinv(sp * X) @ (sp * V[:, None])  # [BH, Tq, P, Dv]
        return theta[..., 0, :]
    # 3. the ridge on the non-intercept coefficients as P extra rows sqrt(pen) I of the
    #    sqrt-weighted design, solved by QR: its conditioning is cond(X), where the normal
    #    equations G = X^T diag(p) X + diag(pen) have cond(X)^2 -- with large-norm offsets
    #    (|d| ~ 20, ridge 1e-3) float32 rounded G to a singular matrix and LU failed on a
    #    well-posed fit. It costs time: f+b at T = 256, two heads, Dk = 8, p = 2 (P = 45),
    #    one thread, 0.16 s with LU on G, 0.37 s by QR
    P = X.shape[-1]
    pen = torch.full((P,), ridge, dtype=X.dtype, device=X.device)
    pen[0] = 0  # the intercept M^[0] is the output, never shrunk
    ridge_rows = torch.diag(pen.sqrt()).expand(*X.shape[:2], P, P)  # [BH, Tq, P, P]
    A = torch.cat([sp * X, ridge_rows], -2)  # [BH, Tq, n + P, P]
    rhs = torch.cat([sp * V[:, None].expand(-1, X.shape[1], -1, -1),
                     V.new_zeros(*X.shape[:2], P, V.shape[-1])], -2)  # [BH, Tq, n + P, Dv]
    Q, Rf = torch.linalg.qr(A)  # [BH, Tq, n + P, P], [BH, Tq, P, P]
    theta = torch.linalg.solve_triangular(Rf, Q.mT @ rhs, upper=True)  # [BH, Tq, P, Dv]
    return theta[..., 0, :]

"""The weighted key moments of local linear attention and the per-query solve from them
(`local_linear_attention`'s naive form, and the blocked form's for ridge = 0).

Every quantity of Eq. 52-54 is a weighted moment of the keys: with any center c (k' = k - c,
q' = q - c; the offsets d = k - q do not change) and weights w_i,
    m0 = sum w,  m1 = sum w k',  S2 = sum w k' k'^T,  mv = sum w v,  Mvk = sum w v k'^T,
    dbar = m1/m0 - q',  Cov_dd = S2/m0 - (m1/m0)(m1/m0)^T,  Cov_vd = Mvk/m0 - (mv/m0)(m1/m0)^T.
Each moment over a block of keys is one matmul of the weights with a per-key feature (the
outer products flattened); S2, symmetric, is kept packed (`_packed_outer`): each product
k_a k_b once.
"""

from __future__ import annotations

import torch

from ttr.ops.common import constant

PINV_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _moments(w, k, v, vk=True, acc=None):
    """w [BH, Tq, L], k [BH, L, Dk], v [BH, L, Dv] -> [m0, m1, S2, mv] (and Mvk if `vk`) summed
    over L, added in place to `acc` (the moments of earlier keys under the same weights' scale)
    if given. S2 is packed, [BH, Tq, (Dk // 2 + 1) Dk] (`_packed_outer`, `_unpack`); Mvk is
    flattened, [BH, Tq, Dv * Dk] (row-major [Dv, Dk]).

    S2 = w (k k^T) is the largest term of the forward pass (T^2 Dk^2 flops); being symmetric,
    only the products k_a k_b with a <= b are formed and weighted: half the flops and half the
    streamed accumulator; with `_query_block` forming A on the packed products too, measured (one
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
    """x [..., D] -> every product x_a x_b with a <= b, in the circulant packing:
    [..., (D // 2 + 1) * D], row s holding x_a x_(a + s mod D) for a = 0 .. D - 1.

    Rows s = 0 .. D // 2 reach every unordered pair (a, b) once through s = b - a or a - b
    mod D, whichever is at most D / 2 (for even D the row s = D / 2 holds its D / 2 pairs
    twice: D / 2 more columns than the triangle's D (D + 1) / 2, 1.5% at D = 64). The row
    shift is a strided view of [x, x] (`unfold`), so the whole packing is one broadcast product
    written contiguously. The triangle row by row took one product per row into a strided
    slice: D = 64, 256 keys, B H = 64, one thread, 50 ms against 20 ms here, next to 108 ms
    for the matmul that reads it."""
    D = x.shape[-1]
    shifted = torch.cat([x, x[..., :D // 2]], -1).unfold(-1, D, 1)  # [..., D // 2 + 1, D]
    if torch.is_grad_enabled() and x.requires_grad:  # out= is not recorded by autograd
        return (x[..., None, :] * shifted).flatten(-2)
    out = x.new_empty(*x.shape[:-1], D // 2 + 1, D)
    torch.mul(x[..., None, :], shifted, out=out)
    return out.flatten(-2)


def _sym_index(D: int, device: torch.device):
    """For every entry (a, b) of a D x D matrix, its column in the circulant packing of
    `_packed_outer`: row s = (b - a) mod D at column a if s <= D / 2, else row D - s at
    column b. [D * D]."""
    return constant(("sym", D, device), lambda: _build_sym_index(D, device))


def _build_sym_index(D, device):
    a = torch.arange(D, device=device)[:, None]
    b = torch.arange(D, device=device)[None, :]
    s = (b - a) % D
    return torch.where(s <= D // 2, s * D + a, (D - s) * D + b).flatten()


def _unpack(S2p: torch.Tensor, D: int) -> torch.Tensor:
    """The packing of `_packed_outer` [..., (D // 2 + 1) D] -> the symmetric [..., D, D]."""
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

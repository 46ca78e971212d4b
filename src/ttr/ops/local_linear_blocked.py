"""The blocked form of local linear attention (`local_linear_attention(..., form="blocked")`):
FlashAttention-style streaming of the key moments per query block, the per-query solve, and a
backward pass by recomputation (`_BlockedFn`) whose derivation is in its docstring.
"""

from __future__ import annotations

import math

import torch

from ttr.ops.local_linear_moments import _intercept, _moments, _packed_outer, _unpack


def _blocked(q, K, V, Tc, bw, ridge, block_size, recompute):
    """Per query block: the key moments streamed under the row max, then the per-query solve.
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
    # the key blocks' log-weights, taken once for the row max, then their weights once for the
    # moments and the output, and held meanwhile: one thread, T = 1024, D = 64, forward (f+b)
    # CPU time B H = 16 1.30 -> 1.16 s (1.78 -> 1.63), B H = 64 4.99 -> 4.81 s (7.07 -> 6.84)
    # for the log-weights. Keeping the weights too spares the output pass an exp per block pair
    # (forward time unchanged within the noise, 3.76-3.83 against 3.75-4.11 s at B H = 64)
    blocks = list(_key_blocks(qc, K, V, c, pos, bw, block_size))
    mx, acc = _stream_moments(blocks, vk=ridge == 0)
    if ridge == 0:
        return _intercept(*acc, qc, ridge), None
    m0, m1, S2, mv = acc
    inv = (1.0 / m0)[..., None]
    kbar, vbar = m1 * inv, mv * inv  # [BH, Bq, Dk], [BH, Bq, Dv]
    # Eq. 54, A = S2 / m0 - kbar kbar^T + ridge I, formed on the packed products and unpacked
    # once: one pass over the [Bq, Dk, Dk] matrices instead of one per term
    A = _unpack(S2 * inv - _packed_outer(kbar), qc.shape[-1])  # [BH, Bq, Dk, Dk]
    A.diagonal(dim1=-2, dim2=-1).add_(ridge)
    # A is symmetric, so A^T, a column-major view, is A: LAPACK's layout without a transpose
    LU, piv = torch.linalg.lu_factor(A.mT)  # [BH, Bq, Dk, Dk]
    u = torch.linalg.lu_solve(LU, piv, (kbar - qc)[..., None])[..., 0]  # A^-1 dbar [BH, Bq, Dk]
    # lse: log of the normalizer sum_i exp(logw_i), so that p_i = exp(logw_i - lse)
    lse = mx + torch.log(m0)
    # o = vbar - sum_i p_i (ck_i^T u) v_i with p_i = w_i / m0, on the weights of the moments
    ukbar, r = (u * kbar).sum(-1, keepdim=True), 0
    for _s, _e, kc, vb, w in blocks:
        cku = u @ kc.mT - ukbar  # (k_i - kbar)^T u [BH, Bq, Bk]
        r = r + w.mul_(cku) @ vb  # [BH, Bq, Dv]; w is not read again
    o = vbar - r * inv
    return o, ((lse, kbar, vbar, u, LU, piv) if stats else None)


def _stream_moments(blocks, vk):
    """The moments of `_moments` (Mvk only if `vk`) over the visible key blocks (`blocks`, a
    list as `_key_blocks` yields them), weighted by w = exp(logw - max) with the max over all
    of them: (max [BH, Bq], moments). Each block's log-weights are replaced in the list by its
    weights w, which the output pass reads.

    Two passes over the key blocks: the row max of the log-weights first, then the moments under
    that fixed max, accumulated in place by the matmuls (baddbmm_). An online max instead
    rescaled every accumulator, the packed [Bq, (Dk // 2 + 1) Dk] second moments above all, once
    per key block, and summed each block's fresh moments into them: three passes over the largest
    tensor of the forward per block, against a second pass over log-weights that the caller
    now takes once (recomputed, they cost 4 / Dk of the second moments' flops). Measured with the
    packing written in place (`_packed_outer`), one thread, T = 1024, D = 64, ridge 0.1, old and
    new code interleaved in one process while a sweep ran on the other core: forward at
    B H = 16 1.97 -> 1.80 s, at B H = 64 (fig3's batch) 7.2-8.1 -> 6.5-7.4 s."""
    mx = None
    for *_, logw in blocks:
        new = logw.amax(-1)  # [BH, Bq]; the first block has an unmasked key for every query
        mx = new if mx is None else torch.maximum(mx, new)
    acc = None
    for j, (s, e, kc, vb, logw) in enumerate(blocks):
        w = torch.exp(logw - mx[..., None])  # [BH, Bq, Bk]
        acc = _moments(w, kc, vb, vk, acc)
        blocks[j] = (s, e, kc, vb, w)  # the log-weights are not needed again
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
            # the normalized weights p_i of every visible key block, taken once for both passes
            blocks = [(s, e, kc, vb, torch.exp(logw - lse[..., None]))  # p [BH, Bq, Bk]
                      for s, e, kc, vb, logw in _key_blocks(qc, K, V, c, pos, bw, block_size)]
            # h = M1^T g = A^-1 Cov_dv g, with Cov_dv g = sum_i p_i (g^T cv_i) ck_i from one
            # pass over the key blocks (so that M1^T [Dk, Dv] per query is never formed)
            y = psum = 0
            for _s, _e, kc, vb, p in blocks:
                pg = p * (g @ vb.mT - gvbar)  # [BH, Bq, Bk]
                y, psum = y + pg @ kc, psum + pg.sum(-1, keepdim=True)
            h = torch.linalg.lu_solve(LU, piv, (y - psum * kb)[..., None])[..., 0]  # [BH, Bq, Dk]
            mean = ((g * o[:, a:b]).sum(-1) - (h * qc).sum(-1) - ridge * (h * ub).sum(-1))
            ukbar, hkbar = (ub * kb).sum(-1)[..., None], (h * kb).sum(-1)[..., None]
            # phi_i in two products: with z_i = h^T ck_i - g^T cv_i = [h, -g] . [k_i, v_i] -
            # (h^T kbar - g^T vbar) and cku_i = ck_i^T u, phi_i = z_i (cku_i - 1) - (h^T kbar -
            # g^T vbar), so delta_i = z_i beta_i - p_i (h^T kbar - g^T vbar + mean) with
            # beta_i = p_i (cku_i - 1), and alpha_i = p_i z_i: six elementwise passes over
            # [Bq, Bk] per key block instead of fourteen
            hg, zbar = torch.cat([h, -g], -1), hkbar - gvbar  # [BH, Bq, Dk + Dv], [BH, Bq, 1]
            shift = zbar + mean[..., None]
            dqb = h.clone()
            for s, e, kc, vb, p in blocks:
                z = hg @ torch.cat([kc, vb], -1).mT - zbar  # [BH, Bq, Bk]
                beta = (ub @ kc.mT - (ukbar + 1)) * p  # p_i (ck_i^T u - 1) = -a_i
                delta = torch.addcmul(-shift * p, z, beta)  # dL/dl_i
                alpha = p.mul_(z)  # p is not read again
                dK[:, s:e] += (alpha.mT @ ub + beta.mT @ h
                               + (2 / bw) * (delta.mT @ qc - delta.sum(1)[..., None] * kc))
                dV[:, s:e] -= beta.mT @ g  # a_i = -beta_i
                dqb += (2 / bw) * (delta @ kc)
            dq[:, a:b] = dqb
        return dq, dK, dV, None, None, None, None, None

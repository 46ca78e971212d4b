"""The chunkwise (gated) delta rule with its decay factored through the chunk start, as one
autograd function with a written-out backward (the CPU path of `delta_chunk._chunk`).

Same function as docs/delta_rule_chunk.md, Steps 1-5. When every chunk decays by at most
e^-FACTOR_SPAN (always without decay), the decay from token i to token r inside a chunk
factors as Gamma_ri = e^{G_r} e^{-G_i} with both factors within e^{+-FACTOR_SPAN}, so with

    qp = e^G Q,  kp = e^G K,  kn = e^-G K    ([C, Dk] per chunk; without decay qp = Q, kp = kn = K)

every decay-masked product of the chunk form is a plain masked matmul, as in linear
attention's factored form (`linear_chunk._chunk_factored`):

    A    = strictly_lower(diag(beta) kp kn^T)       (Step 2)
    Tc   = (I + A)^{-1} diag(beta),  W = Tc kp,  U = Tc V      (Step 3, the UT transform)
    u_n  = U_n - W_n S_n,  S_{n+1} = e^{G_C} (S_n + kn_n^T u_n)  (Step 4, chunk by chunk)
    O    = qp S_n + tril(qp kn^T) u                  (Step 5)

No [C, C] decay matrix is built or multiplied, and the backward is written out: autograd
through the same steps spent more time on elementwise passes over [C, C] tensors (each
product's two gradients, the decay matrix's) than on its matmuls. With L = dLoss/dS_{n+1}
carried backward through Step 4 (lam), the gradients are, step by step in reverse:

  5. dattn = tril(dO u^T),  du = attn^T dO,  dqp = dattn kn + dO S_n^T,  dkn = dattn^T qp,
     and dO reaches the chunk-start state: dS_n += qp^T dO;
  4. for n = N-1 .. 0, with mu = e^{G_C} lam_{n+1}:  du_n += kn_n mu,
     lam_n = dS_n + mu - W_n^T du_n;  then, for all chunks at once, dkn += u mu^T,
     dW = -du S_n^T, dU = du, and the chunk decay's gradient e^{G_C} d/d(e^{G_C}) =
     <lam_{n+1}, S_{n+1}>;
  3. dTc = dW kp^T + dU V^T,  dkp = Tc^T dW,  dV = Tc^T dU,  dbeta_i = sum_r dTc_ri Linv_ri,
     dA = -strictly_lower(Linv^T (dTc diag(beta)) Linv^T)  (the inverse's gradient);
  2. Z = dA kn:  dbeta_r += <kp_r, Z_r>,  dkp += diag(beta) Z,  dkn += (diag(beta) dA)^T kp;
  1. dq = e^G dqp,  dk = e^G dkp + e^-G dkn,
     dG_r = <dqp_r, qp_r> + <dkp_r, kp_r> - <dkn_r, kn_r> (+ the chunk decay's on r = C),
     dg = the reverse cumsum of dG over the chunk.

The forward is exact to float precision (products of factors each exact to rounding); the
gate gradient goes through differences G_r - G_i whose rounding the FACTOR_SPAN bound keeps
small, as measured for linear attention (`linear_chunk._per_dim_terms`). Under autocast (`half`),
the chunk-local matmuls run in the half dtype; the inverse, Step 4's states and pseudo-values,
beta and the gates stay in float32, as in `delta_chunk._chunk`.
"""

from __future__ import annotations

import torch

from ttr.ops.inverse_cholesky import _forward_lower


def factored_delta_rule(q, k, v, beta, g, s0):
    """q, k [B, H, N, C, Dk] and v [B, H, N, C, Dv] (contiguous, in the matmul dtype), beta
    [B, H, N, C] and g None or [B, H, N, C] (every chunk's sum >= -FACTOR_SPAN) in the compute
    dtype, s0 None or [B, H, Dk, Dv] -> (o [B, H, N, C, Dv] in the matmul dtype, the final
    state [B, H, Dk, Dv] in the compute dtype)."""
    return _FactoredDelta.apply(q, k, v, beta, g, s0)


def _factors(q, k, g):
    """qp, kp, kn and e^G, e^-G ([B, H, N, C, 1], in q's dtype), e^{G_C} [B, H, N] (float)."""
    G = torch.cumsum(g, -1)  # [B, H, N, C], within [-FACTOR_SPAN, 0]
    eG = torch.exp(G)
    enG = torch.reciprocal(eG)  # a division is a fraction of an exp's cost
    e, eG, enG = eG[..., -1], eG.unsqueeze(-1).to(q.dtype), enG.unsqueeze(-1).to(q.dtype)
    return q * eG, k * eG, k * enG, eG, enG, e


class _FactoredDelta(torch.autograd.Function):
    """See the module docstring; the numbered comments are its steps."""

    @staticmethod
    def forward(ctx, q, k, v, beta, g, s0):
        B, H, N, C, Dk = q.shape
        Dv = v.shape[-1]
        md, cd = q.dtype, beta.dtype  # matmul dtype, compute dtype (float32 for half matmuls)
        # 1. the factors
        if g is None:
            qp, kp, kn, eG, enG, e = q, k, k, None, None, None
        else:
            qp, kp, kn, eG, enG, e = _factors(q, k, g)
        qp3, kp3, kn3, v3 = qp.view(-1, C, Dk), kp.view(-1, C, Dk), kn.view(-1, C, Dk), \
            v.view(-1, C, Dv)
        b3 = beta.reshape(-1, C, 1)  # [M, C, 1] (M = B H N chunks)
        # 2.-3. I + A, its inverse, Tc = Linv diag(beta), W and U
        IA = torch.bmm(kp3, kn3.mT).to(cd).mul_(b3).tril_(-1)  # [M, C, C]
        IA.diagonal(dim1=-2, dim2=-1).add_(1.0)
        Linv = _forward_lower(IA)  # [M, C, C]
        Tc = (Linv * b3.mT).to(md)  # column i scaled by beta_i
        W = torch.bmm(Tc, kp3).to(cd)  # [M, C, Dk]
        U = torch.bmm(Tc, v3).to(cd)  # [M, C, Dv]
        # 4. the chunk recurrence (float32 states and pseudo-values), heads as one batch P
        P = B * H
        W4, U4 = W.view(P, N, C, Dk), U.view(P, N, C, Dv)
        knT = kn.to(cd).view(P, N, C, Dk).mT  # [P, N, Dk, C]
        S0 = torch.empty(P, N, Dk, Dv, dtype=cd, device=q.device)  # states entering chunks
        u = torch.empty(P, N, C, Dv, dtype=cd, device=q.device)  # pseudo-values
        S = s0.to(cd).reshape(P, Dk, Dv) if s0 is not None else q.new_zeros(P, Dk, Dv, dtype=cd)
        ec = None if e is None else e.reshape(P, N, 1, 1)
        for n in range(N):
            S0[:, n] = S
            u[:, n] = un = torch.baddbmm(U4[:, n], W4[:, n], S, alpha=-1)
            S = torch.baddbmm(S, knT[:, n], un)
            if ec is not None:
                S = S * ec[:, n]
        # 5. outputs
        attn = torch.bmm(qp3, kn3.mT).tril_()  # [M, C, C]
        S0m, um = S0.to(md).view(-1, Dk, Dv), u.to(md).view(-1, C, Dv)
        o = torch.bmm(attn, um).baddbmm_(qp3, S0m)  # [M, C, Dv]
        ctx.save_for_backward(qp, kp, kn, v, beta, Linv, Tc, W, S0, u, attn, S,
                              *(() if g is None else (eG, enG, e)))
        ctx.has_s0 = s0 is not None
        return o.view(B, H, N, C, Dv), S.view(B, H, Dk, Dv)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, dS):
        qp, kp, kn, v, beta, Linv, Tc, W, S0, u, attn, S_end, *decay = ctx.saved_tensors
        B, H, N, C, Dk = qp.shape
        Dv = v.shape[-1]
        md, cd = qp.dtype, beta.dtype
        qp3, kp3, kn3, v3 = (x.view(-1, C, x.shape[-1]) for x in (qp, kp, kn, v))
        do3 = do.to(md).reshape(-1, C, Dv).contiguous()  # not broadcast: see _FactoredChunk
        um, S0m = u.to(md).view(-1, C, Dv), S0.to(md).view(-1, Dk, Dv)
        # 5. through the outputs
        dattn = torch.bmm(do3, um.mT).tril_()  # [M, C, C]
        du = torch.bmm(attn.mT, do3).to(cd)  # [M, C, Dv]
        dqp = torch.bmm(dattn, kn3).baddbmm_(do3, S0m.mT)  # [M, C, Dk]
        dkn = torch.bmm(dattn.mT, qp3)  # [M, C, Dk]
        dS0 = torch.bmm(qp3.mT, do3).to(cd)  # [M, Dk, Dv]
        # 4. the chunk recurrence backward: lam carries dLoss/dS from the end to the start
        P = B * H
        e = decay[2].reshape(P, N, 1, 1) if decay else None
        kn_c = kn.to(cd)  # [B, H, N, C, Dk]
        kn4, W4, du4 = (x.view(P, N, C, -1) for x in (kn_c, W, du))
        dS04 = dS0.view(P, N, Dk, Dv)
        lam = dS.to(cd).reshape(P, Dk, Dv)
        lam_next = torch.empty_like(S0)  # [P, N, Dk, Dv]: lam_{n+1} for every chunk n
        for n in range(N - 1, -1, -1):
            lam_next[:, n] = lam
            mu = lam if e is None else lam * e[:, n]
            # du_n += kn_n mu, out of place: an in-place baddbmm_ on the strided slice ran one
            # addmm_ per matrix
            du4[:, n] = dun = torch.baddbmm(du4[:, n], kn4[:, n], mu)
            lam = torch.baddbmm(dS04[:, n] + mu, W4[:, n].mT, dun, alpha=-1)
        ds0 = lam.view(B, H, Dk, Dv) if ctx.has_s0 else None
        mu_all = lam_next if e is None else lam_next * e  # [P, N, Dk, Dv]
        dkn = dkn.to(cd).baddbmm_(u.view(-1, C, Dv), mu_all.view(-1, Dk, Dv).mT)
        du3 = du.view(-1, C, Dv)
        dW = torch.bmm(du3, S0.view(-1, Dk, Dv).mT).neg_()  # [M, C, Dk]
        # 3. through W = Tc kp, U = Tc V, Tc = Linv diag(beta), Linv = (I + A)^-1
        dWm, dUm = dW.to(md), du3.to(md)
        dTc = torch.bmm(dWm, kp3.mT).baddbmm_(dUm, v3.mT).to(cd)  # [M, C, C]
        dkp = torch.bmm(Tc.mT, dWm).to(cd)  # [M, C, Dk]
        dv = torch.bmm(Tc.mT, dUm)  # [M, C, Dv]
        b3 = beta.reshape(-1, C, 1)
        dbeta = (dTc * Linv).sum(-2)  # [M, C]: column sums
        dA = torch.bmm(torch.bmm(Linv.mT, dTc.mul_(b3.mT)), Linv.mT).tril_(-1).neg_()
        # 2. through A = strictly_lower(diag(beta) kp kn^T)
        Z = torch.bmm(dA, kn_c.view(-1, C, Dk))  # [M, C, Dk]
        kp_c = kp3.to(cd)
        dbeta += (kp_c * Z).sum(-1)
        dkp.addcmul_(b3, Z)
        dkn.baddbmm_(dA.mul_(b3).mT, kp_c)
        # 1. through the factors
        dg = None
        dqp = dqp.to(cd)
        if decay:
            eG, enG, _ = decay
            shape = (B, H, N, C, Dk)
            dqp, dkp, dkn = dqp.view(shape), dkp.view(shape), dkn.view(shape)
            dG = ((dqp * qp.to(cd)).sum(-1) + (dkp * kp_c.view(shape)).sum(-1)
                  - (dkn * kn_c).sum(-1))  # [B, H, N, C]
            # the chunk decay e^{G_C}: its gradient times itself is <lam_{n+1}, S_{n+1}>
            S_next = torch.cat([S0[:, 1:], S_end.unsqueeze(1)], 1)  # [P, N, Dk, Dv]
            dG[..., C - 1] += (lam_next * S_next).sum((-2, -1)).view(B, H, N)
            dg = dG.flip(-1).cumsum(-1).flip(-1)
            dq, dk = dqp * eG, dkp * eG + dkn * enG
        else:
            dq, dk = dqp, dkp + dkn
        shape_k = (B, H, N, C, Dk)
        return (dq.view(shape_k), dk.view(shape_k), dv.view(B, H, N, C, Dv),
                dbeta.view(B, H, N, C), dg, ds0)

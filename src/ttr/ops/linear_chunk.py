"""The chunk form of linear attention (`linear_attention(..., form="chunk")`), on validated
inputs: split T into chunks of C steps, compute every chunk's masked quadratic form and its
contribution to the state at once with batched matmuls, and pass the states from chunk to chunk
(as in GLA and Mamba-2's SSD). O(T C) memory. Derivation: docs/linear_chunk.md.

The intra-chunk decay factors are exact segment sums: for scalar decay one matmul with a 0/1
operator (`decay.decay_matrix`), per key dimension an exact split of each chunk in halves
(`linear_per_dim.intra_chunk_per_dim`). Every exponent is a sum of gates over its own segment,
so nothing overflows and gradients stay exact. Chunks that decay mildly (by at most
e^-FACTOR_SPAN) take the cheaper factorization through the chunk start instead, whose gradient
error is bounded there: per dimension chunk by chunk (`_per_dim_terms`), for scalar decay when
every chunk is mild. The chunk states pass by a scan on the CPU, by matmuls elsewhere
(`_pass_states`). Without decay, and with a decay factored in every chunk, on the CPU, the whole
form is one function with a written-out backward (`_chunk_factored`, `_FactoredChunk`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ttr.ops.common import _is_compiling, compute_dtype, contiguous_as
from ttr.ops.decay import decay_exp, decay_matrix, must_flush, sums_after
from ttr.ops.linear_per_dim import cumsum_tri, intra_chunk_per_dim


def chunk_linear_attention(q, k, v, g, s0, C, half=None):
    """Chunkwise form, on validated inputs in their own dtype (other ops build on it).

    q, k [B, T, H, Dk], v [B, T, H, Dv], g None / [B, T, H] / [B, T, H, Dk], s0 None or
    [B, H, Dk, Dv]; returns o [B, T, H, Dv] and the final state [B, H, Dk, Dv].

    half: None, or a half dtype for the matmuls: q, k, v are cast to it in the chunking copy;
    g and s0 must then be float32, which the decay factors (cast after the exp) and the chunk
    states (each chunk's K^T V upcast before they are summed) stay in. o is returned in `half`
    and the final state in float32.

    Split T into n chunks of C steps; the last one is zero-padded (k = 0 adds nothing and g = 0
    decays nothing, so padding changes neither the outputs nor the final state).

    With b_t the cumulative log-decay since the chunk start and S_0 the state entering the chunk,
        o_t = (q_t * exp(b_t))^T S_0  +  sum_{i<=t in chunk} [sum_d q_td k_id exp(b_td - b_id)] v_i
        S_C = diag(exp(b_C)) S_0  +  sum_{i in chunk} diag(exp(b_C - b_i)) k_i v_i^T.
    """
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    n = -(-T // C)
    pad = n * C - T
    per_dim = g is not None and g.ndim == 4

    def chunks(x, dtype=None):  # [B, T, H, ...] -> [B, H, n, C, ...], contiguous
        # One transposing copy up front (casting too, for half matmuls): the matmuls below then
        # see contiguous [C, D] blocks whose batch dims (B, H, n) collapse into one, instead of
        # copying inside every matmul.
        x = x.transpose(1, 2)
        if pad:
            x = F.pad(x, (0, 0) * (x.ndim - 3) + (0, pad))
        return contiguous_as(x, dtype).reshape(B, H, n, C, *x.shape[3:])

    q, k, v = chunks(q, half), chunks(k, half), chunks(v, half)  # [B, H, n, C, D]
    if g is None:
        return _chunk_factored(q, k, v, None, s0, T)
    if not per_dim:
        return _chunk_scalar_decay(q, k, v, chunks(g), s0, T)

    gc = chunks(g)  # [B, H, n, C, Dk]
    if not _is_compiling() and bool(gc.sum(-2).amin() >= -FACTOR_SPAN):
        # every chunk mild: the decay factored into q and k (`_chunk_factored`)
        return _chunk_factored(q, k, v, gc, s0, T)
    # 1. cumulative log-decay within each chunk, relative to the chunk start (<= 0)
    b = cumsum_tri(gc, 0, reverse=False)  # [B, H, n, C, Dk]
    a = b[..., -1:, :]  # [B, H, n, 1, Dk] the chunks' total log-decays
    # every exponent below is a partial sum within a chunk, so >= the chunk's total
    flush = must_flush(a)
    qe = q * decay_exp(b, flush).to(q.dtype)  # [B, H, n, C, Dk] queries decayed from start

    # 2. intra-chunk scores and what each chunk adds to the state, decayed to the chunk end
    A, U = _per_dim_terms(q, k, v, gc, b, a, qe, flush)  # [.., C, C], [B, H, n, Dk, Dv]
    o = A @ v  # [B, H, n, C, Dv] intra-chunk outputs

    # 3. state passing: S entering chunk c+1 = diag(exp(b_C)) S entering chunk c + U_c
    S0, S = _pass_states(U.to(gc.dtype), a.squeeze(-2), s0)

    # 4. inter-chunk outputs: queries read the entering state, decayed from the chunk start
    o = o + qe @ S0.to(q.dtype)
    o = o.reshape(B, H, n * C, Dv)[:, :, :T].transpose(1, 2)  # [B, T, H, Dv], a view
    return o, S


def _chunk_scalar_decay(q, k, v, g, s0, T):
    """`chunk_linear_attention` with one log-decay per head, q, k, v chunked [B, H, n, C, D],
    g [B, H, n, C]. Every decay factor is a column or a row of the chunk's decay matrix
    D[t, i] = exp(g_{i+1} + ... + g_t) or exp of an inclusive cumsum, so every exponent is a sum
    over its own segment (exact gradients under any decay, see segment_sums). When every chunk
    decays by at most e^-FACTOR_SPAN, the decay is factored into the queries and keys instead
    (`_chunk_factored`)."""
    B, H, n, C, Dv = v.shape
    a = g.sum(-1)  # [B, H, n] the chunks' total log-decays, a bound on every exponent below
    if not _is_compiling() and bool(a.amin() >= -FACTOR_SPAN):
        return _chunk_factored(q, k, v, g, s0, T)
    flush = must_flush(a)
    D = decay_matrix(g, flush).to(q.dtype)  # [B, H, n, C, C] (cast for half matmuls)
    o = ((q @ k.mT) * D) @ v  # [B, H, n, C, Dv] intra-chunk
    # the decay from each step to the chunk end, exp(sum_{i<j<=C-1} g_j) (D's last row, but
    # taken from D its backward zero-fills and adds a full [C, C] gradient: ~3 ms at T = 2048)
    end = decay_exp(sums_after(g, per_dim=False), flush).to(q.dtype)  # [B, H, n, C]
    U = (k * end.unsqueeze(-1)).mT @ v  # [B, H, n, Dk, Dv]
    S0, S = _pass_states(U.to(g.dtype), a, s0)
    # inter-chunk: queries, decayed from the chunk start through t, read the entering state
    # (addcmul scales and adds in one pass)
    e = decay_exp(torch.cumsum(g, -1), flush)  # [B, H, n, C]
    o = torch.addcmul(o, e.to(q.dtype).unsqueeze(-1), q @ S0.to(q.dtype))
    return o.reshape(B, H, n * C, Dv)[:, :, :T].transpose(1, 2), S


def _pass_states(U: torch.Tensor, a: torch.Tensor | None, s0):
    """States entering each chunk, S0_{c+1} = diag(exp(a_c)) S0_c + U_c with S0_0 = s0 (or 0):
    U [B, H, n, Dk, Dv] the chunks' own contributions, a the chunks' total log-decays, None (no
    decay: exclusive prefix sums), [B, H, n] (scalar) or [B, H, n, Dk] (per key dimension).
    Returns S0 [B, H, n, Dk, Dv] and the state after the last chunk [B, H, Dk, Dv].

    Two algorithms for the one recurrence, both exact (they add the same decayed terms):
    - on a CPU, eager: a scan, chunk by chunk, with a written-out backward (`_StateScan`):
      n fused multiply-adds on [B, H, Dk, Dv] each way;
    - when compiling, and on other devices: the recurrence unrolled into one decay-matrix
      matmul per group of STATE_GROUP chunks (`_pass_states_matmul`), which a GPU runs as a
      few large kernels instead of n dependent small ones, and which torch.compile does not
      unroll into n steps.
    Measured on the CPU (16 heads, Dk = Dv = 64, forward + backward, session 10), scan against
    matmul: scalar decay 3.3 against 5.4 ms at n = 32 chunks and 18 against 38 ms at n = 128;
    per key dimension, where the matmul needs a decay matrix per state row and transposed
    copies in and out, 3.9 against 11.0 ms at n = 32. (torch.cumsum along the chunk axis, for
    no decay, and an autograd-recorded loop were slower than either.)"""
    if U.device.type != "cpu" or _is_compiling():
        zero = U.new_zeros(U.shape[:3])  # [B, H, n]: no decay is log-decay 0
        return _pass_states_matmul(U, zero if a is None else a, s0)
    e = None  # the decay over each chunk, broadcast against the states
    if a is not None:  # per key dimension [B, H, n, Dk, 1], scalar [B, H, n, 1, 1]
        e = decay_exp(a)[..., None] if a.ndim == 4 else decay_exp(a)[..., None, None]
    return _StateScan.apply(U, e, s0)


STATE_GROUP = 32  # chunks per matmul in _pass_states_matmul


def _pass_states_matmul(U: torch.Tensor, a: torch.Tensor, s0):
    """`_pass_states` as matmuls, a [B, H, n] or [B, H, n, Dk]. Unrolled, S0_c = sum_{p <= c}
    exp(a'_{p+1} + ... + a'_c) U'_p with U'_0 = s0, U'_p = U_{p-1} and a'_p = a_{p-1}: one
    decay matrix (decay_matrix, over chunks instead of steps) times the stacked contributions.
    In groups of STATE_GROUP chunks, each group's incoming state being its U'_0, so the cost
    stays linear in n. Per key dimension, each row of the state is its own chain: the decay
    matrix gets a Dk axis."""
    B, H, n, Dk, Dv = U.shape
    per_dim = a.ndim == 4
    if per_dim:  # [B, H, Dk, n, Dv] chains, one per key dimension
        X, a = U.transpose(2, 3), a.transpose(2, 3)  # a: [B, H, Dk, n]
        carry = None if s0 is None else s0.unsqueeze(3)  # [B, H, Dk, 1, Dv]
    else:  # one chain over whole flattened states
        X, a = U.reshape(B, H, 1, n, Dk * Dv), a.unsqueeze(2)  # a: [B, H, 1, n]
        carry = None if s0 is None else s0.reshape(B, H, 1, 1, Dk * Dv)
    starts = []
    for Ug, ag in zip(X.split(STATE_GROUP, 3), a.split(STATE_GROUP, 3), strict=True):
        # [.., m+1, m+1], position 0 the carry; always flushed: its exponents span many chunks
        D = decay_matrix(F.pad(ag, (1, 0)))
        S0g = D[..., :-1, 1:] @ Ug  # [.., m, width] the states entering the group's chunks
        if carry is not None:
            S0g = torch.addcmul(S0g, D[..., :-1, :1], carry)
        starts.append(S0g)
        # the state leaving the group: one more step from its last chunk (D[m, m-1] = e^{a_m})
        carry = torch.addcmul(Ug[..., -1:, :], D[..., -1:, -2:-1], S0g[..., -1:, :])
    S0 = starts[0] if len(starts) == 1 else torch.cat(starts, dim=3)  # [B, H, Dk|1, n, width]
    if per_dim:
        return S0.transpose(2, 3), carry.squeeze(3)  # [B, H, n, Dk, Dv], [B, H, Dk, Dv]
    return S0.reshape(B, H, n, Dk, Dv), carry.reshape(B, H, Dk, Dv)


class _StateScan(torch.autograd.Function):
    """S0_0 = s0 (or 0), S0_{c+1} = e_c * S0_c + U_c over the n chunks: U [B, H, n, Dk, Dv],
    e None (no decay) or [B, H, n, Dk | 1, 1] (the decay over chunk c, <= 1, per key dimension
    or per head) -> (S0 [B, H, n, Dk, Dv], the state after the last chunk [B, H, Dk, Dv]).

    Backward, with lambda_c = dL/dS0_c in total (through every later state) and lambda_n the
    final state's gradient: lambda_c = dS0_c + e_c * lambda_{c+1}, so dU_c = lambda_{c+1},
    de_c = sum lambda_{c+1} * S0_c over the axes e broadcasts along (one reduction over all
    chunks after the loop) and ds0 = lambda_0. Both loops only multiply by decays <= 1, as the
    recurrence does: nothing overflows at any T."""

    @staticmethod
    def forward(ctx, U, e, s0):
        S0, S = _scan(U, e, s0)
        ctx.save_for_backward(e, S0)
        ctx.has_s0 = s0 is not None
        return S0, S

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dS0, dS):
        e, S0 = ctx.saved_tensors
        dU, lam = _scan_back(dS0, dS, e)
        de = None
        if e is not None and ctx.needs_input_grad[1]:
            de = dU * S0  # [B, H, n, Dk, Dv], summed to e's shape
            de = de.sum(-1, keepdim=True) if e.shape[-2] > 1 else de.sum((-2, -1), keepdim=True)
        return dU, de, (lam if ctx.has_s0 else None)


def _scan(U, e, s0):
    """The forward loop of `_StateScan` (no autograd): S0 [B, H, n, Dk, Dv] and the final state.
    Each step writes into its slot of S0 (out=): no temporary per chunk (1.17 -> 0.86 ms for
    n = 32, 16 heads, 64 x 64 states)."""
    n = U.shape[2]
    S0 = torch.empty_like(U)
    if s0 is None:
        S0[:, :, 0] = 0
    else:
        S0[:, :, 0] = s0
    for c in range(n):
        out = S0[:, :, c + 1] if c + 1 < n else None
        if e is None:
            S = torch.add(U[:, :, c], S0[:, :, c], out=out)
        else:
            S = torch.addcmul(U[:, :, c], e[:, :, c], S0[:, :, c], out=out)
    return S0, S


def _scan_back(dS0, dS, e):
    """The backward loop of `_StateScan`: dU [B, H, n, Dk, Dv] and lambda_0 (the gradient of
    s0). dU_{n-1} = lambda_n = dS and dU_{c-1} = lambda_c = dS0_c + e_c dU_c, written in place."""
    n = dS0.shape[2]
    dU = torch.empty_like(dS0)
    dU[:, :, n - 1] = dS
    for c in range(n - 1, -1, -1):
        out = dU[:, :, c - 1] if c > 0 else None
        if e is None:
            lam = torch.add(dS0[:, :, c], dU[:, :, c], out=out)
        else:
            lam = torch.addcmul(dS0[:, :, c], e[:, :, c], dU[:, :, c], out=out)
    return dU, lam


def _chunk_factored(q, k, v, g, s0, T):
    """`chunk_linear_attention` without decay (g None), or with a decay factored through the
    chunk start when every chunk decays by at most e^-FACTOR_SPAN (g [B, H, n, C] scalar or
    [B, H, n, C, Dk] per key dimension); q, k, v chunked [B, H, n, C, D].

    With b the inclusive cumsum of g in the chunk and a = b_C the chunk's total, the decay from
    step i to step t is exp(b_t - b_i) = e^{b_t} e^{-b_i} and from step i to the chunk end
    e^{a - b_i} = e^a e^{-b_i}, every factor within e^{+-FACTOR_SPAN}. So with qe = q e^b and
    ke = k e^-b (q and k without decay) everything is the no-decay form with each chunk's state
    scaled by e^a on the way out:
        A = tril(qe ke^T),  U = ke^T V,  S0_{c+1} = e^{a_c} (S0_c + U_c),  o = A V + qe S0.
    No [C, C] decay matrix is built or multiplied. The forward is exact to float precision
    (products of factors each exact to rounding; nothing cancels); the gate gradient goes through
    the differences b_t - b_i, whose rounding the FACTOR_SPAN bound keeps small (see
    `_per_dim_terms`, which applies the same factorization chunk by chunk). On the CPU, eager,
    all of it is one function, `_FactoredChunk`; elsewhere autograd records the same terms."""
    B, H, n, C, Dv = v.shape
    sd = compute_dtype(q) if s0 is None else s0.dtype  # float32 states for half matmuls
    if q.device.type == "cpu" and not _is_compiling():
        o, S = _FactoredChunk.apply(q, k, v, g, s0, sd)
    else:
        qe, ke, _, _, a = (q, k, None, None, None) if g is None else _factor(q, k, g)
        o = (qe @ ke.mT).tril_() @ v  # [B, H, n, C, Dv] intra-chunk (tril_ is safe: matmul's
        # backward needs qe and ke, not its output)
        U = (ke.mT @ v).to(sd)  # [B, H, n, Dk, Dv]
        if a is not None:
            U = U * _chunk_decay(a, sd)
        S0, S = _pass_states(U, None if a is None else a.to(sd), s0)  # entering states
        o = o + qe @ S0.to(q.dtype)
    return o.reshape(B, H, n * C, Dv)[:, :, :T].transpose(1, 2), S


def _factor(q, k, g):
    """q e^b, k e^-b, e^b, e^-b (in q's dtype; [B, H, n, C, Dk | 1]) and a, the chunks' total
    log-decays ([B, H, n, Dk] or [B, H, n]), for `_chunk_factored`."""
    per_dim = g.ndim == q.ndim
    b = cumsum_tri(g, 0, reverse=False) if per_dim else torch.cumsum(g, -1).unsqueeze(-1)
    a = b[..., -1, :] if per_dim else b[..., -1, 0]
    eb = torch.exp(b)  # within [e^-FACTOR_SPAN, 1]
    # e^-b as 1 / e^b: a division costs a fraction of an exp (0.4 against 2.8-3.3 ms on
    # [1, 16, 32, 64, 64] here) and adds half an ulp
    enb = torch.reciprocal(eb).to(k.dtype)
    eb = eb.to(q.dtype)
    return q * eb, k * enb, eb, enb, a


def _chunk_decay(a, sd):
    """e^a broadcast against the states [B, H, n, Dk, Dv]: [B, H, n, Dk | 1, 1], in sd."""
    e = torch.exp(a).to(sd).unsqueeze(-1)
    return e if a.ndim == 4 else e.unsqueeze(-1)


class _FactoredChunk(torch.autograd.Function):
    """`_chunk_factored` on the CPU, eager, as one function with a written-out backward:
    q, k [B, H, n, C, Dk], v [B, H, n, C, Dv] (contiguous), g None, [B, H, n, C] or
    [B, H, n, C, Dk] (every chunk mild), s0 None or [B, H, Dk, Dv] in the state dtype sd ->
    (o [B, H, n, C, Dv], the final state [B, H, Dk, Dv]).

    With dO and dS the gradients of o and of the final state, e = e^a the chunk decays, and
    L_c = dL/dS0_{c+1} from the scan's backward of dS0 = qe^T dO (`_scan_back`, which also
    gives ds0):
        dA = tril(dO V^T),  dqe = dA ke + dO S0^T,  dU = e L,  dke = dA^T qe + V dU^T,
        dV = A^T dO + ke dU,  de_c = sum(L_c * (S0_c + U_c)),
    then through the factors: dq = dqe e^b, dk = dke e^-b, db = dqe * qe - dke * ke (summed
    over Dk for a scalar decay) plus de e^a on the chunk's last step, and dg = the reverse
    inclusive cumsum of db. Each gradient's second matmul term is accumulated into its first by
    the matmul itself (baddbmm, beta = 1), as is o's. Through autograd the same terms took a
    separate pass for every sum, product, exp and the tril's gradient, and contiguous copies in
    the state scan: without decay (T = 2048, 16 heads, an AVX2 EPYC) forward 26.8 -> 24.8 ms,
    forward + backward 83.5 -> 68.7 ms. The states (sd, float32 for half matmuls) are cast to
    q's dtype for the matmuls that read them; the gate gradient is summed in g's dtype."""

    @staticmethod
    def forward(ctx, q, k, v, g, s0, sd):
        B, H, n, C, Dk = q.shape
        Dv = v.shape[-1]
        e = eb = enb = None
        if g is not None:
            q, k, eb, enb, a = _factor(q, k, g)  # from here on q, k are qe, ke
            e = _chunk_decay(a, sd)  # [B, H, n, Dk | 1, 1]
        q3, k3, v3 = q.view(-1, C, Dk), k.view(-1, C, Dk), v.view(-1, C, Dv)
        A = torch.bmm(q3, k3.mT).tril_()  # [B H n, C, C]
        U = torch.bmm(k3.mT, v3).view(B, H, n, Dk, Dv).to(sd)
        S0, S = _scan(U if e is None else U * e, e, s0)  # entering states, the final state
        S0q = S0.to(q.dtype).view(-1, Dk, Dv)
        o = torch.bmm(A, v3).baddbmm_(q3, S0q)  # [B H n, C, Dv]
        # with decay the gate's gradient reads the factors and the states in their own dtype
        ctx.save_for_backward(q, k, v, A, S0q, *((e, eb, enb, S0, U) if g is not None else ()))
        ctx.has_s0, ctx.g_dtype = s0 is not None, None if g is None else g.dtype
        return o.view(B, H, n, C, Dv), S

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, dS):
        q, k, v, A, S0q, *decay = ctx.saved_tensors  # q, k: qe, ke with decay
        B, H, n, C, Dk = q.shape
        Dv = v.shape[-1]
        e = decay[0] if decay else None
        q3, k3, v3 = q.view(-1, C, Dk), k.view(-1, C, Dk), v.view(-1, C, Dv)
        # contiguous: the gradient of o.sum() arrives broadcast (stride 0), which the reshape
        # keeps as a view and on which every bmm below falls back to a loop of one matmul and
        # copy per chunk (forward + backward at T = 2048, 16 heads: 49 -> 32 ms)
        do3 = do.to(q.dtype).reshape(-1, C, Dv).contiguous()
        dA = torch.bmm(do3, v3.mT).tril_()  # [B H n, C, C]
        dq = torch.bmm(dA, k3).baddbmm_(do3, S0q.mT).view(q.shape)
        dS0 = torch.bmm(q3.mT, do3).view(B, H, n, Dk, Dv).to(dS.dtype)
        L, ds0 = _scan_back(dS0, dS, e)  # L_c = dL/dS0_{c+1}
        dU3 = (L if e is None else L * e).to(q.dtype).view(-1, Dk, Dv)
        dk = torch.bmm(dA.mT, q3).baddbmm_(v3, dU3.mT).view(k.shape)
        dv = torch.bmm(A.mT, do3).baddbmm_(k3, dU3).view(v.shape)
        dg = None
        if decay:
            _, eb, enb, S0, U = decay
            if ctx.needs_input_grad[3]:
                gd = ctx.g_dtype
                db = (dq * q).to(gd) - (dk * k).to(gd)  # [B, H, n, C, Dk]
                de = ((S0 + U) * L).sum(-1)  # [B, H, n, Dk]
                ea = e.squeeze(-1)  # [B, H, n, Dk | 1]
                per_dim = eb.shape[-1] > 1
                if not per_dim:
                    db, de, ea = db.sum(-1), de.sum(-1), ea.squeeze(-1)  # [B, H, n, C], [B, H, n]
                # a = b_C: d/da through e^a lands on the chunk's last step
                db.select(-2 if per_dim else -1, C - 1).add_((de * ea).to(gd))
                dg = (cumsum_tri(db, 0, reverse=True) if per_dim
                      else db.flip(-1).cumsum(-1).flip(-1))
            dq, dk = dq * eb, dk * enb
        return dq, dk, dv, dg, (ds0 if ctx.has_s0 else None), None


FACTOR_SPAN = 5.0  # chunks decaying by at most e^-5 in every key dimension take the factored terms


def _per_dim_terms(q, k, v, g, b, a, qe, flush):
    """The chunk terms of per-dimension decay: intra-chunk scores A[t, i] = sum_d q_td k_id
    exp(sum_{i<j<=t} g_jd) (lower-triangular) and each chunk's update of the state
    U = sum_i diag(exp(sum_{j>i} g_j)) k_i v_i^T. q, k, g, b (inclusive cumsum of g in the
    chunk), qe = q * exp(b): [B, H, n, C, Dk], v [B, H, n, C, Dv], a the chunks' total
    log-decays (b's last row) [B, H, n, 1, Dk] -> A [B, H, n, C, C], U [B, H, n, Dk, Dv].

    Factored through the chunk start: exp(b_t - b_i) = exp(b_t) exp(-b_i), so with ke = k e^-b,
    A = tril(qe ke^T), one matmul as without decay (qe is shared with the inter-chunk term), and
    U = (ke e^a)^T V. The forward is exact to float precision (each term is a product of factors
    that are each exact to rounding; nothing cancels). Its two costs grow with the chunk's
    decay: e^-b reaches e^-a and overflows past e^88, and the gradient w.r.t. g goes through the
    differences b_t - b_i, whose rounding noise, eps times the scores of the pairs after g_j,
    swamps the true gradient when those are e^a larger (see `segment_sums`). So the
    factorization is used per chunk, only where every key dimension decays by at most
    FACTOR_SPAN in the chunk. Measured in float32 against the float64 recurrence (C = 64): dL/dg
    to 2e-7 - 1e-6 relative RMSE for chunk decays e^-1 to e^-4.9 (exact segment sums: 2e-7); the
    worst case, one gate of -4.9 in a chunk, gets its own gradient to 4e-4 relative (exact:
    4e-6). That span covers typical trained gates (GLA's logsigmoid(x)/16 at x ~ N(0, 1): chunk
    decays down to e^-4.5).

    The other chunks get `_exact_terms` (segment sums only), gathered, and written back in place
    of their factored terms (computed on clamped exponents, so finite, and given zero gradient by
    the overwrite). Under torch.compile, which cannot branch on data, every chunk is exact.
    """
    if _is_compiling():
        return _exact_terms(q, k, v, g, flush)
    B, H, n, C, Dk = q.shape
    Dv = v.shape[-1]
    strong = (a.amin(-1) < -FACTOR_SPAN).flatten().nonzero().squeeze(1)  # chunk ids in B H n
    if strong.numel() == B * H * n:
        return _exact_terms(q, k, v, g, flush)
    nb = -b if strong.numel() == 0 else (-b).clamp(max=FACTOR_SPAN)  # finite for strong chunks
    ke = k * torch.exp(nb).to(k.dtype)  # [B, H, n, C, Dk]
    A = (qe @ ke.mT).tril_()  # (matmul's backward needs its inputs, not its output: tril_ is safe)
    U = (ke * decay_exp(a, flush).to(k.dtype)).mT @ v
    if strong.numel() == 0:
        return A, U
    picked = (x.reshape(B * H * n, C, x.shape[-1]).index_select(0, strong) for x in (q, k, v, g))
    A_s, U_s = _exact_terms(*picked, flush)  # [m, C, C], [m, Dk, Dv]
    A = A.reshape(-1, C, C).index_put((strong,), A_s).view(A.shape)
    U = U.reshape(-1, Dk, Dv).index_put((strong,), U_s).view(U.shape)
    return A, U


def _exact_terms(q, k, v, g, flush):
    """`_per_dim_terms` from segment sums only, exact under any decay: the split in halves for
    A, a reverse exclusive cumsum (sum_{j > i} g_j, not b_C - b_i) for U's decays."""
    A = intra_chunk_per_dim(q, k, g, flush)
    to_end = cumsum_tri(g, -1, reverse=True)  # [.., C, Dk]
    return A, (k * decay_exp(to_end, flush).to(k.dtype)).mT @ v

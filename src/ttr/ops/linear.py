"""Linear attention = one step of gradient descent from zero on (decayed) least squares.

Objective (paper Eq. 14 with the linear class, Eq. 10): at every step t fit M to the pairs seen,

    L_t(M) = 1/2 sum_{i<=t} gamma_i^(t) ||v_i - M k_i||^2,  gamma_i^(t) = prod_{j=i+1}^t exp(g_j),

and take ONE gradient step of unit size from M = 0 (Eq. 24): M_t = sum_i gamma_i^(t) v_i k_i^T.
In the op layout S = M^T ([Dk, Dv]) this is the recurrence of gated linear attention (Eq. 2, 4, 16)

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,      o_t = S_t^T q_t,

with `g` None (no decay, Eq. 2), a scalar per head `[B, T, H]` (RetNet / Mamba-2 style, Eq. 4) or
one log-decay per key dimension `[B, T, H, Dk]` (GLA style: it decays the Dk rows of S).

Forms
  recurrent  the loop above, token by token (the spec).
  parallel   o = (Q K^T * Dec) V with Dec[t, i] = exp(G_t - G_i) for i <= t, G = cumsum(g):
             O(T^2) memory (O(T^2 Dk) for per-dimension decay).
  chunk      intra-chunk masked quadratic form + a recurrence over chunk states (as in GLA and
             Mamba-2's SSD). O(T C) memory.

Numerics: every decay factor is evaluated as exp(a - b) with a <= b, i.e. exp of a non-positive
number (masked entries become exp(-inf) = 0 before the exp, never after, so gradients stay finite).
A decay that underflows to 0 is the correct value to float precision, so there is no limit on T or
on how strong the decay is (g = -20 per step is fine); the parallel form accumulates G over the
whole sequence and so loses float32 resolution for very long T, the chunk form only within a chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ttr.ops.common import (
    check_cu_seqlens,
    check_finite,
    check_form,
    check_log_decay,
    check_qkv,
    check_state,
    check_tensor,
    scan,
    varlen,
)

FORMS = ("recurrent", "parallel", "chunk")
SUB_CHUNK = 16  # secondary chunk for per-dimension decay (see _intra_chunk_per_dim)


# -- small helpers shared by the op families (delta, rls and local import them) -------------------

def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Accumulate in float32 for half-precision inputs; keep float32 / float64 as is."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def check_chunk_size(chunk_size) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int, got {chunk_size!r}")
    return chunk_size


def check_step_qkv(q_t, k_t, v_t) -> tuple[int, int, int, int]:
    """Validate one decoding step `q_t, k_t: [B, H, Dk]`, `v_t: [B, H, Dv]`; return B, H, Dk, Dv."""
    for name, x in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t)):
        check_tensor(name, x, 3)
    if k_t.shape != q_t.shape:
        raise ValueError(f"k_t: expected shape {tuple(q_t.shape)} (that of q_t, [B, H, Dk]), "
                         f"got {tuple(k_t.shape)}")
    if v_t.shape[:2] != q_t.shape[:2]:
        raise ValueError(f"v_t: expected shape [B, H, Dv] = [{q_t.shape[0]}, {q_t.shape[1]}, Dv], "
                         f"got {tuple(v_t.shape)}")
    for name, x in (("k_t", k_t), ("v_t", v_t)):
        if x.dtype != q_t.dtype:
            raise TypeError(f"{name}: expected dtype {q_t.dtype} (that of q_t), got {x.dtype}")
        if x.device != q_t.device:
            raise ValueError(f"{name}: expected device {q_t.device} (that of q_t), got {x.device}")
    for name, x in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t)):
        check_finite(name, x)
    B, H, Dk = q_t.shape
    return B, H, Dk, v_t.shape[-1]


def check_step_decay(g_t, q_t: torch.Tensor, per_dim_ok: bool = True):
    """`g_t` is None, `[B, H]` or (if allowed) `[B, H, Dk]`, finite and <= 0."""
    if g_t is None:
        return None
    check_tensor("g_t", g_t)
    B, H, Dk = q_t.shape
    shapes = [(B, H)] + ([(B, H, Dk)] if per_dim_ok else [])
    if tuple(g_t.shape) not in shapes:
        want = " or ".join(str(list(s)) for s in shapes)
        names = "[B, H]" + (" or [B, H, Dk]" if per_dim_ok else "")
        raise ValueError(f"g_t: expected log-decay of shape {names} = {want}, "
                         f"got {tuple(g_t.shape)}")
    if g_t.device != q_t.device:
        raise ValueError(f"g_t: expected device {q_t.device} (that of q_t), got {g_t.device}")
    check_finite("g_t", g_t)
    if bool((g_t > 0).any()):
        raise ValueError(f"g_t: expected log-decay <= 0 (decay exp(g) in (0, 1]), "
                         f"got max {g_t.max().item():.4g}")
    return g_t


# -- the op --------------------------------------------------------------------------------------

def linear_attention(q, k, v, g=None, *, initial_state=None, output_final_state=False,
                     cu_seqlens=None, form="chunk", chunk_size=64):
    """Gated linear attention, `o_t = S_t^T q_t`, `S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T`.

    q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; g: None, [B, T, H] or [B, T, H, Dk] (log-decay <= 0);
    initial_state: [B, H, Dk, Dv] (N sequences: [N, H, Dk, Dv] with cu_seqlens).
    Returns o [B, T, H, Dv] in the dtype of q and the final state [B, H, Dk, Dv] (float32 for
    half-precision inputs, where it is the accumulator) or None.
    """
    B, T, H, Dk, Dv = check_qkv(q, k, v)
    check_log_decay(g, q)
    check_form(form, FORMS)
    check_chunk_size(chunk_size)
    check_cu_seqlens(cu_seqlens, q)
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    check_state("initial_state", initial_state, (N, H, Dk, Dv), "[B, H, Dk, Dv]", q)

    def run(q, k, v, g, initial_state, output_final_state):
        dt = compute_dtype(q)
        q_, k_, v_ = q.to(dt), k.to(dt), v.to(dt)
        g_ = None if g is None else g.to(dt)
        s0 = None if initial_state is None else initial_state.to(dt)
        if form == "recurrent":
            o, s = _recurrent(q_, k_, v_, g_, s0)
        elif form == "parallel":
            o, s = _parallel(q_, k_, v_, g_, s0)
        else:
            o, s = chunk_linear_attention(q_, k_, v_, g_, s0, chunk_size)
        return o.to(q.dtype), (s if output_final_state else None)

    if cu_seqlens is not None:
        return varlen(run, cu_seqlens, {"q": q, "k": k, "v": v, "g": g}, initial_state,
                      output_final_state)
    return run(q, k, v, g, initial_state, output_final_state)


def linear_attention_step(q_t, k_t, v_t, g_t=None, state=None):
    """One decoding step: q_t, k_t [B, H, Dk], v_t [B, H, Dv], g_t None / [B, H] / [B, H, Dk].

    Returns (o_t [B, H, Dv], new state [B, H, Dk, Dv]).
    """
    B, H, Dk, Dv = check_step_qkv(q_t, k_t, v_t)
    check_step_decay(g_t, q_t)
    check_state("state", state, (B, H, Dk, Dv), "[B, H, Dk, Dv]", q_t)
    dt = compute_dtype(q_t)
    if state is None:
        state = q_t.new_zeros(B, H, Dk, Dv, dtype=dt)
    g_ = None if g_t is None else g_t.to(dt)
    o, s = _step(q_t.to(dt), k_t.to(dt), v_t.to(dt), g_, state.to(dt))
    return o.to(q_t.dtype), s


def _step(q, k, v, g, S):
    """S <- diag(exp(g)) S + k v^T; o = S^T q. Shapes [B, H, D...] without a time axis."""
    if g is not None:
        # scalar g [B, H] scales the whole state, per-dimension g [B, H, Dk] its rows
        S = S * torch.exp(g if g.ndim == 3 else g.unsqueeze(-1)).unsqueeze(-1)
    S = S + k.unsqueeze(-1) * v.unsqueeze(-2)  # [B, H, Dk, Dv]
    # a broadcast product, not a matmul: decoding-size matmuls pay a thread-pool round trip
    return (q.unsqueeze(-1) * S).sum(-2), S


def _recurrent(q, k, v, g, s0):
    B, T, H, Dk = q.shape
    S = s0 if s0 is not None else q.new_zeros(B, H, Dk, v.shape[-1])
    return scan(_step, S, q, k, v, g)


def _parallel(q, k, v, g, s0):
    """Quadratic form. With G_t = sum_{j<=t} g_j (inclusive cumsum):

    S_t = diag(exp(G_t)) S_0 + sum_{i<=t} diag(exp(G_t - G_i)) k_i v_i^T, hence
    o_t = (q_t * exp(G_t))^T S_0 + sum_{i<=t} [sum_d q_td k_id exp(G_td - G_id)] v_i.
    """
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
    T = q.shape[2]
    if g is None:
        # 1. no decay: the causal mask alone
        A = (q @ k.mT).tril()  # [B, H, T, T]
        o = A @ v  # [B, H, T, Dv]
        S = k.mT @ v  # [B, H, Dk, Dv]
        if s0 is not None:
            o, S = o + q @ s0, S + s0
        return o.transpose(1, 2), S
    per_dim = g.ndim == 4
    G = torch.cumsum(g.transpose(1, 2), dim=2)  # [B, H, T] or [B, H, T, Dk]
    # 1. intra-sequence scores with the decay folded in
    if per_dim:
        L = _segment_sums_dim(g.transpose(1, 2))  # [B, H, T, T, Dk]
        A = torch.einsum("bhtd,bhid,bhtid->bhti", q, k, torch.exp(L))
    else:
        A = (q @ k.mT) * torch.exp(_segment_sums(g.transpose(1, 2)))  # [B, H, T, T]
    o = A @ v  # [B, H, T, Dv]
    # 2. final state: each key decayed from its step to T (exponent G_T - G_i <= 0; for scalar
    # decay summed over the segment, see _segment_sums)
    w = torch.exp(_after(g.transpose(1, 2), per_dim))  # [B, H, T, Dk] or [B, H, T]
    S = (k * (w if per_dim else w.unsqueeze(-1))).mT @ v  # [B, H, Dk, Dv]
    # 3. the initial state, decayed by exp(G_t) from the start
    if s0 is not None:
        eG = torch.exp(G if per_dim else G.unsqueeze(-1))  # [B, H, T, Dk or 1]
        o = o + (q * eG) @ s0
        S = S + eG[:, :, T - 1].unsqueeze(-1) * s0
    return o.transpose(1, 2), S


def chunk_linear_attention(q, k, v, g, s0, C):
    """Chunkwise form, on validated inputs in their own dtype (other ops build on it).

    q, k [B, T, H, Dk], v [B, T, H, Dv], g None / [B, T, H] / [B, T, H, Dk], s0 None or
    [B, H, Dk, Dv]; returns o [B, T, H, Dv] and the final state [B, H, Dk, Dv].

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

    def chunks(x):  # [B, T, H, ...] -> [B, H, n, C, ...]
        x = F.pad(x, (0, 0) * (x.ndim - 3) + (0, 0, 0, pad))
        return x.reshape(B, n, C, H, *x.shape[3:]).transpose(1, 3).transpose(2, 3)

    q, k, v = chunks(q), chunks(k), chunks(v)  # [B, H, n, C, D]
    if g is None:
        b = q.new_zeros(B, H, n, C, 1)
    else:
        # 1. cumulative log-decay within each chunk, relative to the chunk start (<= 0)
        b = torch.cumsum(chunks(g if per_dim else g.unsqueeze(-1)), dim=3)  # [B, H, n, C, Dk|1]
    b_last = b[:, :, :, -1]  # [B, H, n, Dk|1]

    # 2. intra-chunk outputs: the quadratic form on each chunk
    if g is None:
        A = (q @ k.mT).tril()  # [B, H, n, C, C]
    elif per_dim:
        A = _intra_chunk_per_dim(q, k, chunks(g))
    else:
        A = (q @ k.mT) * torch.exp(_segment_sums(chunks(g)))  # [B, H, n, C, C]
    o = A @ v  # [B, H, n, C, Dv]

    # 3. what each chunk adds to the state, decayed to the chunk end (exponent b_C - b_i <= 0)
    if g is None:
        to_end = b  # zeros
    else:
        # sum_{j > i} g_j as a reverse cumsum of the shifted gates, not b_C - b_i (see
        # _segment_sums for why the difference is avoided)
        to_end = _after(chunks(g), per_dim)
        to_end = to_end if per_dim else to_end.unsqueeze(-1)  # [B, H, n, C, Dk|1]
    U = (k * torch.exp(to_end)).mT @ v  # [B, H, n, Dk, Dv]

    # 4. state passing: S entering chunk c+1 = diag(exp(b_C)) S entering chunk c + U_c
    decay = torch.exp(b_last).unsqueeze(-1)  # [B, H, n, Dk|1, 1]
    S = s0 if s0 is not None else q.new_zeros(B, H, Dk, Dv)
    starts = []
    # unbind, not U[:, :, c]: indexing's backward writes a full-size zero gradient per chunk
    for decay_c, U_c in zip(decay.unbind(2), U.unbind(2), strict=True):
        starts.append(S)
        S = decay_c * S + U_c
    S0 = torch.stack(starts, dim=2)  # [B, H, n, Dk, Dv]

    # 5. inter-chunk outputs: queries read the entering state, decayed from the chunk start
    o = o + (q * torch.exp(b)) @ S0
    o = o.transpose(2, 3).transpose(1, 3).reshape(B, n * C, H, Dv)[:, :T]
    return o, S


def _segment_sums(g: torch.Tensor) -> torch.Tensor:
    """log-decays L[t, i] = g_{i+1} + ... + g_t for i <= t, -inf above the diagonal. [..., C, C]

    Summed over the segment, not as the difference G_t - G_i of cumulative sums: both equal in
    the forward pass, but the backward of the difference adds and subtracts terms that cancel
    exactly in exact arithmetic and leave rounding noise of size eps * exp(L) in every g_j's
    gradient, which swamps the true (tiny) gradient under strong decay (measured in float32 at
    g = -20 per step: relative gradient error 1e-2 with the difference).
    """
    C = g.shape[-1]
    causal = torch.ones(C, C, dtype=torch.bool, device=g.device).tril()  # [t, i]: t >= i
    strict = causal.tril(-1)  # [j, i]: j > i
    x = g.unsqueeze(-1).expand(*g.shape, C).masked_fill(~strict, 0)  # [..., C(j), C(i)]
    L = x.cumsum(-2)  # [..., C(t), C(i)] = sum_{i < j <= t} g_j
    return L.masked_fill(~causal, float("-inf"))


def _segment_sums_dim(g: torch.Tensor) -> torch.Tensor:
    """Per-dimension `_segment_sums`: g [..., C, Dk] -> L [..., C(t), C(i), Dk]."""
    return _segment_sums(g.transpose(-1, -2)).permute(*range(g.ndim - 2), -2, -1, -3)


def _after(g: torch.Tensor, per_dim: bool) -> torch.Tensor:
    """sum_{j > i} g_j along the time axis (-2 if per_dim else -1), as a reverse cumsum of the
    shifted gates g_{i+1}, ..., g_C, 0 -- not the difference b_C - b_i (see _segment_sums)."""
    dim = -2 if per_dim else -1
    shifted = torch.cat([g.narrow(dim, 1, g.shape[dim] - 1),
                         torch.zeros_like(g.narrow(dim, 0, 1))], dim)
    return shifted.flip(dim).cumsum(dim).flip(dim)


def _intra_chunk_per_dim(q, k, g):
    """Scores A[t, i] = sum_d q_td k_id exp(b_td - b_id) (i <= t) for per-dimension decay,
    b the cumulative log-decay in the chunk; q, k, g: [B, H, n, C, Dk] -> A [B, H, n, C, C].

    The factorization exp(b_t - b_i) = exp(b_t) exp(-b_i) overflows once a chunk decays by more
    than ~e^88, so we split each chunk into sub-chunks of c steps (GLA's secondary chunking):
      - across sub-chunks (i in sub-chunk J before t's sub-chunk I) factor through the start of
        sub-chunk I: exp(sum of g over I up to t) * exp(sum of g over (i, start of I)), both
        factors <= 1;
      - within a sub-chunk use the masked [c, c, Dk] form.
    Every exponent is a sum of the gates over its own segment (in-sub-chunk cumsums, and
    segment sums of whole sub-chunks), never a difference of cumulative sums: the difference's
    backward leaves rounding noise of size eps * exp(.) in dL/dg (see _segment_sums), which
    swamped the true gradient under strong decay (float32, g = -20: relative error ~1).
    Memory O(C^2 Dk / c + C c Dk) per chunk.
    """
    C = q.shape[3]
    c = max(d for d in range(1, min(SUB_CHUNK, C) + 1) if C % d == 0)
    m = C // c
    lead = q.shape[:3]
    qs, ks, gs = (x.reshape(*lead, m, c, x.shape[-1]) for x in (q, k, g))  # [B, H, n, m, c, Dk]
    # 1. queries decayed to the start of their sub-chunk I: exp(sum_{j in I, j <= t} g_j)
    q_dec = qs * torch.exp(gs.cumsum(4))  # [B, H, n, m, c, Dk]
    # 2. keys in sub-chunk J decayed to the start of sub-chunk I > J: the rest of J after i,
    #    plus the whole sub-chunks strictly between J and I
    rest = _after(gs, per_dim=True)  # [B, H, n, m(J), c, Dk]
    totals = gs.sum(4)  # [B, H, n, m, Dk]
    between = _segment_sums_dim(totals)  # [.., m(I'), m(J), Dk] = sum_{J < K <= I'} totals_K
    # I = I' + 1; for J >= I the entry is masked to -inf (no such key counts)
    between = torch.cat([torch.full_like(between[..., :1, :, :], float("-inf")),
                         between[..., :-1, :, :]], dim=-3)  # [.., m(I), m(J), Dk]
    before = torch.ones(m, m, dtype=torch.bool, device=q.device).tril(-1)  # J < I
    between = between.masked_fill(~before[:, :, None], float("-inf"))
    expo = rest.unsqueeze(3) + between.unsqueeze(-2)  # [B, H, n, m(I), m(J), c, Dk]
    k_dec = (ks.unsqueeze(3) * torch.exp(expo)).reshape(*lead, m, C, q.shape[-1])
    A_off = (q_dec @ k_dec.mT).reshape(*lead, C, C)  # [B, H, n, C, C]
    # 3. diagonal sub-chunk blocks, masked [c, c, Dk] form with per-dimension segment sums
    A_diag = torch.einsum("...td,...id,...tid->...ti", qs, ks, torch.exp(_segment_sums_dim(gs)))
    eye = torch.eye(m, dtype=q.dtype, device=q.device)
    A_diag = torch.einsum("...Iti,IJ->...ItJi", A_diag, eye).reshape(*lead, C, C)
    return A_off + A_diag

"""mLSTM: gated linear attention with an exponential input gate and a normalizer state.

xLSTM (Beck et al. 2024, "xLSTM: Extended Long Short-Term Memory", Section 2.3, Eq. 19-27). In
the op layout S = C^T ([Dk, Dv]; the paper writes C = sum v k^T), with input-gate pre-activation
i_t (gate exp(i_t), Eq. 25) and log forget gate f_t <= 0 (logsigmoid of Eq. 26's pre-activation):

    C_t = e^{f_t} C_{t-1} + e^{i_t} k_t v_t^T          [Dk, Dv]   (Eq. 19)
    n_t = e^{f_t} n_{t-1} + e^{i_t} k_t                [Dk]       (Eq. 20)
    h_t = C_t^T q_t / max(|n_t^T q_t|, 1)              [Dv]       (Eq. 21, before the output gate)

Test-time regression view (paper Section 4): C_t is linear attention with geometric weights
(Eq. 14-16): one gradient step from zero on the weighted least-squares loss whose pair i has
weight gamma_i^(t) = e^{i_i} prod_{j=i+1}^t e^{f_j}, the input gate being a per-pair weight on
top of the forgetting. n_t^T q_t = sum_i gamma_i^(t) k_i^T q_t is the total weight the query
gives the pairs, and dividing by it is the output normalization of linear attention (Qin et al.
2022) that the paper explains as restoring the self-normalization of regression (Eq. 11-13,
Appendix A); the max(., 1) keeps tiny normalizers from amplifying the output. The layer scales
k by 1/sqrt(Dk) (Eq. 23) and applies the output gate (Eq. 27); this op does neither.

Stabilization (xLSTM Appendix): e^{i_t} overflows, so every form carries a stabilizer m_t and
the scaled state C~ = e^{-m} C, n~ = e^{-m} n:

    m_t  = max(f_t + m_{t-1}, i_t)                                          [B, H]
    C~_t = e^{f_t + m_{t-1} - m_t} C~_{t-1} + e^{i_t - m_t} k_t v_t^T        (exponents <= 0)
    n~_t = e^{f_t + m_{t-1} - m_t} n~_{t-1} + e^{i_t - m_t} k_t
    h_t  = C~_t^T q_t / max(|n~_t^T q_t|, e^{-m_t})

which equals the unstabilized h_t exactly (multiply numerator and denominator by e^{m_t}).
The state is the triple (C~ [B, H, Dk, Dv], n~ [B, H, Dk], m [B, H]). Without an initial state
the op starts from (0, 0, m_0 = 0), so a zero initial state gives exactly the same outputs AND
final state as none. (m_0 = -inf, the parallel form of xLSTM, gives
the same outputs but a different representation of the same final state, and is not finite.)
Every form computes the same m_t, so final states are comparable across forms. (xLSTM's code
also adds eps = 1e-6 to the denominator; this op computes Eq. 21 without it.) Unrolled,

    m_t = max(F_t + m_0, max_{j<=t} D_tj),  D_tj = f_{j+1} + ... + f_t + i_j,  F_t = f_1 + ... + f_t

Forms
  recurrent  the stabilized loop above (the spec).
  parallel   xLSTM's parallel form: h = (W V) / max(|W 1|, e^{-m}), W_tj = e^{D_tj - m_t} q_t^T k_j
             (causal), m_t the row max (and the initial state's log weight F_t + m_0). O(T^2).
  chunk      chunkwise (as mlstm_kernels' chunkwise kernels): a stabilized recurrence over chunk
             states and the parallel form inside each chunk. O(T C); see `_chunk`.

Numerics: every exp sees a non-positive exponent except e^{-m_t} <= e^{-i_t}, so any input gate
above ~-88 is safe in float32 (large positive ones included: i = 100 is tested) and forget gates
of any strength are (decays that underflow are exact to float precision). Half-precision inputs
are computed in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ttr.ops.common import (
    _is_compiling,
    check_chunk_size,
    check_cu_seqlens,
    check_form,
    check_like,
    check_qkv,
    check_state,
    check_step_qkv,
    compute_dtype,
    computes_in_float32_under_autocast,
    scan,
    varlen,
)
from ttr.ops.decay import segment_sums

FORMS = ("recurrent", "parallel", "chunk")


@computes_in_float32_under_autocast
def mlstm(q, k, v, i, f, *, initial_state=None, output_final_state=False, cu_seqlens=None,
          form="chunk", chunk_size=64):
    """mLSTM memory read-out h_t = C_t^T q_t / max(|n_t^T q_t|, 1) (see the module docstring).

    q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; i: [B, T, H] input-gate pre-activations (gate e^i);
    f: [B, T, H] log forget gates <= 0; initial_state: None or the triple (C~ [B, H, Dk, Dv],
    n~ [B, H, Dk], m [B, H]) (leading dim N with cu_seqlens). Returns h [B, T, H, Dv] in the
    dtype of q and the final triple (float32 for half-precision inputs) or None.
    """
    B, T, H, Dk, Dv = check_qkv(q, k, v)
    _check_gates("i", "f", i, f, q, (B, T, H), "[B, T, H]")
    check_form(form, FORMS)
    check_chunk_size(chunk_size)
    check_cu_seqlens(cu_seqlens, q)
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    _check_triple("initial_state", initial_state, N, H, Dk, Dv, q)

    def run(q, k, v, i, f, initial_state, output_final_state):
        dt = compute_dtype(q)
        xs = tuple(x.to(dt) for x in (q, k, v, i, f))
        state = _initial(initial_state, q.shape[0], H, Dk, Dv, dt, q.device)
        if form == "recurrent":
            h, state = scan(_step, state, *xs)
        elif form == "parallel":
            h, state = _parallel(*xs, state)
        else:
            h, state = _chunk(*xs, state, chunk_size)
        return h.to(q.dtype), (state if output_final_state else None)

    tensors = {"q": q, "k": k, "v": v, "i": i, "f": f}
    if cu_seqlens is not None:
        return varlen(run, cu_seqlens, tensors, initial_state, output_final_state)
    return run(**tensors, initial_state=initial_state, output_final_state=output_final_state)


@computes_in_float32_under_autocast
def mlstm_step(q_t, k_t, v_t, i_t, f_t, state=None):
    """One decoding step: q_t, k_t [B, H, Dk], v_t [B, H, Dv], i_t, f_t [B, H]; state None or
    (C~ [B, H, Dk, Dv], n~ [B, H, Dk], m [B, H]). Returns (h_t [B, H, Dv], new state)."""
    B, H, Dk, Dv = check_step_qkv(q_t, k_t, v_t)
    _check_gates("i_t", "f_t", i_t, f_t, q_t, (B, H), "[B, H]")
    _check_triple("state", state, B, H, Dk, Dv, q_t)
    dt = compute_dtype(q_t)
    state = _initial(state, B, H, Dk, Dv, dt, q_t.device)
    h, state = _step(*(x.to(dt) for x in (q_t, k_t, v_t, i_t, f_t)), state)
    return h.to(q_t.dtype), state


def _initial(state, B, H, Dk, Dv, dt, device):
    if state is not None:
        return tuple(s.to(dt) for s in state)
    zeros = lambda *s: torch.zeros(*s, dtype=dt, device=device)
    return zeros(B, H, Dk, Dv), zeros(B, H, Dk), zeros(B, H)


def _step(q, k, v, i, f, state):
    """The stabilized recurrence for one token; q, k [B, H, Dk], v [B, H, Dv], i, f [B, H]."""
    C, n, m = state
    m_new = torch.maximum(f + m, i)  # [B, H]
    a = torch.exp(f + m - m_new)[..., None]  # [B, H, 1]: carries the old state
    b = torch.exp(i - m_new)[..., None]  # [B, H, 1]: writes the new pair
    C = a.unsqueeze(-1) * C + (b * k).unsqueeze(-1) * v.unsqueeze(-2)  # [B, H, Dk, Dv]
    n = a * n + b * k  # [B, H, Dk]
    # broadcast products, not matmuls: decoding-size matmuls pay a thread-pool round trip
    num = (q.unsqueeze(-1) * C).sum(-2)  # [B, H, Dv]
    den = (q * n).sum(-1, keepdim=True)  # [B, H, 1]
    return num / torch.maximum(den.abs(), torch.exp(-m_new)[..., None]), (C, n, m_new)


# -- blocks of tokens: shared by the parallel form (one block) and the chunk form -----------------

def _log_weights(i, f):
    """D [..., L, L]: log weight D_tj = f_{j+1} + ... + f_t + i_j of pair j at step t (j <= t,
    -inf above the diagonal); F [..., L]: F_t = f_1 + ... + f_t. From i, f [..., L]."""
    return segment_sums(f) + i.unsqueeze(-2), torch.cumsum(f, dim=-1)


def _read(q, k, v, D, a, C0, n0):
    """Outputs of a block of L tokens entering from the stabilized state (C0, n0), which has log
    weight a_t = F_t + m_0 at step t. q, k [..., L, Dk], v [..., L, Dv], D [..., L, L], a [..., L],
    C0 [..., Dk, Dv], n0 [..., Dk] -> h [..., L, Dv]."""
    m = torch.maximum(a, D.amax(-1))  # [..., L]: the stabilizer m_t of the recurrence
    W = torch.exp(D - m.unsqueeze(-1)) * (q @ k.mT)  # [..., L, L]
    s = torch.exp(a - m).unsqueeze(-1)  # [..., L, 1]
    num = W @ v + s * (q @ C0)  # [..., L, Dv] = C~_t^T q_t
    den = W.sum(-1, keepdim=True) + s * (q @ n0.unsqueeze(-1))  # [..., L, 1] = n~_t^T q_t
    return num / torch.maximum(den.abs(), torch.exp(-m).unsqueeze(-1))


def _pairs_to_end(k, v, d):
    """A block's own pairs summed at its end with log weights d [..., L], stabilized by their max:
    (sum_j e^{d_j - mu} k_j v_j^T [..., Dk, Dv], sum_j e^{d_j - mu} k_j [..., Dk], mu [...])."""
    mu = d.amax(-1)  # [...]
    wk = torch.exp(d - mu.unsqueeze(-1)).unsqueeze(-1) * k  # [..., L, Dk]
    return wk.mT @ v, wk.sum(-2), mu


def _merge(C0, n0, a, U, u, mu):
    """The state (C0, n0) carried with log weight a, plus pairs (U, u) stabilized at mu."""
    m = torch.maximum(a, mu)  # [...]
    s, r = torch.exp(a - m).unsqueeze(-1), torch.exp(mu - m).unsqueeze(-1)  # [..., 1]
    return s.unsqueeze(-1) * C0 + r.unsqueeze(-1) * U, s * n0 + r * u, m


def _parallel(q, k, v, i, f, state):
    """xLSTM's stabilized parallel form on the whole sequence, with the entering state."""
    C0, n0, m0 = state
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
    D, Fc = _log_weights(i.transpose(1, 2), f.transpose(1, 2))  # [B, H, T, T], [B, H, T]
    a = Fc + m0.unsqueeze(-1)  # [B, H, T]
    h = _read(q, k, v, D, a, C0, n0)  # [B, H, T, Dv]
    # the final state is row T of the same weights
    state = _merge(C0, n0, a[..., -1], *_pairs_to_end(k, v, D[..., -1, :]))
    return h.transpose(1, 2), state


def _chunk(q, k, v, i, f, state, C):
    """Chunkwise form: split T into n chunks of C steps. Within chunk c let b_t be the log forget
    accumulated since the chunk start and (C~_0, n~_0, m_0) the state entering it. Unrolling the
    recurrence over the chunk, with D_tj = b_t - b_j + i_j (j <= t in the chunk):

        m_t       = max(b_t + m_0, max_j D_tj)
        C~_t^T q  = e^{b_t + m_0 - m_t} C~_0^T q + sum_j e^{D_tj - m_t} (q^T k_j) v_j
        n~_t^T q  = e^{b_t + m_0 - m_t} n~_0^T q + sum_j e^{D_tj - m_t} (q^T k_j)

    i.e. the parallel form on the chunk, plus the entering state with log weight b_t + m_0. At
    the chunk end (t = C) the same expressions, split by the max over the chunk's own pairs
    mu = max_j D_Cj, give the next entering state:

        m'   = max(b_C + m_0, mu)
        C~'  = e^{b_C + m_0 - m'} C~_0 + e^{mu - m'} U,   U = sum_j e^{D_Cj - mu} k_j v_j^T

    U and mu depend only on the chunk's own tokens, so only this merge is sequential. All
    exponents are <= 0 by construction of the maxima.
    """
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    n = -(-T // C)
    pad = n * C - T

    def chunks(x, value=0.0):  # [B, T, H, ...] -> [B, H, n, C, ...]
        x = F.pad(x, (0, 0) * (x.ndim - 3) + (0, 0, 0, pad), value=value)
        return x.reshape(B, n, C, H, *x.shape[3:]).transpose(1, 3).transpose(2, 3)

    # padding: k = v = 0 adds nothing, f = 0 decays nothing, and i = -inf keeps the padded pairs
    # out of every maximum, so the final stabilizer (part of the state) is the recurrence's
    q, k, v, f = chunks(q), chunks(k), chunks(v), chunks(f)  # [B, H, n, C, D], f [B, H, n, C]
    i = chunks(i, float("-inf"))  # [B, H, n, C]

    # 1. log weights inside each chunk: D [B, H, n, C, C], b [B, H, n, C]
    D, b = _log_weights(i, f)
    # 2. each chunk's own pairs summed at the chunk end: U [B, H, n, Dk, Dv], u [B, H, n, Dk]
    U, u, mu = _pairs_to_end(k, v, D[..., -1, :])
    # 3. state passing: merge the carried state (log weight b_C + m_0) with each chunk's pairs
    C0, n0, m0 = state
    starts = []
    # unbind, not U[:, :, c]: indexing's backward writes a full-size zero gradient per chunk
    for b_c, U_c, u_c, mu_c in zip(b[..., -1].unbind(2), U.unbind(2), u.unbind(2),
                                   mu.unbind(2), strict=True):
        starts.append((C0, n0, m0))
        C0, n0, m0 = _merge(C0, n0, b_c + m0, U_c, u_c, mu_c)
    Cs, ns, ms = (torch.stack(s, dim=2) for s in zip(*starts, strict=True))  # [B, H, n, ...]
    # 4. outputs: the parallel form in each chunk, reading the state entering it
    h = _read(q, k, v, D, b + ms.unsqueeze(-1), Cs, ns)  # [B, H, n, C, Dv]
    h = h.transpose(2, 3).transpose(1, 3).reshape(B, n * C, H, Dv)[:, :T]
    return h, (C0, n0, m0)


# -- validation ----------------------------------------------------------------------------------

def _check_gates(i_name, f_name, i, f, ref, shape, what):
    for name, x in ((i_name, i), (f_name, f)):
        if x is None:
            raise ValueError(f"{name}: mLSTM needs a gate of shape {what} = {list(shape)}, "
                             "got None")
        check_like(name, x, ref, shape, what)
    if not _is_compiling() and bool(f.amax() > 0):
        raise ValueError(f"{f_name}: expected a log forget gate <= 0 (e.g. logsigmoid of the "
                         f"pre-activation), got max {f.max().item():.4g}")


def _check_triple(name, s, N, H, Dk, Dv, ref):
    if s is None:
        return
    if not isinstance(s, (tuple, list)) or len(s) != 3:
        raise TypeError(f"{name}: expected a triple (C [B, H, Dk, Dv], n [B, H, Dk], m [B, H]), "
                        f"got {type(s).__name__}"
                        + (f" of length {len(s)}" if isinstance(s, (tuple, list)) else ""))
    check_state(f"{name}[0] (C)", s[0], (N, H, Dk, Dv), "[B, H, Dk, Dv]", ref)
    check_state(f"{name}[1] (n)", s[1], (N, H, Dk), "[B, H, Dk]", ref)
    check_state(f"{name}[2] (m)", s[2], (N, H), "[B, H]", ref)

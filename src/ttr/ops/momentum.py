"""Online SGD with momentum on a linear memory: the linear case of Titans (Behrouz et al. 2024).

Objective: the streaming least-squares loss of Eq. 17-18, L_t(M) = 1/2 ||v_t - M k_t||^2 on the
newest pair, minimized by SGD warm-started from the previous memory (Eq. 26-29) with momentum
(the paper's "gradient descent, possibly with ... momentum, or weight decay", Vignette 3) and
forgetting exp(g_t) as in Gated DeltaNet (Eq. 37-41). In the op layout S = M^T: [B, H, Dk, Dv];
U [B, H, Dk, Dv] is the velocity (Titans' "surprise" S_t). The state is the pair (S, U).

form="recurrent": EXACT per-token online SGD with momentum (the semantics of
`ttr.reference.solve` for Optimizer.sgd(momentum=mu), checked by the tests):

    S'   = exp(g_t) S_{t-1}                     forgetting: decays the memory, NOT the velocity
    grad = k_t (k_t^T S' - v_t^T)               gradient of L_t at S' (the decayed memory)
    U_t  = mu_t U_{t-1} - beta_t grad           mu_t in [0, 1]: Titans' eta_t, beta_t: theta_t
    S_t  = S' + U_t,            o_t = S_t^T q_t

mu = 0 is the (gated) delta rule. Titans writes the same recurrence with M_t = (1 - alpha_t)
M_{t-1} + S_t but takes the gradient at the undecayed M_{t-1}; here (as in the reference and
in Gated DeltaNet) the memory is decayed first and the gradient is taken at S'.

form="chunk": Titans' and TTT's chunk-level parallelization, a DIFFERENT function (mini-batch
gradient descent): inside each chunk of C tokens with start state S_0, every gradient is taken
at the chunk-start memory, forgotten up to token t, G_t = g_1 + ... + g_t within the chunk:

    grad_t = k_t (k_t^T exp(G_t) S_0 - v_t^T)
    U_t = mu_t U_{t-1} - beta_t grad_t,      S_t = exp(g_t) S_{t-1} + U_t,      o_t = S_t^T q_t

Then U and S are linear recurrences with known inputs, solved inside the chunk with cumulative
products and matmuls (docs/momentum_chunk.md; the numbered steps in `_chunk` follow it); only
chunk-to-chunk passes are sequential. With C = 1 it is the exact form. Chunks restart at every
call and every packed sequence, so outputs depend on where chunk boundaries fall.
form="chunk_recurrent" is the same chunk-start-gradient semantics as a plain loop (its spec).
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
    check_log_decay,
    check_qkv,
    check_state,
    check_step_decay,
    check_step_qkv,
    compute_dtype,
    time_steps,
    varlen,
)
from ttr.ops.delta import _read

FORMS = ("recurrent", "chunk", "chunk_recurrent")


def momentum_delta_rule(q, k, v, beta, momentum, g=None, *, initial_state=None,
                        output_final_state=False, cu_seqlens=None, form="chunk", chunk_size=64):
    """Online SGD with momentum and forgetting on a linear memory (see the module docstring).

    form "recurrent" is the exact per-token online SGD; "chunk" (default) is Titans' chunkwise
    approximation (gradients at the chunk-start memory) and "chunk_recurrent" its loop spec.
    q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; beta: [B, T, H] step sizes; momentum: a float in
    [0, 1] or [B, T, H] in [0, 1]; g: None or [B, T, H] log-decay <= 0 of the memory;
    initial_state: a pair (S [B, H, Dk, Dv], U [B, H, Dk, Dv]) (leading dim N with cu_seqlens).
    Returns o [B, T, H, Dv] (dtype of q) and the final pair (S, U) (float32 for half-precision
    inputs) or None.
    """
    B, T, H, Dk, Dv = check_qkv(q, k, v)
    if beta is None:
        raise ValueError("beta: SGD needs step sizes of shape [B, T, H], got None")
    check_like("beta", beta, q, (B, T, H), "[B, T, H]")
    momentum = _check_momentum("momentum", momentum, q, (B, T, H), "[B, T, H]")
    check_log_decay(g, q, per_dim_ok=False)
    check_form(form, FORMS)
    check_chunk_size(chunk_size)
    check_cu_seqlens(cu_seqlens, q)
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    _check_pair("initial_state", initial_state, (N, H, Dk, Dv), q)
    if not isinstance(momentum, torch.Tensor):
        momentum = torch.full((B, T, H), momentum, dtype=compute_dtype(q), device=q.device)

    def run(q, k, v, beta, momentum, g, initial_state, output_final_state):
        dt = compute_dtype(q)
        q_, k_, v_, b_, m_ = (x.to(dt) for x in (q, k, v, beta, momentum))
        g_ = None if g is None else g.to(dt)
        if initial_state is None:
            S = U = q.new_zeros(q.shape[0], H, Dk, Dv, dtype=dt)
        else:
            S, U = (s.to(dt) for s in initial_state)
        if form == "recurrent":
            o, S, U = _recurrent(q_, k_, v_, b_, m_, g_, S, U)
        elif form == "chunk":
            o, S, U = _chunk(q_, k_, v_, b_, m_, g_, S, U, chunk_size)
        else:
            o, S, U = _chunk_recurrent(q_, k_, v_, b_, m_, g_, S, U, chunk_size)
        return o.to(q.dtype), ((S, U) if output_final_state else None)

    tensors = {"q": q, "k": k, "v": v, "beta": beta, "momentum": momentum, "g": g}
    if cu_seqlens is not None:
        return varlen(run, cu_seqlens, tensors, initial_state, output_final_state)
    return run(**tensors, initial_state=initial_state, output_final_state=output_final_state)


def momentum_delta_rule_step(q_t, k_t, v_t, beta_t, momentum_t, g_t=None, state=None):
    """One decoding step of the exact per-token semantics (form="recurrent").

    q_t, k_t [B, H, Dk], v_t [B, H, Dv], beta_t [B, H], momentum_t float or [B, H] in [0, 1],
    g_t None / [B, H]; state None or the pair (S, U). Returns (o_t [B, H, Dv], (S, U)).
    """
    B, H, Dk, Dv = check_step_qkv(q_t, k_t, v_t)
    if beta_t is None:
        raise ValueError("beta_t: SGD needs step sizes of shape [B, H], got None")
    check_like("beta_t", beta_t, q_t, (B, H), "[B, H]")
    momentum_t = _check_momentum("momentum_t", momentum_t, q_t, (B, H), "[B, H]")
    check_step_decay(g_t, q_t, per_dim_ok=False)
    _check_pair("state", state, (B, H, Dk, Dv), q_t)
    dt = compute_dtype(q_t)
    if state is None:
        S = U = q_t.new_zeros(B, H, Dk, Dv, dtype=dt)
    else:
        S, U = (s.to(dt) for s in state)
    if not isinstance(momentum_t, torch.Tensor):
        momentum_t = torch.full((B, H), momentum_t, dtype=dt, device=q_t.device)
    q_, k_, v_, b_, m_ = (x.to(dt) for x in (q_t, k_t, v_t, beta_t, momentum_t))
    o, S, U = _step(q_, k_, v_, b_, m_, None if g_t is None else g_t.to(dt), S, U)
    return o.to(q_t.dtype), (S, U)


# -- the two loop specs --------------------------------------------------------------------------

def _sgd_momentum(S, U, S_grad, k, v, beta, mu):
    """U <- mu U - beta grad, S <- S + U, grad = k (k^T S_grad - v^T) taken at S_grad.
    Shapes [B, H, ...] without a time axis."""
    err = beta.unsqueeze(-1) * (_read(S_grad, k) - v)  # [B, H, Dv], beta-scaled residual
    U = mu[..., None, None] * U - k.unsqueeze(-1) * err.unsqueeze(-2)  # [B, H, Dk, Dv]
    return S + U, U


def _step(q, k, v, beta, mu, g, S, U):
    """The exact step: S' = exp(g) S; U = mu U - beta grad(S'); S = S' + U; o = S^T q."""
    if g is not None:
        S = S * torch.exp(g)[..., None, None]
    S, U = _sgd_momentum(S, U, S, k, v, beta, mu)
    return _read(S, q), S, U


def _recurrent(q, k, v, beta, mu, g, S, U):
    """form="recurrent": the exact per-token online SGD with momentum, token by token."""
    outs = []
    for q_t, k_t, v_t, b_t, m_t, g_t in time_steps(q, k, v, beta, mu, g):
        o, S, U = _step(q_t, k_t, v_t, b_t, m_t, g_t, S, U)
        outs.append(o)
    return torch.stack(outs, dim=1), S, U  # o [B, T, H, Dv]


def _chunk_recurrent(q, k, v, beta, mu, g, S, U, C):
    """form="chunk_recurrent", the spec of the chunk form: every gradient of a chunk of C tokens
    is taken at the chunk-start memory forgotten to token t, exp(G_t) S_0 (with C = 1 that is
    S' itself, the exact recurrence)."""
    outs = []
    for t, (q_t, k_t, v_t, b_t, m_t, g_t) in enumerate(time_steps(q, k, v, beta, mu, g)):
        if t % C == 0:
            S_ref = S  # chunk start
        if g_t is not None:
            a = torch.exp(g_t)[..., None, None]  # [B, H, 1, 1]
            S, S_ref = a * S, a * S_ref
        S, U = _sgd_momentum(S, U, S_ref, k_t, v_t, b_t, m_t)
        outs.append(_read(S, q_t))
    return torch.stack(outs, dim=1), S, U  # o [B, T, H, Dv]


# -- the chunk form ------------------------------------------------------------------------------

def _chunk(q, k, v, beta, mu, g, S, U, chunk_size):
    """Chunk-start-gradient semantics, all tokens of a chunk at once (docs/momentum_chunk.md).

    q, k [B, T, H, Dk], v [B, T, H, Dv], beta, mu [B, T, H], g None / [B, T, H], S, U
    [B, H, Dk, Dv], all in the compute dtype. Returns o [B, T, H, Dv] and the final (S, U).
    """
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    C = min(chunk_size, T)
    N = -(-T // C)
    pad = N * C - T

    def chunks(x):  # [B, T, H, *D] -> [B, H, N, C, *D]
        # Padded tokens (q = k = v = 0, beta = mu = g = 0) sit after the last real one and so
        # reach no real output; the final state is read at the last REAL row (step 4), because
        # a padded token is not an identity step: S keeps moving with the velocity.
        if pad:
            x = F.pad(x, (0, 0) * (x.ndim - 2) + (0, pad))
        x = x.reshape(B, N, C, H, *x.shape[3:])
        return x.permute(0, 3, 1, 2, *range(4, x.ndim)).contiguous()

    qc, kc, vc, bc, mc = (chunks(x) for x in (q, k, v, beta, mu))  # [B, H, N, C(, D)]
    gc = chunks(g) if g is not None else bc.new_zeros(bc.shape)  # [B, H, N, C]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()  # r >= i
    strict = causal.tril(-1)  # r > i

    # 1. memory decay in log space: Gamma_ri = exp(g_{i+1} + ... + g_r) (segment sums, masked
    #    before exp, as in delta_chunk.py), and exp(G_r), G_r = g_1 + ... + g_r
    seg = gc.unsqueeze(-1).expand(*gc.shape, C).masked_fill(~strict, 0.0).cumsum(-2)
    gamma = seg.masked_fill(~causal, float("-inf")).exp()  # [B, H, N, C, C]
    eG = gc.cumsum(-1).exp()  # [B, H, N, C]

    # 2. momentum products P_ri = mu_{i+1} ... mu_r and p_r = mu_1 ... mu_r. Plain cumprod, not
    #    log space: mu = 0 (no momentum) is a valid value whose log is -inf, and the gradient of
    #    a product with respect to a zero factor is not 0; cumprod's backward handles zeros.
    P = mc.unsqueeze(-1).expand(*mc.shape, C).masked_fill(~strict, 1.0).cumprod(-2)
    P = P.masked_fill(~causal, 0.0)  # [B, H, N, C, C]
    p = mc.cumprod(-1)  # [B, H, N, C]

    # 3. how a step taken at token i moves S_r: D = Gamma P (velocity i -> j, decay j -> r),
    #    and how the entering velocity U_0 moves S_r: c = Gamma p
    D = gamma @ P  # [B, H, N, C, C], lower triangular
    c = (gamma @ p.unsqueeze(-1)).squeeze(-1)  # [B, H, N, C]

    # 4. chunk-to-chunk pass. Pseudo-values W = beta (exp(G) K S_0 - V) are the beta-scaled
    #    residuals at the chunk-start memory; then, read at the last real row e of the chunk,
    #    S_e = exp(G_e) S_0 + c_e U_0 - (D_e. * K)^T W,   U_e = p_e U_0 - (P_e. * K)^T W.
    Kb = (bc * eG).unsqueeze(-1) * kc  # [B, H, N, C, Dk]
    Vb = bc.unsqueeze(-1) * vc  # [B, H, N, C, Dv]
    n_idx = torch.arange(N, device=q.device)
    e_idx = torch.full((N,), C - 1, device=q.device)
    e_idx[-1] = T - (N - 1) * C - 1
    KD = (D[:, :, n_idx, e_idx].unsqueeze(-1) * kc).mT  # [B, H, N, Dk, C]
    KP = (P[:, :, n_idx, e_idx].unsqueeze(-1) * kc).mT  # [B, H, N, Dk, C]
    ends = [x[:, :, n_idx, e_idx][..., None, None] for x in (eG, c, p)]  # [B, H, N, 1, 1]
    # unbind, not x[:, :, n]: indexing's backward is quadratic in N (see common.time_steps)
    per_chunk = zip(Kb.unbind(2), Vb.unbind(2), KD.unbind(2), KP.unbind(2),
                    *(x.unbind(2) for x in ends), strict=True)
    S_starts, U_starts, Ws = [], [], []
    for Kb_n, Vb_n, KD_n, KP_n, eG_n, c_n, p_n in per_chunk:
        W = Kb_n @ S - Vb_n  # [B, H, C, Dv]
        S_starts.append(S)
        U_starts.append(U)
        Ws.append(W)
        S, U = eG_n * S + c_n * U - KD_n @ W, p_n * U - KP_n @ W
    S0, U0 = torch.stack(S_starts, dim=2), torch.stack(U_starts, dim=2)  # [B, H, N, Dk, Dv]
    W = torch.stack(Ws, dim=2)  # [B, H, N, C, Dv]

    # 5. outputs: O = (exp(G) Q) S_0 + (c Q) U_0 - (Q K^T * D) W
    o = (eG.unsqueeze(-1) * qc) @ S0 + (c.unsqueeze(-1) * qc) @ U0 - ((qc @ kc.mT) * D) @ W
    o = o.permute(0, 2, 3, 1, 4).reshape(B, N * C, H, Dv)[:, :T]
    return o, S, U


# -- validation ----------------------------------------------------------------------------------

def _check_momentum(name, mu, q, shape, what):
    """A float in [0, 1] or a tensor of `shape` with values in [0, 1]."""
    if isinstance(mu, torch.Tensor):
        check_like(name, mu, q, shape, what)
        if not _is_compiling() and bool(((mu < 0) | (mu > 1)).any()):
            raise ValueError(f"{name}: expected values in [0, 1], got min {mu.min().item():.4g}"
                             f", max {mu.max().item():.4g}")
        return mu
    if isinstance(mu, bool) or not isinstance(mu, (int, float)):
        raise TypeError(f"{name}: expected a float in [0, 1] or a {what} tensor, got "
                        f"{type(mu).__name__} {mu!r}")
    if not 0.0 <= mu <= 1.0:
        raise ValueError(f"{name}: expected a value in [0, 1], got {mu!r}")
    return float(mu)


def _check_pair(name, s, shape, ref):
    if s is None:
        return
    if not isinstance(s, (tuple, list)) or len(s) != 2:
        raise TypeError(f"{name}: expected a pair (S, U) of [B, H, Dk, Dv] tensors, got "
                        f"{type(s).__name__}")
    check_state(f"{name}[0] (S)", s[0], shape, "[B, H, Dk, Dv]", ref)
    check_state(f"{name}[1] (U)", s[1], shape, "[B, H, Dk, Dv]", ref)

"""Titans' neural memory: an MLP trained by SGD with momentum and forgetting in the forward pass.

Behrouz et al. 2024, "Titans: learning to memorize at test time", §3.1-3.2; in the paper's
terms, Vignette 3 (Section 4) with a nonlinear function class and the optimizer "gradient
descent with momentum and weight decay". The memory is an MLP of depth L >= 1 without biases,

    M(x) = silu(... silu(x W_1) ...) W_L,     W_1 [Dk, d_1], ..., W_L [d_{L-1}, Dv]

(row vectors, the op layout: depth 1 is the linear memory S = M^T [Dk, Dv] of the other ops),
fitted on the newest pair by l_t(M) = 1/2 ||M(k_t) - v_t||^2 (Titans Eq. 12 halved: theta
absorbs the 2; the streaming least squares of our Eq. 17-18) with, per head and for every
weight matrix,

    S_t = eta_t S_{t-1} - theta_t grad l_t(M_{t-1})      momentum ("surprise"), Titans Eq. 14
    M_t = (1 - alpha_t) M_{t-1} + S_t                    forgetting, Titans Eq. 13
    o_t = M_t(q_t)

theta = lr, eta = momentum, alpha = decay, each [B, T, H] (or a float) in [0, 1].

Forms
  recurrent        the recurrence above, exact: the gradient at token t is taken at M_{t-1}.
  chunk_recurrent  Titans' chunk-level parallelization (§3.2) as a loop: inside a chunk of
                   `chunk_size` tokens every gradient is taken at the chunk's START memory M_0
                   (mini-batch gradient descent, a different function; chunk_size=1 is exact).
  chunk            the same function, groups of chunks at once: closed-form gradients of the
                   MLP at M_0 are rank one per token and layer, x_s delta_s^T; S and M are then
                   linear recurrences with known inputs, solved with cumulative products and
                   matmuls as the linear case in momentum.py / docs/momentum_chunk.md (numbered
                   steps in `_group`), so a memory is read as an attention over the group's
                   earlier tokens and written out once per group. Only the keys' pass from
                   chunk to chunk is sequential.

State: {"W1": [B, H, Dk, d_1], ..., "WL": [B, H, d_{L-1}, Dv], "S1", ..., "SL"} (the momentum
buffers, shaped like their weights); None starts from the `params` weights and zero momentum.
Chunks restart at every call and packed sequence: a split at a multiple of chunk_size with the
state carried equals one pass. Decoding one token per call computes the exact recurrence (the
chunk_size = 1 function).

Relation to `momentum_delta_rule` (depth 1, state (S, U) = (W1, S1)): that op decays the memory
BEFORE taking the gradient, Titans takes it at the undecayed M_{t-1}; with decay = 0 the two are
the same function, form for form (tested).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ttr.ops.common import (
    check_chunk_size,
    check_cu_seqlens,
    check_form,
    check_qkv,
    compute_dtype,
    float32_under_autocast,
    time_steps,
)
from ttr.ops.momentum import _check_momentum
from ttr.ops.nonlinear import batched, check_dict, check_positive_int, varlen_dict

FORMS = ("recurrent", "chunk", "chunk_recurrent")


def titans_params(H, Dk, Dv, depth=2, hidden=None, *, dtype=torch.float32, device=None,
                  generator=None) -> dict[str, torch.Tensor]:
    """Initial memory weights {"W1": [H, Dk, hidden], ..., "WL": [H, hidden, Dv]} (depth 1:
    {"W1": [H, Dk, Dv]}), normal with std fan_in^-1/2 so that the memory's output and its
    gradients keep their scale through the layers. hidden defaults to 4 Dk."""
    check_positive_int("depth", depth)
    hidden = check_positive_int("hidden", 4 * Dk if hidden is None else hidden)
    dims = [Dk] + [hidden] * (depth - 1) + [Dv]
    return {f"W{i + 1}": torch.randn(H, a, b, generator=generator, dtype=dtype, device=device)
            / a**0.5 for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True))}


def titans(q, k, v, lr, momentum, decay, params, *, chunk_size=16, initial_state=None,
           output_final_state=False, cu_seqlens=None, form="chunk"):
    """Titans' neural memory (see the module docstring).

    q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; lr (theta), momentum (eta), decay (alpha): floats or
    [B, T, H] tensors in [0, 1]; params: {"W1": [H, Dk, d_1], ..., "WL": [H, d_{L-1}, Dv]};
    initial_state: None or {"W1".."WL", "S1".."SL"} with a leading batch dim (N sequences with
    cu_seqlens). params and state are in q's dtype or float32 for half-precision q. Returns
    o [B, T, H, Dv] (q's dtype) and the final state (float32 for half-precision inputs) or None.
    """
    B, T, H, Dk, Dv = check_qkv(q, k, v)
    gates = {n: _check_momentum(n, x, q, (B, T, H), "[B, T, H]")
             for n, x in (("lr", lr), ("momentum", momentum), ("decay", decay))}
    check_form(form, FORMS)
    check_chunk_size(chunk_size)
    check_cu_seqlens(cu_seqlens, q)
    shapes = _param_shapes(params, H, Dk, Dv)
    check_dict("params", params, shapes, q)
    L = len(shapes)
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    keys = [f"W{i}" for i in range(1, L + 1)] + [f"S{i}" for i in range(1, L + 1)]
    state_shapes = batched(shapes, shapes, N)
    state_shapes.update({f"S{i}": state_shapes[f"W{i}"] for i in range(1, L + 1)})
    check_dict("initial_state", initial_state, state_shapes, q)
    gates = {n: x if isinstance(x, torch.Tensor)
             else torch.full((B, T, H), x, dtype=compute_dtype(q), device=q.device)
             for n, x in gates.items()}

    def run(q, k, v, lr, momentum, decay, initial_state, output_final_state):
        dt = compute_dtype(q)
        q_, k_, v_, th, mu, al = (x.to(dt) for x in (q, k, v, lr, momentum, decay))
        if initial_state is None:
            Ws = [params[f"W{i}"].to(dt).expand(q.shape[0], *shapes[f"W{i}"][0])
                  for i in range(1, L + 1)]
            Ss = [torch.zeros_like(W) for W in Ws]
        else:
            Ws, Ss = ([initial_state[f"{n}{i}"].to(dt) for i in range(1, L + 1)] for n in "WS")
        if form == "chunk":  # autocast's matmuls, if it is on
            o, Ws, Ss = _chunk(q_, k_, v_, th, mu, al, Ws, Ss, chunk_size)
        else:  # the loops are specs: float32 under autocast
            C = 1 if form == "recurrent" else chunk_size
            with float32_under_autocast(q):
                o, Ws, Ss = _loop(q_, k_, v_, th, mu, al, Ws, Ss, C)
        state = dict(zip(keys, Ws + Ss, strict=True)) if output_final_state else None
        return o.to(q.dtype), state

    tensors = {"q": q, "k": k, "v": v, "lr": gates["lr"], "momentum": gates["momentum"],
               "decay": gates["decay"]}
    if cu_seqlens is not None:
        return varlen_dict(run, cu_seqlens, tensors, initial_state, output_final_state, keys)
    return run(**tensors, initial_state=initial_state, output_final_state=output_final_state)


# -- the loop specs ------------------------------------------------------------------------------

def _memory(Ws, x):
    """M(x) for rows x [B, H, n, Dk] and weights Ws[i] [B, H, d_{i-1}, d_i]: [B, H, n, Dv]."""
    for i, W in enumerate(Ws):
        x = (F.silu(x) if i else x) @ W
    return x


def _loss(Ws, k, v):
    """sum over (b, h) of 1/2 ||M(k) - v||^2, k [B, H, 1, Dk], v [B, H, 1, Dv]: the heads'
    terms are independent, so the gradient of the sum is each head's own gradient."""
    return 0.5 * (_memory(Ws, k) - v).square().sum()


def _loop(q, k, v, lr, mu, alpha, Ws, Ss, C):
    """forms "recurrent" (C = 1: gradient at M_{t-1}) and "chunk_recurrent" (gradient at the
    memory of the chunk start). Ws, Ss: lists of [B, H, d_{i-1}, d_i]."""
    grad = torch.func.grad(_loss)
    outs = []
    for t, (q_t, k_t, v_t, *gates) in enumerate(time_steps(q, k, v, lr, mu, alpha)):
        if t % C == 0:
            W_ref = Ws
        th, m, al = (x[..., None, None] for x in gates)  # [B, H, 1, 1]
        grads = grad(W_ref, k_t.unsqueeze(-2), v_t.unsqueeze(-2))
        Ss = [m * S - th * g for S, g in zip(Ss, grads, strict=True)]  # Titans Eq. 14
        Ws = [(1 - al) * W + S for W, S in zip(Ws, Ss, strict=True)]  # Titans Eq. 13
        outs.append(_memory(Ws, q_t.unsqueeze(-2)).squeeze(-2))
    return torch.stack(outs, dim=1), Ws, Ss  # o [B, T, H, Dv]


# -- the chunk form ------------------------------------------------------------------------------

def _products(x):
    """Factors x [B, H, N, C] in [0, 1] -> X [B, H, N, C, C], X_ri = x_{i+1} ... x_r for r >= i
    (X_rr = 1) and 0 above the diagonal, and x_1 ... x_r [B, H, N, C]. Plain cumprod, not log
    space: a factor may be exactly 0 (momentum 0, decay 1), as in momentum.py."""
    C = x.shape[-1]
    causal = torch.ones(C, C, dtype=torch.bool, device=x.device).tril()
    X = x.unsqueeze(-1).expand(*x.shape, C).masked_fill(~causal.tril(-1), 1.0).cumprod(-2)
    return X.masked_fill(~causal, 0.0), x.cumprod(-1)


def _silu_grad(z):
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


# Chunks per group of `_chunk`: the memory is written out once per group, not once per chunk.
GROUP_CHUNKS = 8


def _chunk(q, k, v, lr, mu, alpha, Ws, Ss, chunk_size):
    """Chunk-start-gradient semantics, a group of GROUP_CHUNKS chunks at once. q, k [B, T, H,
    Dk], v [B, T, H, Dv], gates [B, T, H], Ws, Ss lists of [B, H, d_{i-1}, d_i]; returns
    o [B, T, H, Dv], Ws, Ss.

    S and M are linear recurrences whose inputs are the gradients, wherever those are taken, so
    from a group's start memory (M_0, S_0) every later memory is a known combination of M_0, S_0
    and the rank-one gradients of the tokens before it (Step 3). Each layer's gradient at token
    s is x_s^T (theta_s delta_s) (its input row and its theta-scaled backprop delta, Step 4),
    so reading the memory of token r with a row y needs only dot products with those rows:
        y W_{i,r} = A_r y W_{i,0} + c_r y S_{i,0} - sum_{s<=r} D_rs (y . x_s) theta_s delta_s,
    an attention over the group's earlier tokens. The memory, [d_{i-1}, d_i] per layer and
    head (Titans' MLP: [Dk, 4 Dk]), is then formed once per group (Step 6) instead of once per
    chunk, with every elementwise pass over it and its gradient: a chunk of 4 tokens used to
    write out two weight-sized matrices per layer for 4 rank-one updates. Only the keys'
    forward and backprop (Step 4) run chunk by chunk, as the semantics require: each chunk's
    gradients are taken at its own start memory, which depends on the chunks before it.
    Each chunk's reads of the group's start memory still give that memory a weight-sized
    gradient term (the first layer's, whose inputs are the keys, are taken for the whole group
    at once), and the reads of the history grow with the group. Groups of 4 / 8 / 16 / 32 chunks
    (one thread, CPU time): the op below at T = 2048, f+b 3.44 / 3.44 / 4.05 / 4.8 s; at B = 8,
    T = 256 (8 and 16 only) 0.80 / 0.87 s; the MQAR step below 1.29 s for 8, 1.25 s for 16 (4
    and 32, before the first layer's reads went group-wide: 1.66 and 1.36 s). So 8. Measured,
    one thread, CPU time, against the memory written out after every chunk (session 15, the
    2-core Xeon beside a running sweep): the catalogue's titans on MQAR at d_model 128 (32
    sequences of 128 tokens, [128, 512] memory, chunks of 4; forward + backward + AdamW) 2.8 ->
    1.3 s per step, the same losses; the op at B = 8, T = 256, 4 heads, Dk = 64, hidden 256, f+b
    1.1 -> 0.8 s, peak RSS 1624 -> 725 MB; at B = 1, T = 2048 3.9 -> 3.4 s, 1574 -> 661 MB."""
    B, T, H, _ = q.shape
    C = min(chunk_size, T)
    G = C * GROUP_CHUNKS  # tokens per group
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
    th_all, mu_all, al_all = (x.transpose(1, 2) for x in (lr, mu, alpha))  # [B, H, T]
    outs = []
    for g0 in range(0, T, G):
        g1 = min(g0 + G, T)
        o, Ws, Ss = _group(qh[:, :, g0:g1], kh[:, :, g0:g1], vh[:, :, g0:g1],
                           th_all[..., g0:g1], mu_all[..., g0:g1], al_all[..., g0:g1], Ws, Ss,
                           C)
        outs.append(o)
    return torch.cat(outs, dim=2).transpose(1, 2), Ws, Ss


def _group(Q, K, V, th, mu, alpha, Ws, Ss, C):
    """One group of L tokens from the memory (Ws, Ss) at its start: Q, K [B, H, L, Dk],
    V [B, H, L, Dv], gates [B, H, L]; returns o [B, H, L, Dv] and the memory after it."""
    L = Q.shape[2]
    # 1. forgetting: Gamma_ri = (1 - alpha_{i+1}) ... (1 - alpha_r), A_r = (1 - alpha_1) ... ;
    # 2. momentum: P_ri = eta_{i+1} ... eta_r, p_r = eta_1 ... eta_r (over the group)
    Gamma, A = (x.squeeze(2) for x in _products((1 - alpha).unsqueeze(2)))  # [B,H,L,L], [B,H,L]
    P, p = (x.squeeze(2) for x in _products(mu.unsqueeze(2)))
    # 3. a step taken at token s moves M_r by D_rs = sum_j Gamma_rj P_js; S_0 moves it by c_r:
    #    M_r = A_r M_0 + c_r S_0 - sum_{s<=r} D_rs theta_s grad_s,
    #    S_r = p_r S_0 - sum_{s<=r} P_rs theta_s grad_s          (docs/momentum_chunk.md, Step 3)
    D = Gamma @ P  # [B, H, L, L]
    c = (Gamma @ p.unsqueeze(-1)).squeeze(-1)  # [B, H, L]
    xs = [[] for _ in Ws]  # per layer, per chunk: the keys' layer inputs [B, H, n, d_{i-1}]
    ds = [[] for _ in Ws]  # and theta-scaled deltas [B, H, n, d_i]
    # the first layer reads the keys, known up front: its two products for the whole group
    # at once, so that their gradients w.r.t. the start memory are one matmul each, not one
    # weight-sized product per chunk
    KW = K @ Ws[0]  # [B, H, L, d_1]
    KS = K @ Ss[0] if L > C else None  # read from the second chunk on
    for a in range(0, L, C):
        b = min(a + C, L)
        # 4. this chunk's keys through its start memory M_(a) (the memory after token a - 1),
        #    then backprop: grad_s of W_i = xs[i]_s (theta_s deltas[i]_s)^T
        if a:
            coef = (A[..., a - 1, None, None], c[..., a - 1, None, None],
                    D[..., a - 1, None, :a])  # [B, H, 1, 1] twice, [B, H, 1, a]
            hist = [(torch.cat(x, 2), torch.cat(d, 2)) for x, d in zip(xs, ds, strict=True)]
        x, zs = K[:, :, a:b], []
        for i, (W, S) in enumerate(zip(Ws, Ss, strict=True)):
            x = F.silu(zs[-1]) if i else x
            xs[i].append(x)
            if i == 0:
                xW, xS = KW[:, :, a:b], (KS[:, :, a:b] if a else None)
            else:
                xW, xS = x @ W, (x @ S if a else None)
            zs.append(xW if not a else _read(x, xW, xS, *coef, *hist[i]))
        delta = zs[-1] - V[:, :, a:b]  # dl_s/dz_L  [B, H, n, Dv]
        for i in reversed(range(len(Ws))):
            ds[i].append(th[..., a:b, None] * delta)
            if i:
                back = (delta @ Ws[i].mT if not a
                        else _read_t(delta, Ws[i], Ss[i], *coef, *hist[i]))
                delta = back * _silu_grad(zs[i - 1])
    X = [torch.cat(x, 2) for x in xs]  # [B, H, L, d_{i-1}]
    Dl = [torch.cat(d, 2) for d in ds]  # [B, H, L, d_i]
    # 5. the queries through M_r layer by layer, as Step 3 at every row
    y = Q
    Ar, cr = A.unsqueeze(-1), c.unsqueeze(-1)  # [B, H, L, 1]
    for i, (W, S) in enumerate(zip(Ws, Ss, strict=True)):
        y = F.silu(y) if i else y
        y = (Ar * y) @ W + (cr * y) @ S - ((y @ X[i].mT) * D) @ Dl[i]
    # 6. the next group's start: Step 3 read at the last row, written out
    a_e, c_e, p_e = (x[..., -1, None, None] for x in (A, c, p))  # [B, H, 1, 1]
    D_e, P_e = D[..., -1, :, None], P[..., -1, :, None]  # [B, H, L, 1]
    # (fused: the memory is the large tensor here, and every separate product, sum and
    # difference was a pass over it, forward and back)
    Ws, Ss = (
        [_minus_outer(torch.addcmul(a_e * W, c_e, S), D_e * x, d)
         for W, S, x, d in zip(Ws, Ss, X, Dl, strict=True)],
        [_minus_outer(p_e * S, P_e * x, d) for S, x, d in zip(Ss, X, Dl, strict=True)],
    )
    return y, Ws, Ss


def _read(x, xW, xS, a, c, Drow, X, Dl):
    """x M_(a) for rows x [B, H, n, d_in] and the memory at a chunk start (Step 3 at one row),
    from xW = x W and xS = x S: a x W + c x S - ((x X^T) * D_row) Dl, over the group's tokens
    before the chunk."""
    return a * xW + c * xS - ((x @ X.mT) * Drow) @ Dl


def _read_t(d, W, S, a, c, Drow, X, Dl):
    """d M_(a)^T for rows d [B, H, n, d_out] (backprop through a layer of that memory)."""
    return a * (d @ W.mT) + c * (d @ S.mT) - ((d @ Dl.mT) * Drow) @ X


def _minus_outer(M, x, d):
    """M - x^T d for M [B, H, a, b], x [B, H, n, a], d [B, H, n, b], as one baddbmm; in M's
    dtype under autocast too (the states accumulate in float32)."""
    with float32_under_autocast(M):
        return torch.baddbmm(M.flatten(0, 1), x.mT.flatten(0, 1).to(M.dtype),
                             d.flatten(0, 1).to(M.dtype), alpha=-1).view(M.shape)


def _param_shapes(params, H, Dk, Dv):
    """{key: (shape, description)} for params {"W1", ..., "WL"}; the widths come from params."""
    if not isinstance(params, Mapping) or not params:
        got = "an empty dict" if isinstance(params, Mapping) else type(params).__name__
        raise TypeError(f"params: expected a dict {{'W1': [H, Dk, d_1], ..., 'WL': "
                        f"[H, d_(L-1), Dv]}} of depth L >= 1, got {got}")
    L = len(params)
    want = [f"W{i}" for i in range(1, L + 1)]
    if set(params) != set(want):
        raise ValueError(f"params: expected keys {want} (W1 ... WL for a memory of depth {L}), "
                         f"got {list(params)}")
    dims = [Dk]
    for i in range(1, L):
        W = params[f"W{i}"]
        dims.append(W.shape[-1] if isinstance(W, torch.Tensor) and W.ndim == 3 else -1)
    dims.append(Dv)
    names = ["Dk"] + [f"d_{i}" for i in range(1, L)] + ["Dv"]
    return {f"W{i}": ((H, dims[i - 1], dims[i]), f"[H, {names[i - 1]}, {names[i]}]")
            for i in range(1, L + 1)}

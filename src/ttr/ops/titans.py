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
  chunk            the same function, a chunk at once: closed-form gradients of the MLP at M_0
                   are rank one per token and layer, x_s delta_s^T; S and M are then linear
                   recurrences with known inputs, solved with cumulative products and matmuls as
                   the linear case in momentum.py / docs/momentum_chunk.md (numbered steps in
                   `_chunk`). Only chunk-to-chunk passes are sequential.

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


def _chunk(q, k, v, lr, mu, alpha, Ws, Ss, chunk_size):
    """Chunk-start-gradient semantics, a chunk at once. q, k [B, T, H, Dk], v [B, T, H, Dv],
    gates [B, T, H], Ws, Ss lists of [B, H, d_{i-1}, d_i]; returns o [B, T, H, Dv], Ws, Ss."""
    B, T, H, _ = q.shape
    C = min(chunk_size, T)
    N = -(-T // C)

    def chunks(x):  # [B, T, H] -> [B, H, N, C]; padded factors sit after every real token
        return F.pad(x, (0, 0, 0, N * C - T)).reshape(B, N, C, H).permute(0, 3, 1, 2)

    # 1. forgetting: Gamma_ri = (1 - alpha_{i+1}) ... (1 - alpha_r), A_r = (1 - alpha_1) ... ;
    # 2. momentum: P_ri = eta_{i+1} ... eta_r, p_r = eta_1 ... eta_r
    Gamma, A = _products(chunks(1 - alpha))  # [B, H, N, C, C], [B, H, N, C]
    P, p = _products(chunks(mu))
    # 3. a step taken at token s moves M_r by D_rs = sum_j Gamma_rj P_js; S_0 moves it by c_r:
    #    M_r = A_r M_0 + c_r S_0 - sum_{s<=r} D_rs theta_s grad_s,
    #    S_r = p_r S_0 - sum_{s<=r} P_rs theta_s grad_s          (docs/momentum_chunk.md, Step 3)
    D = Gamma @ P  # [B, H, N, C, C]
    c = (Gamma @ p.unsqueeze(-1)).squeeze(-1)  # [B, H, N, C]
    outs = []
    pieces = [x.transpose(1, 2).split(C, dim=2) for x in (q, k, v, lr)]
    kernels = [x.unbind(2) for x in (D, P, A, c, p)]
    for Q, K, V, th, D_n, P_n, A_n, c_n, p_n in zip(*pieces, *kernels, strict=True):
        n = th.shape[-1]  # real tokens in this chunk; Q, K [B, H, n, Dk], V [B, H, n, Dv]
        D_n, P_n = (x[..., :n, :n] for x in (D_n, P_n))  # [B, H, n, n]
        A_n, c_n, p_n = (x[..., :n] for x in (A_n, c_n, p_n))  # [B, H, n]
        # 4. the keys through M_0, then backprop: grad_s of W_i = xs[i]_s (th_s deltas[i]_s)^T
        xs, zs = [], []  # layer inputs [B, H, n, d_{i-1}], pre-activations [B, H, n, d_i]
        for i, W in enumerate(Ws):
            xs.append(F.silu(zs[-1]) if i else K)
            zs.append(xs[-1] @ W)
        delta = zs[-1] - V  # dl_s/dz_L  [B, H, n, Dv]
        deltas = []  # theta-scaled
        for i in reversed(range(len(Ws))):
            deltas.insert(0, th.unsqueeze(-1) * delta)
            if i:
                delta = (delta @ Ws[i].mT) * _silu_grad(zs[i - 1])
        # 5. the queries through M_r layer by layer, as Step 3 at every row:
        #    y W_{i,r} = A_r y W_{i,0} + c_r y S_{i,0} - ((y xs[i]^T) * D) deltas[i]
        y = Q
        for i, (W, S) in enumerate(zip(Ws, Ss, strict=True)):
            y = F.silu(y) if i else y
            y = (A_n.unsqueeze(-1) * y) @ W + (c_n.unsqueeze(-1) * y) @ S \
                - ((y @ xs[i].mT) * D_n) @ deltas[i]
        outs.append(y)  # [B, H, n, Dv]
        # 6. the next chunk's start: Step 3 read at the last real row
        a_e, c_e, p_e = (x[..., -1, None, None] for x in (A_n, c_n, p_n))  # [B, H, 1, 1]
        D_e, P_e = D_n[..., -1, :, None], P_n[..., -1, :, None]  # [B, H, n, 1]
        # (fused: the states are the large tensors here, [B, H, d_in, d_out] per layer, and
        # every separate product, sum and difference was a pass over them, forward and back)
        Ws, Ss = (
            [_minus_outer(torch.addcmul(a_e * W, c_e, S), D_e * x, d)
             for W, S, x, d in zip(Ws, Ss, xs, deltas, strict=True)],
            [_minus_outer(p_e * S, P_e * x, d) for S, x, d in zip(Ss, xs, deltas, strict=True)],
        )
    return torch.cat(outs, dim=2).transpose(1, 2), Ws, Ss


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

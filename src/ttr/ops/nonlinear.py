"""TTT: a nonlinear memory trained by mini-batch gradient descent inside the forward pass.

Test-time training layers (Sun et al. 2024, "Learning to (learn at test time): RNNs with
expressive hidden states") are the paper's Vignette 3 (Section 4) with a nonlinear function
class: the SGD of Eq. 26-29 applied to a nonlinear parametric regressor m_t ("One extension to
Equation 29 is to consider SGD with nonlinear parametric regressors"). Per head, the memory is

    f_W(x) = x + LN(g_W(x)),    g_W(x) = x W + b                       model="linear"
                                g_W(x) = gelu(x W1 + b1) W2 + b2       model="mlp" (hidden 4D)

(TTT §2.7: residual and layer norm; gelu is the tanh approximation, as in TTT's code), in the
op layout of row vectors: W [D, D], W1 [D, hidden], W2 [hidden, D]. LN normalizes over D (eps
1e-6) with a learnable per-head affine (ln_weight, ln_bias) that belongs to the layer, not to
the fast state. The regression objective on token s is the squared error of Eq. 17-18 with
TTT's reconstruction target v_s - k_s (f_W(k_s) ~ v_s):

    l_s(W) = 1/2 || LN(g_W(k_s)) - (v_s - k_s) ||^2.

Mini-batch gradient descent (TTT §2.4, Eq. 6): the tokens are cut into mini-batches of
`mini_batch`; inside one, every gradient is taken at the mini-batch's start weights W_0 and
token t reads

    W_t = W_0 - sum_{s <= t in the mini-batch} eta_s grad l_s(W_0),    o_t = q_t + LN(g_{W_t}(q_t)),

the next mini-batch starting from its predecessor's last W. With mini_batch = 1 this is exact
online SGD (gradient at W_{t-1}). eta [B, T, H] is the step size of token s (the layer computes
it, e.g. base_lr * sigmoid(x w) / D as TTT §2.7); TTT's code further scales row t of the
mini-batch by a learnable 1/t, which a per-token eta cannot express and this op leaves out.

Forms
  recurrent  the definition above, token by token: gradients by torch.func.grad, so the outer
             backward differentiates through the inner one (the spec).
  chunk      TTT's dual form (§2.5): a mini-batch at once from closed-form gradients through
             the layer norm; the sums over s <= t are masked matmuls (numbered steps in
             `_chunk`). Only the pass from one mini-batch to the next is sequential.

State, decoding and packing. The state is the fast weights only, {"W": [B, H, D, D],
"b": [B, H, D]} (mlp: W1 [B, H, D, hidden], b1 [B, H, hidden], W2 [B, H, hidden, D],
b2 [B, H, D]); initial_state=None starts every sequence from the `params` entries. Mini-batches
restart at every call and at every packed sequence (cu_seqlens), so cutting a sequence at a
multiple of `mini_batch` and carrying the state equals one pass; any other cut is a different
function. Decoding one token per call (T = 1) therefore computes mini_batch = 1, exact online
SGD from the carried weights, not the mini-batch function the layer was trained with. Decoding
that IS the training function keeps the state of the last mini-batch boundary plus the r < b
tokens since then, runs the op on those r + 1 tokens from that state (one partial mini-batch;
cost O(b) per token) and moves the boundary state on every b tokens (tests/test_nonlinear.py,
`test_ttt_decoding`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ttr.ops.common import (
    check_cu_seqlens,
    check_form,
    check_like,
    check_qkv,
    check_tensor,
    compute_dtype,
    float32_under_autocast,
    time_steps,
    varlen,
)

FORMS = ("recurrent", "chunk")
MODELS = ("linear", "mlp")
FAST = {"linear": ("W", "b"), "mlp": ("W1", "b1", "W2", "b2")}  # keys of the fast state
LN_EPS = 1e-6  # as TTT


def ttt_params(H, D, model="linear", *, hidden=None, dtype=torch.float32, device=None,
               generator=None) -> dict[str, torch.Tensor]:
    """TTT's initialization: weights normal(0, 0.02), biases 0, LN weight 1 and bias 0.

    Plain tensors (the layer wraps them in nn.Parameter). Shapes as in `ttt`; hidden = 4 D.
    """
    _check_model(model)
    hidden = 4 * D if hidden is None else hidden
    kw = {"dtype": dtype, "device": device}
    normal = lambda *s: 0.02 * torch.randn(*s, generator=generator, **kw)
    ln = {"ln_weight": torch.ones(H, D, **kw), "ln_bias": torch.zeros(H, D, **kw)}
    if model == "linear":
        return {"W": normal(H, D, D), "b": torch.zeros(H, D, **kw), **ln}
    return {"W1": normal(H, D, hidden), "b1": torch.zeros(H, hidden, **kw),
            "W2": normal(H, hidden, D), "b2": torch.zeros(H, D, **kw), **ln}


def ttt(q, k, v, eta, params, *, model="linear", mini_batch=16, initial_state=None,
        output_final_state=False, cu_seqlens=None, form="chunk"):
    """TTT-Linear / TTT-MLP (see the module docstring).

    q, k, v: [B, T, H, D] (one D: the target is v - k and the output has q's residual);
    eta: [B, T, H] step sizes; params: the initial fast weights and the LN affine,
      linear {"W": [H, D, D], "b": [H, D], "ln_weight": [H, D], "ln_bias": [H, D]},
      mlp {"W1": [H, D, hidden], "b1": [H, hidden], "W2": [H, hidden, D], "b2": [H, D],
           "ln_weight", "ln_bias"};
    initial_state: None or the fast weights with a leading batch dim (N sequences with
    cu_seqlens), e.g. {"W": [B, H, D, D], "b": [B, H, D]}. params and state are in q's dtype or
    float32 for half-precision q. Returns o [B, T, H, D] (q's dtype) and the final state (the
    compute dtype: float32 for half-precision inputs) or None.
    """
    B, T, H, D, Dv = check_qkv(q, k, v)
    if Dv != D:
        raise ValueError(f"v: expected last dim D = {D} (that of k: TTT's target is v - k), "
                         f"got shape {tuple(v.shape)}")
    if eta is None:
        raise ValueError("eta: TTT needs step sizes of shape [B, T, H], got None")
    check_like("eta", eta, q, (B, T, H), "[B, T, H]")
    _check_model(model)
    check_form(form, FORMS)
    check_positive_int("mini_batch", mini_batch)
    check_cu_seqlens(cu_seqlens, q)
    shapes = _param_shapes(params, model, H, D)
    check_dict("params", params, shapes, q)
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    fast = FAST[model]
    check_dict("initial_state", initial_state, batched(shapes, fast, N), q)
    solve = _recurrent if form == "recurrent" else _chunk

    def run(q, k, v, eta, initial_state, output_final_state):
        dt = compute_dtype(q)
        q_, k_, v_, e_ = (x.to(dt) for x in (q, k, v, eta))
        p = {n: x.to(dt) for n, x in params.items()}
        if initial_state is None:
            w = {n: p[n].expand(q.shape[0], *p[n].shape) for n in fast}
        else:
            w = {n: initial_state[n].to(dt) for n in fast}
        # the spec in float32 under autocast; the chunk form takes autocast's matmuls
        with float32_under_autocast(q) if form == "recurrent" else contextlib.nullcontext():
            o, w = solve(q_, k_, v_, e_, (p["ln_weight"], p["ln_bias"]), w, model, mini_batch)
        return o.to(q.dtype), (w if output_final_state else None)

    tensors = {"q": q, "k": k, "v": v, "eta": eta}
    if cu_seqlens is not None:
        return varlen_dict(run, cu_seqlens, tensors, initial_state, output_final_state, fast)
    return run(**tensors, initial_state=initial_state, output_final_state=output_final_state)


# -- the spec: token by token, gradients by autograd ---------------------------------------------

def _ln(z, ln):
    """LN over the last dim with the per-head affine ln = (weight, bias), broadcast to z."""
    return F.layer_norm(z, z.shape[-1:], eps=LN_EPS) * ln[0] + ln[1]


def _inner(w, x, model):
    """g_W(x) for one token x [B, H, D] and fast weights w (dict of [B, H, ...])."""
    if model == "linear":
        return torch.einsum("bhi,bhij->bhj", x, w["W"]) + w["b"]
    h = F.gelu(torch.einsum("bhi,bhij->bhj", x, w["W1"]) + w["b1"], approximate="tanh")
    return torch.einsum("bhi,bhij->bhj", h, w["W2"]) + w["b2"]  # [B, H, D]


def _inner_loss(w, k, v, ln, model):
    """sum over (b, h) of l(W) = 1/2 ||LN(g_W(k)) - (v - k)||^2: the terms are independent, so
    the gradient of the sum is each head's own gradient."""
    return 0.5 * (_ln(_inner(w, k, model), ln) - (v - k)).square().sum()


def _recurrent(q, k, v, eta, ln, w, model, C):
    """form="recurrent": W_t = W_{t-1} - eta_t grad l_t(W_0), W_0 the mini-batch start."""
    grad = torch.func.grad(_inner_loss)
    outs = []
    for t, (q_t, k_t, v_t, e_t) in enumerate(time_steps(q, k, v, eta)):
        if t % C == 0:
            w0 = w  # every gradient of this mini-batch is taken here
        dw = grad(w0, k_t, v_t, ln, model)
        w = {n: w[n] - _expand(e_t, w[n]) * dw[n] for n in w}
        outs.append(q_t + _ln(_inner(w, q_t, model), ln))
    return torch.stack(outs, dim=1), w  # o [B, T, H, D]


def _expand(s, x):
    """A per-(b, h) scalar s [B, H] shaped to broadcast against x [B, H, ...]."""
    return s.reshape(*s.shape, *([1] * (x.ndim - s.ndim)))


# -- the chunk (dual) form -----------------------------------------------------------------------

def _ln_l2_grad(z, target, weight, bias):
    """d/dz of 1/2 ||weight * zhat + bias - target||^2, zhat = (z - mean) / std, in closed form
    (the layer norm's backward: remove dl/dzhat's mean and its component along zhat)."""
    zc = z - z.mean(-1, keepdim=True)
    std = (zc.square().mean(-1, keepdim=True) + LN_EPS).sqrt()
    zhat = zc / std
    gz = (weight * zhat + bias - target) * weight  # dl/dzhat
    return (gz - gz.mean(-1, keepdim=True) - zhat * (gz * zhat).mean(-1, keepdim=True)) / std


def _gelu_grad(z):
    """Derivative of the tanh-approximated gelu 1/2 z (1 + tanh(u)), u = c (z + 0.044715 z^3)."""
    c = math.sqrt(2.0 / math.pi)
    th = torch.tanh(c * (z + 0.044715 * z**3))
    return 0.5 * (1 + th) + 0.5 * z * (1 - th.square()) * c * (1 + 3 * 0.044715 * z.square())


def _chunk(q, k, v, eta, ln, w, model, C):
    """form="chunk": each mini-batch of c <= C tokens in closed form (TTT's dual form).

    q, k, v [B, T, H, D], eta [B, T, H], ln = (weight, bias) [H, D], w the fast weights
    (dict of [B, H, ...]), all in the compute dtype. Returns o [B, T, H, D] and the final w.
    """
    ln = tuple(x.unsqueeze(-2) for x in ln)  # [H, 1, D]
    outs = []
    pieces = (x.transpose(1, 2).split(C, dim=2) for x in (q, k, v, eta))
    for Q, K, V, E in zip(*pieces, strict=True):  # [B, H, c, D] x 3, [B, H, c]
        c = E.shape[-1]
        # Em[t, s] = eta_s for s <= t: the masked matmul Em @ X sums eta_s X_s over s <= t
        Em = E.unsqueeze(-2).expand(*E.shape, c).tril()  # [B, H, c, c]
        Ec = E.unsqueeze(-1)  # [B, H, c, 1]
        if model == "linear":
            W, b = w["W"], w["b"].unsqueeze(-2)  # [B, H, D, D], [B, H, 1, D]
            # 1. the keys through the start weights W_0
            Z = K @ W + b  # [B, H, c, D]
            # 2. G_s = dl_s/dZ_s at W_0; then grad_W l_s = k_s G_s^T and grad_b l_s = G_s
            G = _ln_l2_grad(Z, V - K, *ln)  # [B, H, c, D]
            # 3. queries through W_t, b_t: q_t W_t + b_t = q_t W_0 + b_0
            #    - sum_{s<=t} eta_s (q_t . k_s + 1) G_s
            Zq = Q @ W + b - ((Q @ K.mT + 1) * Em) @ G  # [B, H, c, D]
            # 4. the next mini-batch starts from the last token's weights
            w = {"W": W - K.mT @ (Ec * G), "b": w["b"] - (Ec * G).sum(-2)}
        else:
            W1, b1 = w["W1"], w["b1"].unsqueeze(-2)  # [B, H, D, hidden], [B, H, 1, hidden]
            W2, b2 = w["W2"], w["b2"].unsqueeze(-2)  # [B, H, hidden, D], [B, H, 1, D]
            # 1. the keys through the start weights
            Z1 = K @ W1 + b1  # [B, H, c, hidden]
            X2 = F.gelu(Z1, approximate="tanh")
            Z2 = X2 @ W2 + b2  # [B, H, c, D]
            # 2. backprop of l_s at W_0: grad_W2 = x2_s G2_s^T, grad_W1 = k_s G1_s^T
            G2 = _ln_l2_grad(Z2, V - K, *ln)  # [B, H, c, D]
            G1 = (G2 @ W2.mT) * _gelu_grad(Z1)  # [B, H, c, hidden]
            # 3. queries through layer 1 at W1_t, then layer 2 at W2_t, as in the linear case
            Xq = F.gelu(Q @ W1 + b1 - ((Q @ K.mT + 1) * Em) @ G1, approximate="tanh")
            Zq = Xq @ W2 + b2 - ((Xq @ X2.mT + 1) * Em) @ G2  # [B, H, c, D]
            # 4. the next mini-batch's start weights
            w = {"W1": W1 - K.mT @ (Ec * G1), "b1": w["b1"] - (Ec * G1).sum(-2),
                 "W2": W2 - X2.mT @ (Ec * G2), "b2": w["b2"] - (Ec * G2).sum(-2)}
        outs.append(Q + _ln(Zq, ln))
    return torch.cat(outs, dim=2).transpose(1, 2), w  # o [B, T, H, D]


# -- validation and packing of dict-valued parameters and states (titans.py uses them too) --------

def _check_model(model):
    if model not in MODELS:
        raise ValueError(f"model: expected one of {list(MODELS)}, got {model!r}")


def check_positive_int(name, x) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < 1:
        raise ValueError(f"{name}: expected a positive int, got {x!r}")
    return x


def _param_shapes(params, model, H, D):
    """{key: (shape, description)} that `params` must match; hidden is read from W1."""
    ln = {"ln_weight": ((H, D), "[H, D]"), "ln_bias": ((H, D), "[H, D]")}
    if model == "linear":
        return {"W": ((H, D, D), "[H, D, D]"), "b": ((H, D), "[H, D]"), **ln}
    W1 = params.get("W1") if isinstance(params, Mapping) else None
    hidden = W1.shape[-1] if isinstance(W1, torch.Tensor) and W1.ndim == 3 else 4 * D
    return {"W1": ((H, D, hidden), "[H, D, hidden]"), "b1": ((H, hidden), "[H, hidden]"),
            "W2": ((H, hidden, D), "[H, hidden, D]"), "b2": ((H, D), "[H, D]"), **ln}


def batched(shapes, keys, N):
    """The state's shapes: the `keys` entries of `shapes` with a leading batch dim N."""
    return {n: ((N, *shapes[n][0]), "[B, " + shapes[n][1][1:]) for n in keys}


def check_dict(name, d, shapes, ref):
    """`d` is None or a dict with exactly the keys of `shapes` ({key: (shape, description)}),
    each a float tensor of that shape on ref's device, in ref's dtype or its compute dtype."""
    if d is None:
        return
    if not isinstance(d, Mapping):
        raise TypeError(f"{name}: expected a dict with keys {list(shapes)}, got "
                        f"{type(d).__name__}")
    missing = [n for n in shapes if n not in d]
    unknown = [n for n in d if n not in shapes]
    if missing or unknown:
        why = ", ".join(f"{w} {ks}" for w, ks in (("missing", missing), ("unknown", unknown)) if ks)
        raise ValueError(f"{name}: expected keys {list(shapes)}, got {list(d)} ({why})")
    dtypes = list(dict.fromkeys((ref.dtype, compute_dtype(ref))))
    for key, (shape, what) in shapes.items():
        label = f"{name}[{key!r}]"
        check_tensor(label, d[key])
        check_like(label, d[key], ref, shape, what)
        if d[key].dtype not in dtypes:
            raise TypeError(f"{label}: expected dtype {' or '.join(map(str, dtypes))} (that of "
                            f"q or its compute dtype), got {d[key].dtype}")


def varlen_dict(run, cu_seqlens, tensors, initial_state, output_final_state, keys):
    """`common.varlen` for ops whose state is a dict: packs it as a tuple in the order `keys`."""
    def run_tuple(initial_state, output_final_state, **piece):
        s0 = None if initial_state is None else dict(zip(keys, initial_state, strict=True))
        o, s = run(**piece, initial_state=s0, output_final_state=output_final_state)
        return o, (None if s is None else tuple(s[n] for n in keys))

    s0 = None if initial_state is None else tuple(initial_state[n] for n in keys)
    o, s = varlen(run_tuple, cu_seqlens, tensors, s0, output_final_state)
    return o, (None if s is None else dict(zip(keys, s, strict=True)))

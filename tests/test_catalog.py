"""The generic suite over the catalogue: every entry of `ttr.catalog` is checked for

- its recurrence: the memory's output equals the update rule as its paper publishes it,
  written here independently (gates recomputed from the layer's raw parameters, the recurrence
  as a plain loop; PUBLISHED below, one function per entry);
- forms: the default (chunk/parallel) output == the recurrent form == token-by-token `step`;
- state: a split with the state carried equals one pass; `state_size()` equals the floats of
  the state tensors the layer actually returns;
- non-causal mode: at the last position it equals the causal output (both read m_T with q_T),
  earlier positions see the future; entries without it raise a clear error;
- gradients reach every parameter; a 2-layer model learns a small MQAR (slow-marked).

Feature maps themselves are tested against their papers in test_features.py; here the
learned/random ones are taken from the layer's FeatureMap module.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ttr import catalog
from ttr.nn import MixerState
from ttr.recipe import FunctionClass, Optimizer, Recipe, Weights
from ttr.reference import solve
from ttr.testing import assert_close

F64 = torch.float64
D_MODEL, HEADS, B, T = 16, 2, 2, 11
NAMES = catalog.names()


# Mini-batch memories with blocks of 4, so that T = 11 and 23 cross block boundaries.
BLOCKS = {"ttt_linear": {"mini_batch": 4}, "ttt_mlp": {"mini_batch": 4},
          "titans": {"chunk_size": 4}}


def make(name, seed=0, **overrides):
    torch.manual_seed(seed)
    kw = {**BLOCKS.get(name, {}), **overrides}
    return catalog.get(name, d_model=D_MODEL, n_heads=HEADS, **kw).to(F64)


def inputs(T=T, seed=1):
    return torch.randn(B, T, D_MODEL, generator=torch.Generator().manual_seed(seed), dtype=F64)


# -- an independent pipeline up to the memory -----------------------------------------------------

def projected(m, x):
    """q, k, v [B, T, H(, n), D] from the raw weights: projection, short conv (Eq. 56), QKNorm."""
    c = m.config

    def conv(mod, y):
        if mod is None:
            return y
        out = sum(mod.weight[:, i] * F.pad(y, (0, 0, i, 0))[:, :y.shape[1]]
                  for i in range(mod.kernel_size))  # y_t = sum_i w_i x_{t-i}
        return F.silu(out) if c.conv_silu else out

    n = c.keys_per_token
    q = conv(m.q_conv, x @ m.q_proj.weight.T).unflatten(-1, (c.n_heads, c.dk))
    kv = (c.n_heads, n) if n > 1 else (c.n_heads,)
    k = (conv(m.k_conv, x @ m.k_proj.weight.T).unflatten(-1, (*kv, c.dk))
         if m.k_proj is not None else None)
    v = conv(m.v_conv, x @ m.v_proj.weight.T).unflatten(-1, (*kv, c.dv))
    if c.qk_norm:
        q, k = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)  # no HGRN-2
    return q, k, v


def memory_output(m, x):
    """What the layer's memory answers, after the normalizer (Eq. 13) if the layer has one."""
    q, k, v, inp, _, _ = m.memory_inputs(x)
    o, _ = m.memory.run(m, q, k, v, inp, None, False, None)
    return o[..., :-1] / (o[..., -1:] + 1e-6) if m.config.normalize else o


# -- the published recurrences, as loops over t, state S [B, H, Dk, Dv] (o_t = S^T q_t) -------

def linear_loop(q, k, v, decay=None, normalize=False):
    """S_t = diag(decay_t) S_{t-1} + k_t v_t^T; decay [B, T, H] or [B, T, H, Dk] or None."""
    if normalize:
        v = torch.cat([v, torch.ones_like(v[..., :1])], -1)
    S = q.new_zeros(q.shape[0], q.shape[2], q.shape[3], v.shape[-1])
    out = []
    for t in range(q.shape[1]):
        if decay is not None:
            d = decay[:, t]
            S = S * (d[..., None] if d.ndim == 3 else d[..., None, None])
        S = S + k[:, t, ..., None] * v[:, t, :, None]
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    o = torch.stack(out, 1)
    return o[..., :-1] / (o[..., -1:] + 1e-6) if normalize else o


def delta_loop(q, k, v, beta, alpha=None, decay_l2=None):
    """S_t = alpha_t S - beta_t k (k^T alpha_t S - v^T) (Eq. 29, 41); with decay_l2 = lambda:
    the leaky LMS of Eq. 37, S_t = S - beta_t (k (k^T S - v^T) + lambda S)."""
    S = q.new_zeros(q.shape[0], q.shape[2], q.shape[3], v.shape[-1])
    out = []
    for t in range(q.shape[1]):
        kt, vt, bt = k[:, t], v[:, t], beta[:, t, :, None, None]
        if alpha is not None:
            S = alpha[:, t, :, None, None] * S
        grad = kt[..., None] * (torch.einsum("bhk,bhkv->bhv", kt, S) - vt)[:, :, None]
        if decay_l2 is not None:  # a float or a per-token [B, T, H] L2 strength
            lam = decay_l2 if isinstance(decay_l2, float) else decay_l2[:, t, :, None, None]
            grad = grad + lam * S
        S = S - bt * grad
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(out, 1)


def rls_loop(q, k, v, ridge, gamma=None, weight=None):
    """H_kk = gamma H_kk + w k k^T, H_kv likewise; o_t = H_kv^T (H_kk + ridge I)^-1 q_t."""
    Bq, Tq, H, Dk = q.shape
    Hkk = q.new_zeros(Bq, H, Dk, Dk)
    Hkv = q.new_zeros(Bq, H, Dk, v.shape[-1])
    out = []
    for t in range(Tq):
        g = 1.0 if gamma is None else gamma[:, t, :, None, None]
        w = 1.0 if weight is None else weight[:, t, :, None, None]
        Hkk = g * Hkk + w * k[:, t, :, :, None] * k[:, t, :, None, :]
        Hkv = g * Hkv + w * k[:, t, :, :, None] * v[:, t, :, None, :]
        x = torch.linalg.solve(Hkk + ridge * torch.eye(Dk, dtype=q.dtype), q[:, t, ..., None])
        out.append((Hkv.mT @ x)[..., 0])
    return torch.stack(out, 1)


def softmax_loop(logits_fn, v):
    """o_t = sum_{i<=t} softmax_i(logits_fn(t)[i]) v_i (Eq. 50)."""
    out = []
    for t in range(v.shape[1]):
        w = torch.softmax(logits_fn(t), dim=1)  # [B, t+1, H]
        out.append((w[..., None] * v[:, :t + 1]).sum(1))
    return torch.stack(out, 1)


def _lin(mod, x):
    return x @ mod.weight.T + (mod.bias if mod.bias is not None else 0)


def _features(m, x, q, k, v):
    phi = m.feature
    return linear_loop(phi(q), phi(k), v, normalize=True)


def _retnet(m, x, q, k, v):
    gamma = torch.tensor([1 - 2.0 ** (-5 - h) for h in range(HEADS)], dtype=F64)
    return linear_loop(q, k, v, gamma.expand(B, x.shape[1], HEADS))


def _gla(m, x, q, k, v):
    gate = m.gates[0]
    alpha = torch.sigmoid(_lin(gate.proj[1], _lin(gate.proj[0], x))) ** (1 / 16)
    return linear_loop(q, k, v, alpha.view_as(q))


def _gateloop(m, x, q, k, v):
    return linear_loop(q, k, v, torch.sigmoid(_lin(m.gates[0].proj, x)).view_as(q))


def _hgrn2(m, x, q, k, v):
    f = torch.sigmoid(_lin(m.gates[0].proj, x)).view_as(q)  # lower bound 0; k is not projected
    return linear_loop(q, 1 - f, v, f)


def _lru(m, x, q, k, v):
    gate = m.gates[0]
    lam = torch.exp(-torch.exp(gate.nu_log))  # [H, Dk]
    return linear_loop(q, k * gate.gamma_log.exp(), v, lam.expand_as(q))


def _mamba2(m, x, q, k, v):
    gate = m.gates[0]
    dt = F.softplus(_lin(gate.proj, x) + gate.dt_bias)  # Delta [B, T, H]
    return linear_loop(q, k, v * dt[..., None], torch.exp(dt * -gate.A_log.exp()))


def _rwkv6(m, x, q, k, v):
    gate = m.gates[0]
    w = torch.exp(-torch.exp(gate.d + _lin(gate.up, torch.tanh(_lin(gate.down, x))).view_as(k)))
    S = q.new_zeros(B, HEADS, k.shape[-1], v.shape[-1])
    out = []
    for t in range(x.shape[1]):  # wkv_t = S_{t-1} + diag(u) k v^T read by r, then decay
        kv = k[:, t, :, :, None] * v[:, t, :, None]
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S + gate.u[..., None] * kv))
        S = w[:, t, ..., None] * S + kv
    return torch.stack(out, 1)


def _mlstm(m, x, q, k, v):
    gate = m.gates[0]
    i = torch.exp(_lin(gate.i_proj, x))  # exponential input gate, unstabilized (gates moderate)
    f = torch.sigmoid(_lin(gate.f_proj, x))
    k = k / math.sqrt(k.shape[-1])
    C = q.new_zeros(B, HEADS, k.shape[-1], v.shape[-1])
    n = q.new_zeros(B, HEADS, k.shape[-1])
    out = []
    for t in range(x.shape[1]):  # xLSTM Eq. 19-21
        C = f[:, t, :, None, None] * C + i[:, t, :, None, None] * k[:, t, :, :, None] * v[:, t,
                                                                                           :, None]
        n = f[:, t, :, None] * n + i[:, t, :, None] * k[:, t]
        num = torch.einsum("bhk,bhkv->bhv", q[:, t], C)
        den = torch.einsum("bhk,bhk->bh", q[:, t], n).abs().clamp(min=1.0)
        out.append(num / den[..., None])
    return torch.stack(out, 1)


def _deltanet(m, x, q, k, v):
    return delta_loop(q, k, v, torch.sigmoid(_lin(m.gates[0].proj, x)))


def _longhorn(m, x, q, k, v):
    delta = F.softplus(_lin(m.gates[0].proj, x))
    eps = delta / (1 + delta * (k * k).sum(-1))  # Longhorn Eq. 9 / paper Eq. 31
    return delta_loop(q, k, v, eps)


def _nlms(m, x, q, k, v):
    return delta_loop(q, k, v, 1 / (k * k).sum(-1))  # paper Eq. 33


def _leaky_lms(m, x, q, k, v):  # paper Eq. 37 with lambda = 0.1, no reparameterization
    return delta_loop(q, k, v, torch.sigmoid(_lin(m.gates[0].proj, x)), decay_l2=0.1)


def _gated_deltanet(m, x, q, k, v):
    decay, step = m.gates
    alpha = torch.exp(-decay.A_log.exp() * F.softplus(_lin(decay.proj, x) + decay.dt_bias))
    return delta_loop(q, k, v, torch.sigmoid(_lin(step.proj, x)), alpha)


def _deltaproduct(m, x, q, k, v):
    beta = torch.sigmoid(_lin(m.gates[0].proj, x)).view(*k.shape[:4])  # [B, T, H, n]
    S = q.new_zeros(B, HEADS, k.shape[-1], v.shape[-1])
    out = []
    for t in range(x.shape[1]):  # DeltaProduct Eq. 4: n_h Householder-like steps per token
        for j in range(k.shape[3]):
            kj, vj = k[:, t, :, j], v[:, t, :, j]
            S = S - beta[:, t, :, j, None, None] * kj[..., None] * (
                torch.einsum("bhk,bhkv->bhv", kj, S) - vj)[:, :, None]
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(out, 1)


def _mesa(m, x, q, k, v):
    return rls_loop(q, k, v, 1.0)


def _mesanet(m, x, q, k, v):
    forget, step = m.gates
    return rls_loop(q, k, v, 1.0, torch.sigmoid(_lin(forget.proj, x)),
                    torch.sigmoid(_lin(step.proj, x)))


def _softmax(m, x, q, k, v):
    s = 1 / math.sqrt(q.shape[-1])  # Vaswani et al. Eq. 1
    return softmax_loop(lambda t: s * (k[:, :t + 1] * q[:, t:t + 1]).sum(-1), v)


def _softmax_qknorm(m, x, q, k, v):
    c = m.gates[0].log_scale.exp()[:, None]  # learned scale on the unit query
    bw = 2 * math.sqrt(q.shape[-1])  # Eq. 51's bandwidth
    return softmax_loop(lambda t: -((k[:, :t + 1] - c * q[:, t:t + 1]) ** 2).sum(-1) / bw, v)


def _kernel_regression(m, x, q, k, v):
    """Eq. 43 per prefix: o_t = V^T (k(K, K) + I)^-1 k(K, q_t), k(a, b) = exp(a.b / sqrt D)."""
    s, out = 1 / math.sqrt(q.shape[-1]), []
    for t in range(q.shape[1]):
        K, V = k[:, :t + 1].transpose(1, 2), v[:, :t + 1].transpose(1, 2)  # [B, H, t+1, D]
        gram = torch.exp(s * K @ K.mT) + torch.eye(t + 1, dtype=F64)
        kq = torch.exp(s * K @ q[:, t, :, :, None])  # [B, H, t+1, 1]
        out.append((V.mT @ torch.linalg.solve(gram, kq))[..., 0])
    return torch.stack(out, 1)


def _unnormalized_softmax(m, x, q, k, v):
    """Eq. 47: o_t = sum_{i<=t} exp(q_t.k_i / sqrt D) v_i."""
    s = 1 / math.sqrt(q.shape[-1])
    return torch.stack([(torch.exp(s * (k[:, :t + 1] * q[:, t:t + 1]).sum(-1))[..., None]
                         * v[:, :t + 1]).sum(1) for t in range(q.shape[1])], 1)


def _local_linear(m, x, q, k, v):
    recipe = Recipe(Weights.local(), FunctionClass.local_polynomial(1), Optimizer.exact(0.1))
    return solve(recipe, q, k, v)  # the float64 oracle: weighted least squares per query


def _ttt(m, x, q, k, v):
    """TTT (Sun et al. 2024, Eq. 6 and Section 2.7): mini-batch GD on
    1/2 ||LN(g_W(k)) - (v - k)||^2, gradients at the mini-batch start,
    o_t = q_t + LN(g_{W_t}(q_t))."""
    gate = m.gates[0]
    P, D, b = dict(gate.params), q.shape[-1], gate.block
    eta = gate.base * torch.sigmoid(_lin(gate.proj, x)) / D  # [B, T, H]
    fast = [n for n in P if not n.startswith("ln_")]
    W = {n: P[n].detach().expand(B, *P[n].shape).clone() for n in fast}

    def g(W, z):  # z [B, H, D]
        if gate.model == "linear":
            return torch.einsum("bhi,bhij->bhj", z, W["W"]) + W["b"]
        h = F.gelu(torch.einsum("bhi,bhij->bhj", z, W["W1"]) + W["b1"], approximate="tanh")
        return torch.einsum("bhi,bhij->bhj", h, W["W2"]) + W["b2"]

    def ln(z):
        return F.layer_norm(z, z.shape[-1:], eps=1e-6) * P["ln_weight"] + P["ln_bias"]

    out = []
    for a in range(0, x.shape[1], b):
        W0 = {n: w.detach().requires_grad_() for n, w in W.items()}
        for t in range(a, min(a + b, x.shape[1])):
            with torch.enable_grad():
                loss = 0.5 * (ln(g(W0, k[:, t])) - (v[:, t] - k[:, t])).square().sum()
                grads = torch.autograd.grad(loss, list(W0.values()))
            e = eta[:, t]
            W = {n: W[n] - e.view(*e.shape, *[1] * (W[n].ndim - 2)) * gr
                 for n, gr in zip(W0, grads, strict=True)}
            out.append(q[:, t] + ln(g(W, q[:, t])))
    return torch.stack(out, 1)


def _titans(m, x, q, k, v):
    """Titans (Behrouz et al. 2024, Eq. 13-14, Section 3.2): S_t = eta_t S - theta_t grad,
    M_t = (1 - alpha_t) M + S_t, gradients of 1/2 ||M(k) - v||^2 at the chunk's start memory."""
    gate = m.gates[0]
    theta, eta, alpha = torch.sigmoid(_lin(gate.proj, x)).chunk(3, dim=-1)
    theta = gate.lr_scale * theta
    P = dict(gate.params)
    Ws = [P[f"W{i}"].detach().expand(B, *P[f"W{i}"].shape).clone() for i in range(1, len(P) + 1)]
    Ss = [torch.zeros_like(w) for w in Ws]

    def M(Ws, z):  # z [B, H, Dk]
        for i, W in enumerate(Ws):
            z = torch.einsum("bhi,bhij->bhj", F.silu(z) if i else z, W)
        return z

    out = []
    for a in range(0, x.shape[1], gate.block):
        M0 = [w.detach().requires_grad_() for w in Ws]
        for t in range(a, min(a + gate.block, x.shape[1])):
            with torch.enable_grad():
                grads = torch.autograd.grad(0.5 * (M(M0, k[:, t]) - v[:, t]).square().sum(), M0)
            c = [z[:, t, :, None, None] for z in (eta, theta, alpha)]
            Ss = [c[0] * S - c[1] * gr for S, gr in zip(Ss, grads, strict=True)]
            Ws = [(1 - c[2]) * W + S for W, S in zip(Ws, Ss, strict=True)]
            out.append(M(Ws, q[:, t]))
    return torch.stack(out, 1)


PUBLISHED = {
    **{n: _features for n in ("performer", "rfa", "cosformer", "hedgehog", "based", "rebased",
                              "dijiang")},
    "linear_attention": lambda m, x, q, k, v: linear_loop(F.elu(q) + 1, F.elu(k) + 1, v,
                                                          normalize=True),
    "retnet": _retnet, "gla": _gla, "gateloop": _gateloop, "hgrn2": _hgrn2, "lru": _lru,
    "mamba2": _mamba2, "rwkv6": _rwkv6, "mlstm": _mlstm, "deltanet": _deltanet,
    "longhorn": _longhorn, "nlms": _nlms, "leaky_lms": _leaky_lms,
    "gated_deltanet": _gated_deltanet, "deltaproduct": _deltaproduct, "mesa": _mesa,
    "intention": _mesa, "mesanet": _mesanet, "softmax_attention": _softmax,
    "softmax_qknorm": _softmax_qknorm, "local_linear": _local_linear,
    "ttt_linear": _ttt, "ttt_mlp": _ttt, "titans": _titans,
    "kernel_regression": _kernel_regression, "unnormalized_softmax": _unnormalized_softmax,
}
# RFA's random Fourier features are not positive: the layer RMS-normalizes instead (Eq. 13
# does not apply), so its memory is compared unnormalized.
PUBLISHED["rfa"] = lambda m, x, q, k, v: linear_loop(m.feature(q), m.feature(k), v)


def test_every_entry_has_a_published_rule():
    assert sorted(PUBLISHED) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_recurrence_is_the_published_rule(name):
    m, x = make(name), inputs()
    with torch.no_grad():
        want = PUBLISHED[name](m, x, *projected(m, x))
        got = memory_output(m, x)
    assert_close(got, want, dtype=F64, what=f"{name}: memory vs published recurrence")


@pytest.mark.parametrize("name", NAMES)
def test_forms_and_step_decoding_agree(name):
    m, x = make(name), inputs()
    with torch.no_grad():
        default, _ = m(x)
        recurrent, _ = m(x, form=m.memory.step_form(m))
        state, steps = m.init_state(B), []
        for t in range(x.shape[1]):
            y, state = m.step(x[:, t], state)
            steps.append(y)
    assert_close(recurrent, default, dtype=F64, what=f"{name}: recurrent vs default form")
    assert_close(torch.stack(steps, 1), default, dtype=F64, what=f"{name}: step vs default")


@pytest.mark.parametrize("name", NAMES)
def test_split_with_state_equals_one_pass(name):
    m, x = make(name), inputs(T=23)
    with torch.no_grad():
        whole, _ = m(x)
        a, s = m(x[:, :9])
        b, _ = m(x[:, 9:], s)
    assert_close(torch.cat([a, b], 1), whole, dtype=F64, what=f"{name}: split vs whole")


def _floats(x) -> int:
    if x is None or isinstance(x, int):
        return 0
    if isinstance(x, torch.Tensor):
        return x.numel()
    if isinstance(x, dict):
        return sum(_floats(v) for v in x.values())
    return sum(_floats(v) for v in x)


@pytest.mark.parametrize("name", NAMES)
def test_state_size_counts_the_carried_state(name):
    m, x = make(name), inputs()
    _, state = m(x)
    assert isinstance(state, MixerState)
    assert _floats(state) == B * m.state_size(x.shape[1])


@pytest.mark.parametrize("name", NAMES)
def test_non_causal_reads_the_whole_sequence(name):
    causal = make(name)
    if not causal.supports_non_causal:
        with pytest.raises(ValueError, match="causal"):
            make(name, causal=False)
        return
    m, x = make(name, causal=False), inputs()
    with torch.no_grad():
        y, state = m(x)
        want, _ = causal(x)
        x2 = x.clone()
        x2[:, -1] += 1.0
        y2, _ = m(x2)
    assert state is None
    assert_close(y[:, -1], want[:, -1], dtype=F64, what=f"{name}: last position reads m_T")
    assert (y2[:, 0] - y[:, 0]).abs().max() > 1e-6, "the first query must see the last token"
    with pytest.raises(ValueError, match="causal"):
        m.step(x[:, 0])


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_parameter(name):
    m, x = make(name), inputs()
    y, _ = m(x)
    y.square().mean().backward()
    for pname, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}.{pname}"
        assert p.grad.abs().sum() > 0, f"{name}.{pname} gets a zero gradient"


@pytest.mark.parametrize("direction", ["leaky_to_gated", "gated_to_leaky"])
def test_eq41_gated_deltanet_is_leaky_lms(direction):
    """Eq. 37-41: leaky LMS (step beta, L2 lambda) = Gated DeltaNet with alpha = 1 - beta lambda,
    eta = beta / alpha, v' = alpha v; and back: beta = alpha eta, lambda = (1 - alpha) / beta,
    v = v' / alpha. Per-token lambda, so the map is exact in both directions."""
    from ttr.ops import delta_rule

    gen = torch.Generator().manual_seed(3)
    q, k = (F.normalize(torch.randn(B, T, HEADS, 6, generator=gen, dtype=F64), dim=-1)
            for _ in range(2))
    v = torch.randn(B, T, HEADS, 5, generator=gen, dtype=F64)
    u = torch.rand(2, B, T, HEADS, generator=gen, dtype=F64)
    if direction == "leaky_to_gated":
        beta, lam = 0.05 + 0.9 * u[0], 0.9 * u[1]
        alpha = 1 - beta * lam
        gated, _ = delta_rule(q, k, v * alpha[..., None], beta / alpha, alpha.log(),
                              form="recurrent")
        assert_close(gated, delta_loop(q, k, v, beta, decay_l2=lam), dtype=F64)
    else:
        alpha, eta = 0.5 + 0.5 * u[0], 0.05 + 0.9 * u[1]
        gated, _ = delta_rule(q, k, v, eta, alpha.log())
        beta = alpha * eta
        leaky = delta_loop(q, k, v / alpha[..., None], beta, decay_l2=(1 - alpha) / beta)
        assert_close(gated, leaky, dtype=F64)


def test_get_rejects_unknown_names_and_overrides():
    with pytest.raises(ValueError, match="catalogue entry"):
        catalog.get("transformer-xl", d_model=8)
    with pytest.raises(ValueError, match="unknown overrides"):
        catalog.get("gla", d_model=8, n_heads=2, ridge=1.0)
    m = catalog.get("mesa", d_model=8, n_heads=2, ridge=0.5, conv_k=0)
    assert m.recipe.optimizer.ridge == 0.5 and m.k_conv is None


def test_table_lists_every_entry():
    text = catalog.table(d_model=64, n_heads=2, seq_len=128)
    for name in NAMES:
        assert f"| {name} |" in text
    assert len(NAMES) >= 28

"""Every fast form of every op equals its recurrent form (the spec), and the op contract holds:
gradients, carrying the state across a split, step-by-step decoding, packed `cu_seqlens`.

Inputs come from one table of awkward sizes and one table of decays (none, scalar, per-dimension;
moderate, near 0 = g -20 per step, near 1 = g -1e-4 per step).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import ttr.ops.common as common
import ttr.ops.linear_chunk as linear_module
import ttr.ops.linear_per_dim as per_dim_module
import ttr.ops.rls_chunk as rls_chunk_module
from ttr.ops import (
    delta_product,
    delta_rule,
    delta_rule_step,
    linear_attention,
    linear_attention_step,
    momentum_delta_rule,
    rls,
    rls_step,
    softmax_attention,
    softmax_attention_step,
)
from ttr.testing import assert_close

F64, F32 = torch.float64, torch.float32


FAST_FORMS = {"linear_attention": ("parallel", "chunk"), "delta_rule": ("chunk",),
              "rls": ("parallel", "chunk"), "softmax_attention": ("fused",)}
ALL_FORMS = {"linear_attention": ("recurrent", "parallel", "chunk"),
             "delta_rule": ("recurrent", "chunk"), "rls": ("recurrent", "parallel", "chunk"),
             "softmax_attention": ("recurrent", "fused")}
DECAY_KINDS = {"linear_attention": ("none", "scalar", "dim"), "delta_rule": ("none", "scalar"),
               "rls": ("none", "scalar"), "softmax_attention": ("none",)}
def kinds(op, form):  # every form supports its op's decay kinds
    return DECAY_KINDS[op]

# (B, T, H, Dk, Dv, chunk_size)
SIZES = [
    pytest.param(1, 1, 1, 4, 4, 16, id="T1"),
    pytest.param(2, 37, 3, 8, 5, 16, id="B2-T37-H3-C16"),
    pytest.param(1, 40, 2, 60, 24, 16, id="D60-Dv24"),
    pytest.param(2, 32, 1, 5, 7, 32, id="T=C"),
    pytest.param(1, 23, 2, 6, 3, 7, id="C7-ragged"),
    pytest.param(1, 100, 2, 6, 5, 48, id="T100-C48"),  # per-dim decay pads C = 48 to 64
]
# (kind, strength): strength is the range of -g per step
DECAYS = [
    pytest.param("none", None, id="no-decay"),
    pytest.param("scalar", (0.01, 1.0), id="scalar"),
    pytest.param("scalar", (20.0, 20.0), id="scalar-near0"),
    pytest.param("scalar", (1e-4, 1e-4), id="scalar-near1"),
    pytest.param("dim", (0.01, 1.0), id="dim"),
    pytest.param("dim", (20.0, 20.0), id="dim-near0"),
    pytest.param("dim", (1e-4, 1e-4), id="dim-near1"),
]


def make_inputs(op, B, T, H, Dk, Dv, decay="scalar", strength=(0.01, 1.0), *, dtype=F64,
                seed=0, variant=0):
    """The tensors and options of one op call, as a dict of keyword arguments."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=F64)
    u = lambda *s: torch.rand(*s, generator=gen, dtype=F64)
    q, k, v = r(B, T, H, Dk), r(B, T, H, Dk), r(B, T, H, Dv)
    x = {"q": q, "k": k, "v": v}
    if decay != "none":
        lo, hi = strength
        shape = (B, T, H, Dk) if decay == "dim" else (B, T, H)
        x["g"] = -(lo + (hi - lo) * u(*shape))
    if op == "delta_rule":
        x["k"] = F.normalize(k, dim=-1)  # keeps (I - beta k k^T) a contraction
        x["beta"] = u(B, T, H)
    elif op == "rls":
        x["beta"] = None if variant % 2 == 0 else 0.5 + u(B, T, H)
        x["ridge"] = 0.5 if variant % 3 != 2 else 0.2 + u(Dk)
    elif op == "softmax_attention":
        x["q"], x["k"] = 0.5 * q, 0.5 * k
        x.update([{}, {"bandwidth": 3.0}, {"scale": 0.7}][variant % 3])
    return {n: (t.to(dtype) if isinstance(t, torch.Tensor) else t) for n, t in x.items()}


def make_state(op, N, H, Dk, Dv, *, dtype=F64, seed=1, Tc=3):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=F64).to(dtype)
    if op == "rls":
        A = r(N, H, Dk, 2 * Dk)
        return (A @ A.mT / (2 * Dk), r(N, H, Dk, Dv))
    if op == "softmax_attention":
        return (0.5 * r(N, Tc, H, Dk), r(N, Tc, H, Dv))
    return 0.5 * r(N, H, Dk, Dv)


def call(op, x, form, **kw):
    x = dict(x)
    q, k, v = x.pop("q"), x.pop("k"), x.pop("v")
    fn = {"linear_attention": linear_attention, "delta_rule": delta_rule, "rls": rls,
          "softmax_attention": softmax_attention}[op]
    if op == "delta_rule":
        return fn(q, k, v, x.pop("beta"), x.pop("g", None), form=form, **x, **kw)
    return fn(q, k, v, **x, form=form, **kw)


def step(op, x, t, state):
    """One `*_step` call on token t of the inputs x."""
    q, k, v = x["q"][:, t], x["k"][:, t], x["v"][:, t]
    g = None if x.get("g") is None else x["g"][:, t]
    beta = None if x.get("beta") is None else x["beta"][:, t]
    if op == "linear_attention":
        return linear_attention_step(q, k, v, g, state)
    if op == "delta_rule":
        return delta_rule_step(q, k, v, beta, g, state)
    if op == "rls":
        return rls_step(q, k, v, g, beta, state, ridge=x["ridge"])
    return softmax_attention_step(q, k, v, state, scale=x.get("scale"),
                                  bandwidth=x.get("bandwidth"))


def assert_states(actual, expected, dtype=F64, tol=None, what="state"):
    if isinstance(expected, torch.Tensor):
        assert_close(actual, expected, dtype, tol, what)
    else:
        assert len(actual) == len(expected), what
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_states(a, e, dtype, tol, f"{what}[{i}]")


def _cases(kinds_of=DECAY_KINDS, forms_of=FAST_FORMS):
    out = []
    for op, forms in forms_of.items():
        for form in forms:
            for d in DECAYS:
                if d.values[0] in kinds_of[op] and d.values[0] in kinds(op, form):
                    out.append(pytest.param(op, form, *d.values, id=f"{op}-{form}-{d.id}"))
    return out


# -- fast forms == recurrent ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("B,T,H,Dk,Dv,C", SIZES)
@pytest.mark.parametrize("op,form,decay,strength", _cases())
def test_form_equals_recurrent(op, form, decay, strength, B, T, H, Dk, Dv, C, dtype):
    x = make_inputs(op, B, T, H, Dk, Dv, decay, strength, seed=T + Dk, variant=T + Dk)
    s0 = make_state(op, B, H, Dk, Dv)
    kw = {} if op == "softmax_attention" else {"chunk_size": C}
    # the spec in float64; the fast form in `dtype`
    o_ref, s_ref = call(op, x, "recurrent", initial_state=s0, output_final_state=True)
    cast = lambda t: t.to(dtype) if isinstance(t, torch.Tensor) else t
    xd = {n: cast(t) for n, t in x.items()}
    s0d = cast(s0) if isinstance(s0, torch.Tensor) else tuple(cast(s) for s in s0)
    o, s = call(op, xd, form, initial_state=s0d, output_final_state=True, **kw)
    assert o.dtype == dtype
    tol = 1e-10 if dtype == F64 else 1e-4
    assert_close(o, o_ref, tol=tol, what=f"{op} {form} output")
    assert_states(s, s_ref, tol=tol, what=f"{op} {form} final state")


def test_softmax_bandwidth_is_gaussian_kernel_and_eq51():
    """Eq. 50 with the Gaussian kernel, and Eq. 51: unit-norm q, k with bandwidth 2 sqrt(Dk) is
    softmax attention with scale 1/sqrt(Dk)."""
    x = make_inputs("softmax_attention", 2, 19, 2, 6, 4)
    q, k, v = x["q"], x["k"], x["v"]
    o, _ = softmax_attention(q, k, v, bandwidth=1.7)
    t = 11
    w = torch.exp(-((k[:, : t + 1] - q[:, t : t + 1]) ** 2).sum(-1) / 1.7)  # [B, t+1, H]
    want = (w.unsqueeze(-1) * v[:, : t + 1]).sum(1) / w.sum(1).unsqueeze(-1)
    assert_close(o[:, t], want, tol=1e-12)
    qn, kn = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    o1, _ = softmax_attention(qn, kn, v, bandwidth=2 * math.sqrt(6))
    o2, _ = softmax_attention(qn, kn, v)
    assert_close(o1, o2, tol=1e-12)


# -- gradients ------------------------------------------------------------------------------------

@pytest.mark.parametrize("op,form,decay", [
    pytest.param(op, form, kind, id=f"{op}-{form}-{kind}")
    for op, forms in ALL_FORMS.items() for form in forms for kind in kinds(op, form)
] + [pytest.param("softmax_attention", f, "bandwidth", id=f"softmax_attention-{f}-bandwidth")
     for f in ("recurrent", "fused")])
def test_gradcheck(op, form, decay):
    # chunks of 4 over T = 5: the per-dimension path's split in halves has two levels, and
    # the chunk-state passing carries a state from one chunk to the next
    B, T, H, Dk, Dv = 1, 5, 1, 3, 2
    variant = 1 if decay == "bandwidth" else 5  # rls: beta given and ridge a tensor
    x = make_inputs(op, B, T, H, Dk, Dv, "none" if decay == "bandwidth" else decay, (0.1, 1.0),
                    seed=3, variant=variant)
    s0 = make_state(op, B, H, Dk, Dv, Tc=2)
    names = [n for n, t in x.items() if isinstance(t, torch.Tensor)]
    s0_list = [s0] if isinstance(s0, torch.Tensor) else list(s0)
    leaves = [x[n].clone().requires_grad_() for n in names] + [
        s.clone().requires_grad_() for s in s0_list]
    kw = {} if op == "softmax_attention" else {"chunk_size": 4}

    def f(*args):
        xi = dict(x, **dict(zip(names, args[: len(names)], strict=True)))
        st = args[len(names)] if isinstance(s0, torch.Tensor) else tuple(args[len(names):])
        o, s = call(op, xi, form, initial_state=st, output_final_state=True, **kw)
        return (o,) + ((s,) if isinstance(s, torch.Tensor) else tuple(s))

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-6, rtol=1e-5)


# -- state carry-over, decoding, packing ----------------------------------------------------------

SPLIT_CASES = [pytest.param(op, form, kind, id=f"{op}-{form}-{kind}")
               for op, forms in ALL_FORMS.items() for form in forms
               for kind in kinds(op, form)]


@pytest.mark.parametrize("split", [1, 13])
@pytest.mark.parametrize("op,form,decay", SPLIT_CASES)
def test_state_carry_over(op, form, decay, split):
    B, T, H, Dk, Dv = 2, 29, 2, 5, 4
    x = make_inputs(op, B, T, H, Dk, Dv, decay, seed=7, variant=4)
    kw = {} if op == "softmax_attention" else {"chunk_size": 8}
    o, s = call(op, x, form, output_final_state=True, **kw)
    part = lambda a, b: {n: (t[:, a:b] if isinstance(t, torch.Tensor) and t.ndim >= 3 else t)
                         for n, t in x.items()}
    o1, s1 = call(op, part(0, split), form, output_final_state=True, **kw)
    o2, s2 = call(op, part(split, T), form, initial_state=s1, output_final_state=True, **kw)
    assert_close(torch.cat([o1, o2], dim=1), o, tol=1e-10, what="split output")
    assert_states(s2, s, tol=1e-10)


@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "initial-state"])
@pytest.mark.parametrize("op,form,decay", SPLIT_CASES)
def test_step_decoding(op, form, decay, with_state):
    B, T, H, Dk, Dv = 2, 9, 2, 5, 4
    x = make_inputs(op, B, T, H, Dk, Dv, decay, seed=11, variant=5)
    s0 = make_state(op, B, H, Dk, Dv) if with_state else None
    kw = {} if op == "softmax_attention" else {"chunk_size": 4}
    o, s = call(op, x, form, initial_state=s0, output_final_state=True, **kw)
    state, outs = s0, []
    for t in range(T):
        o_t, state = step(op, x, t, state)
        outs.append(o_t)
    assert_close(torch.stack(outs, dim=1), o, tol=1e-10, what="decoded output")
    assert_states(state, s, tol=1e-10)


@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "initial-state"])
@pytest.mark.parametrize("op,form,decay", SPLIT_CASES)
def test_cu_seqlens(op, form, decay, with_state):
    lens = [5, 1, 13, 9]
    H, Dk, Dv = 2, 5, 4
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    x = make_inputs(op, 1, sum(lens), H, Dk, Dv, decay, seed=13, variant=5)
    s0 = make_state(op, len(lens), H, Dk, Dv) if with_state else None
    kw = {} if op == "softmax_attention" else {"chunk_size": 4}
    o, s = call(op, x, form, initial_state=s0, output_final_state=True, cu_seqlens=cu, **kw)
    outs = []
    for i, (a, b) in enumerate(zip(cu.tolist(), cu.tolist()[1:], strict=False)):
        xi = {n: (t[:, a:b] if isinstance(t, torch.Tensor) and t.ndim >= 3 else t)
              for n, t in x.items()}
        si = None
        if s0 is not None:
            si = s0[i : i + 1] if isinstance(s0, torch.Tensor) else tuple(z[i : i + 1] for z in s0)
        oi, fi = call(op, xi, form, initial_state=si, output_final_state=True, **kw)
        outs.append(oi)
        if op == "softmax_attention":  # caches of different lengths: a list of pairs
            assert_states(s[i], fi, what=f"final cache {i}")
        else:
            want = fi[0] if isinstance(fi, torch.Tensor) else tuple(z[0] for z in fi)
            got = s[i] if isinstance(s, torch.Tensor) else tuple(z[i] for z in s)
            assert_states(got, want, what=f"final state {i}")
    assert_close(o, torch.cat(outs, dim=1), tol=1e-12, what="packed output")


@pytest.mark.parametrize("lens,padded", [([5, 1, 13, 9], True), ([1, 2, 20], False)],
                         ids=["padded-batch", "loop"])
@pytest.mark.parametrize("op,form,decay", [("linear_attention", "chunk", "dim"),
                                           ("delta_rule", "chunk", "scalar"),
                                           ("rls", "chunk", "none"),
                                           ("rls", "chunk", "scalar")])
def test_cu_seqlens_gradients(op, form, decay, lens, padded, monkeypatch):
    """Packed input runs as one zero-padded batch when padding at most doubles the tokens, else
    as a loop: either way, values and gradients (inputs and initial states) equal one call per
    sequence."""
    calls, padded_run = [], common._padded
    monkeypatch.setattr(common, "_padded", lambda *a: calls.append(1) or padded_run(*a))
    H, Dk, Dv = 2, 5, 4
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())
    x = make_inputs(op, 1, sum(lens), H, Dk, Dv, decay, seed=17, variant=1)
    s0 = make_state(op, len(lens), H, Dk, Dv)
    s0 = [s0] if isinstance(s0, torch.Tensor) else list(s0)
    names = [n for n, t in x.items() if isinstance(t, torch.Tensor) and t.ndim >= 3]
    w = torch.randn(1, sum(lens), H, Dv, dtype=F64)

    def loss(packed, *leaves):
        xi = {**x, **dict(zip(names, leaves[:len(names)], strict=True))}
        states = leaves[len(names):]
        state = states[0] if len(states) == 1 else tuple(states)
        if packed:
            o, _ = call(op, xi, form, initial_state=state, cu_seqlens=cu, chunk_size=4)
        else:
            outs = []
            for i, (a, b) in enumerate(itertools.pairwise(cu.tolist())):
                xs = {n: (t[:, a:b] if n in names else t) for n, t in xi.items()}
                si = (state[i:i + 1] if isinstance(state, torch.Tensor)
                      else tuple(z[i:i + 1] for z in state))
                outs.append(call(op, xs, form, initial_state=si, chunk_size=4)[0])
            o = torch.cat(outs, dim=1)
        return (o * w).sum()

    leaves = [x[n].clone().requires_grad_() for n in names] + [
        z.clone().requires_grad_() for z in s0]
    got = torch.autograd.grad(loss(True, *leaves), leaves)
    assert calls == ([1] if padded else [])
    want = torch.autograd.grad(loss(False, *leaves), leaves)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert_close(a, b, tol=1e-12, what=f"gradient {i}")


@pytest.mark.parametrize("form", ALL_FORMS["softmax_attention"])
def test_softmax_cu_seqlens_caches_feed_back(form):
    """Packed final caches differ in length, so they come back as a list of N pairs; that list
    is accepted as the next call's initial_state."""
    lens = [3, 6]
    cu = torch.tensor([0, 3, 9], dtype=torch.int32)
    x = make_inputs("softmax_attention", 1, 9, 2, 5, 4, "none", variant=1)
    _, caches = call("softmax_attention", x, form, output_final_state=True, cu_seqlens=cu)
    assert [c[0].shape[1] for c in caches] == lens
    y = make_inputs("softmax_attention", 1, 9, 2, 5, 4, "none", seed=5, variant=1)
    o, _ = call("softmax_attention", y, form, initial_state=caches, cu_seqlens=cu)
    for i, (a, b) in enumerate([(0, 3), (3, 9)]):
        yi = {n: (t[:, a:b] if isinstance(t, torch.Tensor) else t) for n, t in y.items()}
        oi, _ = call("softmax_attention", yi, form, initial_state=caches[i])
        assert_close(o[:, a:b], oi, tol=1e-12)


# -- precision and long sequences ---------------------------------------------------------------

@pytest.mark.parametrize("op,form", [pytest.param(op, f, id=f"{op}-{f}")
                                     for op, forms in ALL_FORMS.items() for f in forms])
def test_half_precision_keeps_dtype(op, form):
    decay = kinds(op, form)[-1]
    x = make_inputs(op, 1, 20, 2, 8, 8, decay, seed=17, variant=1)
    o_ref, _ = call(op, x, "recurrent")
    xb = {n: (t.to(torch.bfloat16) if isinstance(t, torch.Tensor) else t) for n, t in x.items()}
    kw = {} if op == "softmax_attention" else {"chunk_size": 8}
    o, _ = call(op, xb, form, **kw)
    assert o.dtype == torch.bfloat16
    assert_close(o, o_ref, dtype=torch.bfloat16, what=f"{op} {form} bf16")


def _decayed_op(name, T, D, g_value):
    """(op, positional inputs [1, T, 1, ...], keyword options) of a decayed memory for the
    long-sequence test: unit-norm keys and step sizes in (0, 1), as the delta rules need."""
    gen = torch.Generator().manual_seed(1)
    q, v = (torch.randn(1, T, 1, D, generator=gen) for _ in range(2))
    k = F.normalize(torch.randn(1, T, 1, D, generator=gen), dim=-1)
    beta, g = torch.rand(1, T, 1, generator=gen), torch.full((1, T, 1), g_value)
    if name == "delta_rule":
        return delta_rule, (q, k, v, beta, g), {}
    if name == "delta_product":  # two steps per token
        k2 = F.normalize(torch.randn(1, T, 1, 2, D, generator=gen), dim=-1)
        v2 = torch.randn(1, T, 1, 2, D, generator=gen)
        return delta_product, (q, k2, v2, torch.rand(1, T, 1, 2, generator=gen), g), {}
    if name == "momentum_delta_rule":
        # its chunk form steps with gradients taken at the chunk start (mini-batch GD): stable
        # only while a chunk's summed steps stay small, sum_t beta_t k_t k_t^T / (1 - mu) < 2
        return momentum_delta_rule, (q, k, v, 0.02 * beta,
                                     0.9 * torch.rand(1, T, 1, generator=gen), g), {}
    return rls, (q, k, v, g), {"ridge": 1.0}  # the chunk form is conjugate gradient


@pytest.mark.parametrize("name", ["delta_rule", "delta_product", "momentum_delta_rule", "rls"])
@pytest.mark.parametrize("g_value", [-20.0, -1e-4], ids=["near0", "near1"])
def test_decayed_ops_long_sequence_finite(name, g_value):
    """T = 65536 in float32 through each decayed op's chunk form (the gated delta rule's
    decay-matrix path near 0, its factored path near 1): outputs and the final state finite,
    and the last steps, from the long prefix's state, equal the recurrent spec."""
    T, D, tail = 65536, 8, 24
    op, args, kw = _decayed_op(name, T, D, g_value)
    a = T - tail
    o, s = op(*(x[:, :a] for x in args), output_final_state=True, form="chunk", **kw)
    states = [s] if isinstance(s, torch.Tensor) else list(s)
    assert bool(torch.isfinite(o).all()) and all(bool(torch.isfinite(x).all()) for x in states)
    rest = [x[:, a:] for x in args]
    o_tail, _ = op(*rest, initial_state=s, form="chunk", chunk_size=8, **kw)
    # the momentum op's chunk form is its own function, whose loop spec is "chunk_recurrent"
    spec = "chunk_recurrent" if name == "momentum_delta_rule" else "recurrent"
    o_ref, _ = op(*rest, initial_state=s, form=spec, chunk_size=8, **kw)
    assert_close(o_tail, o_ref, tol=1e-3 if name == "rls" else None, what="chunk vs recurrent")


@pytest.mark.parametrize("decay", ["scalar", "dim"])
@pytest.mark.parametrize("g_value", [-20.0, -1e-4], ids=["near0", "near1"])
def test_linear_attention_long_sequence_finite(decay, g_value):
    """T = 65536 in float32: the total decay is e^-1.3e6 (near 0) or e^-6.6 (near 1)."""
    T, D, tail = 65536, 16, 40
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, T, 1, D, generator=gen) for _ in range(3))
    g = torch.full((1, T, 1, D) if decay == "dim" else (1, T, 1), g_value)
    a = T - tail
    o, s = linear_attention(q[:, :a], k[:, :a], v[:, :a], g[:, :a], output_final_state=True)
    assert bool(torch.isfinite(o).all()) and bool(torch.isfinite(s).all())
    # the last steps, from the long prefix's state, agree with the recurrent spec
    args = (q[:, a:], k[:, a:], v[:, a:], g[:, a:])
    o_tail, _ = linear_attention(*args, initial_state=s, form="chunk", chunk_size=16)
    o_ref, _ = linear_attention(*args, initial_state=s, form="recurrent")
    assert_close(o_tail, o_ref, what="chunk vs recurrent tail")


def test_rls_parallel_long_decay():
    """T = 4096 with g = -0.1: the cumulative decay e^-409.6 would overflow a naive exp(-G) form."""
    T, Dk, Dv = 4096, 4, 3
    x = make_inputs("rls", 1, T, 1, Dk, Dv, "scalar", (0.1, 0.1), seed=19, variant=1)
    o_rec, _ = call("rls", x, "recurrent")
    o64, _ = call("rls", x, "parallel")
    assert_close(o64, o_rec, tol=1e-10)
    x32 = {n: (t.float() if isinstance(t, torch.Tensor) else t) for n, t in x.items()}
    o32, _ = call("rls", x32, "parallel")
    assert_close(o32, o_rec)


@pytest.mark.parametrize("per_dim", [False, True], ids=["scalar", "per_dim"])
@pytest.mark.parametrize("form", ["chunk", "parallel"])
@pytest.mark.parametrize("g_value", [-20.0, -5.0, -0.01])
def test_linear_attention_decay_gradient_float32(form, g_value, per_dim):
    """Under strong decay the gradient w.r.t. g is tiny; float32 forms must still get it right
    (segment sums, not differences of cumulative sums: see decay.segment_sums), for a scalar
    and a per-dimension decay (chunk: across and within GLA's sub-chunks)."""
    gen = torch.Generator().manual_seed(0)
    B, T, H, D = 1, 50, 2, 4
    q, k, v, w = (torch.randn(B, T, H, D, generator=gen, dtype=F64) for _ in range(4))
    shape = (B, T, H, D) if per_dim else (B, T, H)
    g = g_value * (0.5 + torch.rand(*shape, generator=gen, dtype=F64))
    grads = {}
    for name, dtype, f in (("ref", F64, "recurrent"), ("fast", F32, form)):
        gg = g.detach().to(dtype).clone().requires_grad_()
        o, _ = linear_attention(q.to(dtype), k.to(dtype), v.to(dtype), gg, form=f,
                                chunk_size=32 if per_dim else 16)
        (o * w.to(dtype)).sum().backward()
        grads[name] = gg.grad
    assert_close(grads["fast"], grads["ref"], tol=1e-4, what=f"{form} dL/dg at g={g_value}")


def test_per_dim_scores_backward_takes_any_gradient_layout():
    # _PerDimScores views its incoming gradient per level: an expanded (stride-0) gradient, as
    # from A.sum(), must give the same result as a materialized one
    gen = torch.Generator().manual_seed(5)
    q, k = (torch.randn(1, 2, 3, 8, 4, generator=gen, dtype=F64, requires_grad=True)
            for _ in range(2))
    g = (-torch.rand(1, 2, 3, 8, 4, generator=gen, dtype=F64)).requires_grad_()
    expanded = torch.autograd.grad(per_dim_module.intra_chunk_per_dim(q, k, g).sum(), (q, k, g))
    ones = torch.ones(1, 2, 3, 8, 8, dtype=F64)
    dense = torch.autograd.grad(per_dim_module.intra_chunk_per_dim(q, k, g), (q, k, g), ones)
    for a, b in zip(expanded, dense, strict=True):
        assert_close(a, b, tol=1e-14)


@pytest.mark.parametrize("strong", [False, True])
def test_scalar_decay_factored_only_when_every_chunk_is_mild(strong, monkeypatch):
    """Scalar decay: when every chunk decays by at most FACTOR_SPAN the chunk form factors the
    decay through the chunk start (_chunk_factored); one stronger chunk sends the call
    down the exact decay-matrix path. Values and float64 gradients equal the recurrence both
    ways."""
    gen = torch.Generator().manual_seed(12)
    B, T, H, D, C = 2, 48, 2, 4, 16
    q, k, v, w = (torch.randn(B, T, H, D, generator=gen, dtype=F64) for _ in range(4))
    g = -0.25 * torch.rand(B, T, H, generator=gen, dtype=F64)  # chunk decays down to ~e^-4
    if strong:
        g[1, 20, 1] = -6.0
    calls = []
    factored = linear_module._chunk_factored
    monkeypatch.setattr(linear_module, "_chunk_factored",
                        lambda *a: calls.append(1) or factored(*a))
    leaves = [x.clone().requires_grad_() for x in (q, k, v, g)]
    out = {}
    for form in ("chunk", "recurrent"):
        o, s = linear_attention(*leaves, form=form, chunk_size=C, output_final_state=True)
        out[form] = (o, s, torch.autograd.grad((o * w).sum() + s.sum(), leaves))
    assert calls == ([] if strong else [1])
    (o, s, grads), (o_ref, s_ref, grads_ref) = out["chunk"], out["recurrent"]
    assert_close(o, o_ref, tol=1e-12, what="o")
    assert_close(s, s_ref, tol=1e-12, what="final state")
    for name, a, b in zip("qkvg", grads, grads_ref, strict=True):
        assert_close(a, b, tol=1e-10, what=f"d{name}")


def test_scalar_decay_factored_gradient_accuracy_in_float32():
    # at the edge of the span (chunk decays e^-4.9) the float32 gate gradient of the factored
    # path stays at the exact path's level (measured 4.5e-7 vs 3.0e-7 relative RMSE)
    gen = torch.Generator().manual_seed(13)
    B, T, H, D, C = 1, 256, 2, 32, 64
    q, k, v = (F.normalize(torch.randn(B, T, H, D, generator=gen, dtype=F64), dim=-1)
               for _ in range(3))
    w = torch.randn(B, T, H, D, generator=gen, dtype=F64)
    g = torch.full((B, T, H), -4.9 / C, dtype=F64)
    ref = torch.autograd.grad((linear_attention(q, k, v, g.requires_grad_())[0] * w).sum(), g)[0]
    g32 = g.detach().float().requires_grad_()
    o = linear_attention(q.float(), k.float(), v.float(), g32, chunk_size=C)[0]
    dg = torch.autograd.grad((o * w.float()).sum(), g32)[0].double()
    assert (dg - ref).norm() / ref.norm() < 2e-6


@pytest.mark.parametrize("case", ["mild", "mixed", "strong"])
def test_per_dim_chunks_factored_only_where_mild(case, monkeypatch):
    """Per-dimension decay: chunks decaying by at most FACTOR_SPAN take the factored terms, the
    others the exact segment sums, per chunk. Values and float64 gradients equal the recurrence
    in every case, and the exact path sees exactly the strong chunks."""
    gen = torch.Generator().manual_seed(11)
    B, T, H, D, C = 2, 48, 2, 4, 16
    q, k, v, w = (torch.randn(B, T, H, D, generator=gen, dtype=F64) for _ in range(4))
    g = -0.01 * torch.rand(B, T, H, D, generator=gen, dtype=F64)  # chunk decays ~e^-0.1
    if case == "mixed":  # one dimension of two chunks decays by e^-6 and e^-40
        g[0, 3, 1, 2] = -6.0
        g[1, 40, 0, 0] = -40.0
    elif case == "strong":
        g = g - 1.0
    seen = []
    exact = linear_module._exact_terms

    def spy(q, k, v, g, flush):
        seen.append(q.shape[:-2].numel())
        return exact(q, k, v, g, flush)

    monkeypatch.setattr(linear_module, "_exact_terms", spy)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, g)]
    out = {}
    for form in ("chunk", "recurrent"):
        o, s = linear_attention(*leaves, form=form, chunk_size=C, output_final_state=True)
        out[form] = (o, s, torch.autograd.grad((o * w).sum() + s.sum(), leaves))
    n_chunks = B * H * T // C
    assert seen == {"mild": [], "mixed": [2], "strong": [n_chunks]}[case]
    (o, s, grads), (o_ref, s_ref, grads_ref) = out["chunk"], out["recurrent"]
    assert_close(o, o_ref, tol=1e-12, what="o")
    assert_close(s, s_ref, tol=1e-12, what="final state")
    for name, a, b in zip("qkvg", grads, grads_ref, strict=True):
        assert_close(a, b, tol=1e-10, what=f"d{name}")


@pytest.mark.parametrize("kind", ["none", "scalar", "per_dim"])
@pytest.mark.parametrize("with_s0", [False, True])
@pytest.mark.parametrize("algorithm", ["scan", "matmul"])
def test_pass_states_is_the_chunk_recurrence_with_its_gradients(kind, with_s0, algorithm,
                                                                monkeypatch):
    """`_pass_states` against the recurrence S0_{c+1} = diag(exp(a_c)) S0_c + U_c as an
    autograd loop, values and gradients, float64: the CPU's scan with its written-out backward,
    and the grouped matmuls of GPUs and torch.compile (groups of 2 over 5 chunks, so the carry
    between groups is used)."""
    if algorithm == "matmul":
        monkeypatch.setattr(linear_module, "_is_compiling", lambda: True)
        monkeypatch.setattr(linear_module, "STATE_GROUP", 2)
    B, H, n, Dk, Dv = 2, 3, 5, 4, 3
    gen = torch.Generator().manual_seed(0)
    U = torch.randn(B, H, n, Dk, Dv, dtype=torch.float64, generator=gen)
    shape = {"none": None, "scalar": (B, H, n), "per_dim": (B, H, n, Dk)}[kind]
    a = None if shape is None else -torch.rand(*shape, dtype=torch.float64, generator=gen)
    s0 = torch.randn(B, H, Dk, Dv, dtype=torch.float64, generator=gen) if with_s0 else None
    leaves = [x.requires_grad_() for x in (U, a, s0) if x is not None]

    def loop(U, a, s0):
        S, starts = (torch.zeros_like(U[:, :, 0]) if s0 is None else s0), []
        for c in range(n):
            starts.append(S)
            e = 1.0 if a is None else torch.exp(a[:, :, c])
            e = e if a is None else (e[..., None] if a.ndim == 4 else e[..., None, None])
            S = e * S + U[:, :, c]
        return torch.stack(starts, 2), S

    got, want = linear_module._pass_states(U, a, s0), loop(U, a, s0)
    w = [torch.randn(x.shape, dtype=x.dtype, generator=gen) for x in want]
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
    g_got = torch.autograd.grad(sum((x * v).sum() for x, v in zip(got, w, strict=True)), leaves)
    g_want = torch.autograd.grad(sum((x * v).sum() for x, v in zip(want, w, strict=True)), leaves)
    for x, y in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)

    def f(*xs):  # the leaves back in _pass_states' argument order
        it = iter(xs)
        return linear_module._pass_states(next(it), None if a is None else next(it),
                                          next(it) if with_s0 else None)

    assert torch.autograd.gradcheck(f, tuple(leaves))



@pytest.mark.parametrize("half", [False, True], ids=["float64", "bf16-autocast"])
@pytest.mark.parametrize("with_s0", [False, True], ids=["no-s0", "s0"])
@pytest.mark.parametrize("decay", [None, "scalar", "per_dim"])
def test_factored_chunk_backward_equals_autograd(written_out_equals_autograd, half, with_s0,
                                                 decay):
    """The chunk form on the CPU without decay, and with a mild scalar or per-dimension decay
    factored into the queries and keys (`_FactoredChunk`, a written-out backward), against the
    paths autograd records when compiling (no decay: the same terms with states passed by
    matmuls; with decay: the exact segment-sum paths): values and gradients of q, k, v, g and
    the initial state, in float64 and under bf16 autocast (half matmuls, float32 states); the
    written-out path must have been taken."""
    gen = torch.Generator().manual_seed(5)
    B, T, H, Dk, Dv = 2, 37, 2, 5, 3
    dt = torch.float32 if half else torch.float64
    q, k, v = (torch.randn(B, T, H, d, dtype=dt, generator=gen) for d in (Dk, Dk, Dv))
    # chunks of 8 decaying by e^-0.8 to e^-3.2: every chunk mild, so the factored path
    shape = (B, T, H, Dk) if decay == "per_dim" else (B, T, H)
    g = -0.4 * torch.rand(*shape, dtype=dt, generator=gen) - 0.1 if decay else None
    s0 = torch.randn(B, H, Dk, Dv, dtype=dt, generator=gen) if with_s0 else None
    w = torch.randn(B, T, H, Dv, dtype=dt, generator=gen)
    ws = torch.randn(B, H, Dk, Dv, dtype=dt, generator=gen)

    def run():
        xs = [x.clone().requires_grad_() for x in (q, k, v, g, s0) if x is not None]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=half):
            o, S = linear_attention(*xs[:3], g=xs[3] if decay else None,
                                    initial_state=xs[-1] if with_s0 else None,
                                    output_final_state=True, form="chunk", chunk_size=8)
        loss = (o.to(dt) * w).sum() + (S * ws).sum()
        return [o, S, *torch.autograd.grad(loss, xs)]

    # under bf16 without decay both paths round the same products (half matmuls, float32
    # sums): only the order of additions differs. With decay the compiled path rounds other
    # products (q k^T times a decay matrix, not (q e^b)(k e^-b)^T), so the gate gradient, a
    # sum of cancelling terms, differs by more than elementwise rounding: the two agree to
    # bf16's relative RMSE bound instead (each measured 0.5-1.1e-2 from float64)
    written_out_equals_autograd(linear_module._FactoredChunk, linear_module, run,
                                tol=2e-2 if half else 1e-10, rmse=bool(half and decay))


@pytest.mark.parametrize("op", ["linear_attention", "delta_rule"])
def test_written_out_backward_takes_a_broadcast_gradient(op):
    """o.sum() hands the written-out backwards (`_FactoredChunk`, `_FactoredDelta`) a gradient
    of stride 0, which they make contiguous before their batched matmuls: no bmm falls back to
    one addmm_ per chunk (what a zero-stride operand makes it do), and the gradients equal those
    of the same ones materialized."""
    gen = torch.Generator().manual_seed(6)
    # large enough a matrix (D = 16) that bmm takes its BLAS path, which loops on such operands
    q, k, v = (torch.randn(1, 128, 2, 16, generator=gen) for _ in range(3))
    k = F.normalize(k, dim=-1)
    beta = torch.rand(1, 128, 2, generator=gen)
    fn = linear_attention if op == "linear_attention" else (
        lambda q, k, v, **kw: delta_rule(q, k, v, beta, **kw))

    def grads(materialize):
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        o, _ = fn(*xs, form="chunk", chunk_size=32)
        if materialize:
            o.backward(torch.ones_like(o))
        else:
            with torch.profiler.profile() as prof:
                o.sum().backward()
            names = [e.name for e in prof.events()]
            assert "aten::bmm" in names and "aten::addmm_" not in names
        return [x.grad for x in xs]

    for a, b in zip(grads(False), grads(True), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_factored_per_dim_backward_equals_the_exact_path(written_out_equals_autograd):
    """The all-mild per-dimension path (`_FactoredChunk`, a written-out backward) against the
    exact segment-sum path with autograd (taken when compiling), values and gradients of q, k,
    v, g and the initial state, float64; the factored path must have been taken."""
    gen = torch.Generator().manual_seed(4)
    B, T, H, Dk, Dv = 2, 37, 2, 5, 3
    q, k, v = (torch.randn(B, T, H, d, dtype=torch.float64, generator=gen) for d in (Dk, Dk, Dv))
    g = -0.2 * torch.rand(B, T, H, Dk, dtype=torch.float64, generator=gen)  # chunks of 8: mild
    s0 = torch.randn(B, H, Dk, Dv, dtype=torch.float64, generator=gen)
    w = torch.randn(B, T, H, Dv, dtype=torch.float64, generator=gen)
    ws = torch.randn(B, H, Dk, Dv, dtype=torch.float64, generator=gen)

    def run():
        xs = [x.clone().requires_grad_() for x in (q, k, v, g, s0)]
        o, S = linear_attention(*xs[:4], initial_state=xs[4], output_final_state=True,
                                form="chunk", chunk_size=8)
        loss = (o * w).sum() + (S * ws).sum()
        return [o, S, *torch.autograd.grad(loss, xs)]

    written_out_equals_autograd(linear_module._FactoredChunk, linear_module, run, tol=1e-10)


@pytest.mark.parametrize("with_s0", [False, True])
def test_chunk_rls_backward_equals_autograd_through_its_steps(written_out_equals_autograd, with_s0):
    """The exact chunk RLS (`_ChunkRLS`: the gradient of the exact map, written out) against
    autograd through every step of the algorithm (taken when compiling), float64: values and
    gradients of q, k, v, beta, a per-dimension ridge and both initial states, with a loss on
    the final states too, over a length that leaves the last chunk short."""
    gen = torch.Generator().manual_seed(6)
    B, T, H, Dk, Dv = 2, 37, 2, 5, 3
    q, k, v = (torch.randn(B, T, H, d, dtype=torch.float64, generator=gen) for d in (Dk, Dk, Dv))
    beta = torch.rand(B, T, H, dtype=torch.float64, generator=gen) + 0.1
    ridge = torch.rand(Dk, dtype=torch.float64, generator=gen) + 0.2
    a = torch.randn(B, H, Dk, Dk, dtype=torch.float64, generator=gen)
    s0 = (a @ a.mT, torch.randn(B, H, Dk, Dv, dtype=torch.float64, generator=gen))
    w = torch.randn(B, T, H, Dv, dtype=torch.float64, generator=gen)
    wkk, wkv = (torch.randn_like(s) for s in s0)

    def run():
        xs = [x.clone().requires_grad_() for x in (q, k, v, beta, ridge, *s0)]
        o, (Skk, Skv) = rls(*xs[:3], beta=xs[3], ridge=xs[4], form="chunk", chunk_size=8,
                            initial_state=tuple(xs[5:]) if with_s0 else None,
                            output_final_state=True)
        loss = (o * w).sum() + (Skk * wkk).sum() + (Skv * wkv).sum()
        grads = torch.autograd.grad(loss, xs if with_s0 else xs[:5])
        return [o, Skk, Skv, *grads]

    written_out_equals_autograd(rls_chunk_module._ChunkRLS, rls_chunk_module, run, tol=1e-10)


def test_chunk_rls_float32_gradients_at_an_ill_conditioned_ridge():
    """Float32 gradients of the exact chunk RLS at ridge 0.01 with elu+1 keys (Grams with one
    huge eigenvalue), against the float64 recurrence: dK's terms cancel to ~1/100 of their size
    there, so the backward's prefix solve must refine past one step (BACKWARD_REFINE). With one
    step dK was off by 2.3e-2; the batched-solve parallel form reaches 2.2e-3."""
    gen = torch.Generator().manual_seed(0)
    B, T, H, D = 1, 200, 2, 60
    q, k, v, w = (torch.randn(B, T, H, D, dtype=F64, generator=gen) for _ in range(4))
    q, k = F.elu(q) + 1, F.elu(k) + 1

    def grads(dtype, form):
        xs = [x.to(dtype).requires_grad_() for x in (q, k, v)]
        o, _ = rls(*xs, ridge=0.01, form=form)
        return torch.autograd.grad((o * w.to(dtype)).sum(), xs)

    ref = grads(F64, "recurrent")
    for name, a, b in zip("qkv", grads(torch.float32, "chunk"), ref, strict=True):
        assert_close(a.double(), b, tol=3e-3, what=f"d{name}")

"""SGD with momentum on a linear memory (Titans, linear case).

Two functions: form "recurrent" is the exact per-token online SGD with momentum, held to
`ttr.reference.solve` for Optimizer.sgd(momentum=mu); form "chunk" is Titans' chunkwise
approximation (gradients at the chunk-start memory), held to its loop spec "chunk_recurrent",
and equal to the exact form for chunks of one token.

Keys are L2-normalized, beta in (0, 1) and momentum <= 0.9, so the memory stays bounded.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ttr.ops.delta import delta_rule
from ttr.ops.momentum import _chunk, momentum_delta_rule, momentum_delta_rule_step
from ttr.recipe import FunctionClass, Optimizer, Recipe, Weights
from ttr.reference import solve
from ttr.testing import assert_close, rel_rmse

F64, F32 = torch.float64, torch.float32
FORMS = ["recurrent", "chunk", "chunk_recurrent"]


def inputs(B, T, H, Dk, Dv, g_mode="rand", mu_mode="rand", seed=0):
    """q, k, v, beta, momentum, g, (S0, U0) in float64.

    g_mode: None, "rand" (U(-1, 0)) or a constant; mu_mode: a float, "rand" (U(0, 0.9)) or
    "edges" (a tensor with exact 0s and 1s among random values)."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=F64)
    u = lambda *s: torch.rand(*s, generator=gen, dtype=F64)
    q, v = r(B, T, H, Dk), r(B, T, H, Dv)
    k = F.normalize(r(B, T, H, Dk), dim=-1)
    beta = u(B, T, H)
    if isinstance(mu_mode, float):
        mu = mu_mode
    else:
        mu = 0.9 * u(B, T, H)
        if mu_mode == "edges":
            pick = u(B, T, H)
            mu = torch.where(pick < 0.2, 0.0, torch.where(pick > 0.9, 1.0, mu))
    if g_mode is None:
        g = None
    elif g_mode == "rand":
        g = -u(B, T, H)
    else:
        g = torch.full((B, T, H), float(g_mode), dtype=F64)
    return q, k, v, beta, mu, g, (0.5 * r(B, H, Dk, Dv), 0.2 * r(B, H, Dk, Dv))


def cut(xs, a, b):
    return [x[:, a:b] if isinstance(x, torch.Tensor) else x for x in xs]


def assert_pair(a, b, tol, what="state"):
    assert_close(a[0], b[0], tol=tol, what=f"{what} S")
    assert_close(a[1], b[1], tol=tol, what=f"{what} U")


# (B, T, H, Dk, Dv, chunk_size)
SIZES = [
    pytest.param(1, 1, 1, 4, 4, 16, id="T1"),
    pytest.param(2, 37, 3, 8, 5, 16, id="B2-T37-H3-C16"),
    pytest.param(1, 40, 2, 60, 24, 16, id="D60-Dv24"),
    pytest.param(1, 23, 2, 6, 3, 7, id="C7-ragged"),
    pytest.param(2, 32, 1, 5, 7, 32, id="T=C"),
]
CASES = [  # (g_mode, mu_mode)
    pytest.param(None, 0.7, id="g=None-mu=0.7"),
    pytest.param("rand", "rand", id="g~U-mu~U"),
    pytest.param(-3.0, "edges", id="g=-3-mu-0-and-1"),
    pytest.param("rand", 0.0, id="g~U-mu=0"),
]


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("g_mode,mu_mode", CASES)
@pytest.mark.parametrize("B,T,H,Dk,Dv,C", SIZES)
def test_chunk_equals_chunk_recurrent(B, T, H, Dk, Dv, C, g_mode, mu_mode, dtype):
    q, k, v, beta, mu, g, s0 = inputs(B, T, H, Dk, Dv, g_mode, mu_mode, seed=T + Dk)
    o_ref, s_ref = momentum_delta_rule(q, k, v, beta, mu, g, initial_state=s0,
                                       output_final_state=True, form="chunk_recurrent",
                                       chunk_size=C)
    cast = lambda x: x.to(dtype) if isinstance(x, torch.Tensor) else x
    o, s = momentum_delta_rule(*map(cast, (q, k, v, beta, mu, g)),
                               initial_state=tuple(map(cast, s0)), output_final_state=True,
                               form="chunk", chunk_size=C)
    assert o.dtype == dtype and o.shape == (B, T, H, Dv)
    tol = 1e-10 if dtype == F64 else 1e-4
    assert_close(o, o_ref, tol=tol, what="output")
    assert_pair(s, s_ref, tol)


@pytest.mark.parametrize("form", ["chunk", "chunk_recurrent"])
@pytest.mark.parametrize("g_mode,mu_mode", CASES)
def test_chunks_of_one_token_are_exact(g_mode, mu_mode, form):
    q, k, v, beta, mu, g, s0 = inputs(2, 21, 2, 6, 4, g_mode, mu_mode)
    o_ref, s_ref = momentum_delta_rule(q, k, v, beta, mu, g, initial_state=s0,
                                       output_final_state=True, form="recurrent")
    o, s = momentum_delta_rule(q, k, v, beta, mu, g, initial_state=s0, output_final_state=True,
                               form=form, chunk_size=1)
    assert_close(o, o_ref, tol=1e-10, what="output")
    assert_pair(s, s_ref, 1e-10)


def test_chunk_form_is_a_different_function():
    """Mini-batch gradients (Titans) are not the per-token recurrence once C > 1."""
    xs = inputs(1, 32, 2, 6, 4)
    o_exact, _ = momentum_delta_rule(*xs[:6], form="recurrent")
    o_chunk, _ = momentum_delta_rule(*xs[:6], form="chunk", chunk_size=8)
    assert rel_rmse(o_chunk, o_exact) > 1e-2


@pytest.mark.parametrize("form", ["recurrent", "chunk"])
@pytest.mark.parametrize("weights", ["uniform", "geometric"])
@pytest.mark.parametrize("mu", [0.0, 0.5, 0.9])
def test_exact_form_is_reference_sgd_with_momentum(mu, weights, form):
    q, k, v, beta, _, g, _ = inputs(2, 13, 2, 5, 3)
    k = 1.3 * k  # non-unit keys
    g = g if weights == "geometric" else None
    recipe = Recipe(Weights(weights), FunctionClass.linear(), Optimizer.sgd(momentum=mu))
    expected = solve(recipe, q, k, v, g=g, beta=beta)
    # the chunk form with chunks of one token is the exact form too
    o, _ = momentum_delta_rule(q, k, v, beta, mu, g, form=form, chunk_size=1)
    assert_close(o, expected, tol=1e-10)


@pytest.mark.parametrize("g_mode", [None, "rand"])
def test_zero_momentum_is_delta_rule(g_mode):
    q, k, v, beta, _, g, (S0, U0) = inputs(2, 19, 2, 6, 4, g_mode)
    o, (S, U) = momentum_delta_rule(q, k, v, beta, 0.0, g, initial_state=(S0, U0 * 0),
                                    output_final_state=True, form="recurrent")
    o_d, S_d = delta_rule(q, k, v, beta, g, initial_state=S0, output_final_state=True,
                          form="recurrent")
    assert_close(o, o_d, tol=1e-12)
    assert_close(S, S_d, tol=1e-12)


@pytest.mark.parametrize("form,split", [("recurrent", 1), ("recurrent", 13),
                                        ("chunk", 8), ("chunk", 24),
                                        ("chunk_recurrent", 16)])
def test_state_carry_over(form, split):
    """Chunk forms restart their chunks at each call, so they split at chunk boundaries."""
    xs = inputs(2, 29, 2, 5, 4)
    o, s = momentum_delta_rule(*xs[:6], output_final_state=True, form=form, chunk_size=8)
    o1, s1 = momentum_delta_rule(*cut(xs[:6], 0, split), output_final_state=True, form=form,
                                 chunk_size=8)
    o2, s2 = momentum_delta_rule(*cut(xs[:6], split, 29), initial_state=s1,
                                 output_final_state=True, form=form, chunk_size=8)
    assert_close(torch.cat([o1, o2], dim=1), o, tol=1e-10, what="split output")
    assert_pair(s2, s, 1e-10)


@pytest.mark.parametrize("g_mode,mu_mode", [(None, 0.6), ("rand", "rand")])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "initial-state"])
def test_step_decoding(with_state, g_mode, mu_mode):
    q, k, v, beta, mu, g, s0 = inputs(2, 9, 2, 5, 4, g_mode, mu_mode)
    s0 = s0 if with_state else None
    o, s = momentum_delta_rule(q, k, v, beta, mu, g, initial_state=s0, output_final_state=True,
                               form="recurrent")
    state, outs = s0, []
    for t in range(9):
        mu_t = mu[:, t] if isinstance(mu, torch.Tensor) else mu
        o_t, state = momentum_delta_rule_step(q[:, t], k[:, t], v[:, t], beta[:, t], mu_t,
                                              None if g is None else g[:, t], state)
        outs.append(o_t)
    assert_close(torch.stack(outs, dim=1), o, tol=1e-10, what="decoded output")
    assert_pair(state, s, 1e-10)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "initial-state"])
def test_cu_seqlens(with_state, form):
    lens = [5, 1, 13, 9]
    bounds = [0] + torch.tensor(lens).cumsum(0).tolist()
    cu = torch.tensor(bounds, dtype=torch.int32)
    q, k, v, beta, mu, g, _ = inputs(1, sum(lens), 2, 5, 4)
    s0 = None
    if with_state:
        s0 = (0.5 * torch.randn(4, 2, 5, 4, dtype=F64), 0.2 * torch.randn(4, 2, 5, 4, dtype=F64))
    o, s = momentum_delta_rule(q, k, v, beta, mu, g, initial_state=s0, output_final_state=True,
                               cu_seqlens=cu, form=form, chunk_size=4)
    outs = []
    for i, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False)):
        si = None if s0 is None else tuple(x[i : i + 1] for x in s0)
        oi, fi = momentum_delta_rule(*cut((q, k, v, beta, mu, g), a, b), initial_state=si,
                                     output_final_state=True, form=form, chunk_size=4)
        outs.append(oi)
        assert_pair(tuple(x[i : i + 1] for x in s), fi, 1e-12, what=f"final state {i}")
    assert_close(o, torch.cat(outs, dim=1), tol=1e-12, what="packed output")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("g_mode", [None, "rand"])
def test_gradcheck(form, g_mode):
    q, k, v, beta, mu, g, (S0, U0) = inputs(1, 7, 1, 3, 2, g_mode, seed=3)
    mu = 0.1 + mu  # finite differences stay inside [0, 1]
    leaves = [x.clone().requires_grad_() for x in (q, k, v, beta, mu, S0, U0)]
    if g is not None:
        leaves.append((g - 0.05).requires_grad_())  # and inside g <= 0

    def f(q, k, v, beta, mu, S0, U0, g=None):
        o, (S, U) = momentum_delta_rule(q, k, v, beta, mu, g, initial_state=(S0, U0),
                                        output_final_state=True, form=form, chunk_size=3)
        return o, S, U

    assert torch.autograd.gradcheck(f, tuple(leaves), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gradcheck_chunk_at_zero_momentum():
    """mu = 0 exactly (where a log-space product would give 0 * inf): the chunk kernel's
    gradient with respect to mu is still right. `_chunk` directly: the op would reject the
    finite-difference probe mu = -eps."""
    q, k, v, beta, mu, g, (S0, U0) = inputs(1, 7, 1, 3, 2, "rand", "edges", seed=5)
    mu[0, 1, 0], mu[0, 4, 0] = 0.0, 0.0
    leaves = [x.clone().requires_grad_() for x in (q, k, v, beta, mu, g, S0, U0)]
    f = lambda q, k, v, beta, mu, g, S0, U0: _chunk(q, k, v, beta, mu, g, S0, U0, 4)
    assert torch.autograd.gradcheck(f, tuple(leaves), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("form", FORMS)
def test_bf16_keeps_dtype_and_accumulates_in_f32(form):
    q, k, v, beta, mu, g, (S0, U0) = inputs(1, 20, 2, 8, 8)
    half = [x.to(torch.bfloat16) for x in (q, k, v, beta, mu, g)]
    o, (S, U) = momentum_delta_rule(*half, initial_state=(S0.float(), U0.float()),
                                    output_final_state=True, form=form, chunk_size=8)
    assert o.dtype == torch.bfloat16 and S.dtype == F32 and U.dtype == F32
    spec = "recurrent" if form == "recurrent" else "chunk_recurrent"
    o_ref, s_ref = momentum_delta_rule(*(x.to(F64) for x in half), initial_state=(S0, U0),
                                       output_final_state=True, form=spec, chunk_size=8)
    assert_close(o, o_ref, dtype=torch.bfloat16, what="bf16 output")
    assert_pair((S, U), s_ref, 1e-4, what="f32 state")


@settings(max_examples=20, deadline=None)
@given(B=st.integers(1, 2), T=st.integers(1, 30), H=st.integers(1, 2), Dk=st.integers(1, 6),
       Dv=st.integers(1, 6), C=st.integers(1, 40), decay=st.booleans(), seed=st.integers(0, 99))
def test_property_any_shape_chunk_equals_spec(B, T, H, Dk, Dv, C, decay, seed):
    xs = inputs(B, T, H, Dk, Dv, "rand" if decay else None, "edges", seed=seed)
    o, s = momentum_delta_rule(*xs[:6], initial_state=xs[6], output_final_state=True,
                               chunk_size=C)
    o_ref, s_ref = momentum_delta_rule(*xs[:6], initial_state=xs[6], output_final_state=True,
                                       form="chunk_recurrent", chunk_size=C)
    assert o.shape == (B, T, H, Dv)
    assert_close(o, o_ref, tol=1e-10, what="output")
    assert_pair(s, s_ref, 1e-10)


def _bad(**over):
    q, k, v, beta, mu, g, s0 = inputs(1, 5, 2, 4, 3)
    kw = dict(q=q, k=k, v=v, beta=beta, momentum=mu, g=g, initial_state=s0, chunk_size=4)
    kw.update(over)
    return kw


@pytest.mark.parametrize("over, err, name", [
    (dict(beta=None), ValueError, "beta"),
    (dict(beta=torch.rand(1, 5, 3, dtype=F64)), ValueError, "beta"),
    (dict(momentum=1.5), ValueError, "momentum"),
    (dict(momentum="0.9"), TypeError, "momentum"),
    (dict(momentum=True), TypeError, "momentum"),
    (dict(momentum=torch.full((1, 5, 2), -0.1, dtype=F64)), ValueError, "momentum"),
    (dict(momentum=torch.rand(1, 5, 2, 1, dtype=F64)), ValueError, "momentum"),
    (dict(g=torch.full((1, 5, 2), 0.1, dtype=F64)), ValueError, "g"),
    (dict(initial_state=torch.zeros(1, 2, 4, 3, dtype=F64)), TypeError, "initial_state"),
    (dict(initial_state=(torch.zeros(1, 2, 4, 3, dtype=F64),
                         torch.zeros(1, 2, 3, 4, dtype=F64))), ValueError, "initial_state"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(form="parallel"), ValueError, "form"),
    (dict(v=torch.zeros(1, 6, 2, 3, dtype=F64)), ValueError, "v"),
])
def test_bad_input_names_the_argument(over, err, name):
    kw = _bad(**over)
    with pytest.raises(err, match=f"^{name}"):
        momentum_delta_rule(kw.pop("q"), kw.pop("k"), kw.pop("v"), kw.pop("beta"),
                            kw.pop("momentum"), kw.pop("g"), **kw)


@pytest.mark.parametrize("over, err, name", [
    (dict(beta_t=None), ValueError, "beta_t"),
    (dict(momentum_t=-0.5), ValueError, "momentum_t"),
    (dict(momentum_t=torch.rand(1, 3, dtype=F64)), ValueError, "momentum_t"),
    (dict(state=torch.zeros(1, 2, 4, 3, dtype=F64)), TypeError, "state"),
])
def test_step_bad_input_names_the_argument(over, err, name):
    q, k, v, beta, mu, g, s0 = inputs(1, 1, 2, 4, 3)
    kw = dict(q_t=q[:, 0], k_t=k[:, 0], v_t=v[:, 0], beta_t=beta[:, 0], momentum_t=mu[:, 0],
              g_t=g[:, 0], state=s0)
    kw.update(over)
    with pytest.raises(err, match=f"^{name}"):
        momentum_delta_rule_step(**kw)

"""DeltaProduct (n_h delta steps per token): the chunk form (the interleaved chunkwise delta rule)
against the recurrent spec, against `delta_rule` for n_h = 1, and against `ttr.reference` for
`Optimizer.sgd(steps=n)`: n SGD steps on the newest pair = the same pair repeated n times.

Keys are L2-normalized and beta in (0, 1), so every step is a contraction.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ttr.ops.delta import delta_rule
from ttr.ops.delta_product import delta_product, delta_product_step
from ttr.recipe import FunctionClass, Optimizer, Recipe, Weights
from ttr.reference import solve
from ttr.testing import assert_close

F64, F32 = torch.float64, torch.float32


def inputs(B, T, H, n_h, Dk, Dv, g_mode="rand", seed=0):
    """q, k, v, beta, g, s0 in float64; g_mode None, "rand" (U(-1, 0)) or a constant."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=F64)
    q, v = r(B, T, H, Dk), r(B, T, H, n_h, Dv)
    k = F.normalize(r(B, T, H, n_h, Dk), dim=-1)
    beta = torch.rand(B, T, H, n_h, generator=gen, dtype=F64)
    if g_mode is None:
        g = None
    elif g_mode == "rand":
        g = -torch.rand(B, T, H, generator=gen, dtype=F64)
    else:
        g = torch.full((B, T, H), float(g_mode), dtype=F64)
    return q, k, v, beta, g, 0.5 * r(B, H, Dk, Dv)


def cut(xs, a, b):
    return [None if x is None else x[:, a:b] for x in xs]


# (B, T, H, n_h, Dk, Dv, chunk_size in sub-steps); C = 16 with n_h = 3 cuts tokens in two
SIZES = [
    pytest.param(1, 1, 1, 2, 4, 4, 16, id="T1"),
    pytest.param(2, 37, 3, 3, 8, 5, 16, id="B2-T37-nh3-C16"),
    pytest.param(1, 40, 2, 2, 60, 24, 16, id="D60-Dv24"),
    pytest.param(1, 23, 2, 4, 6, 3, 7, id="nh4-C7"),
]
G_MODES = [pytest.param(None, id="g=None"), pytest.param("rand", id="g~U(-1,0)"),
           pytest.param(-3.0, id="g=-3")]


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("g_mode", G_MODES)
@pytest.mark.parametrize("B,T,H,n_h,Dk,Dv,C", SIZES)
def test_chunk_equals_recurrent(B, T, H, n_h, Dk, Dv, C, g_mode, dtype):
    q, k, v, beta, g, s0 = inputs(B, T, H, n_h, Dk, Dv, g_mode, seed=T + Dk)
    o_ref, s_ref = delta_product(q, k, v, beta, g, initial_state=s0, output_final_state=True,
                                 form="recurrent")
    cast = lambda x: None if x is None else x.to(dtype)
    o, s = delta_product(*map(cast, (q, k, v, beta, g)), initial_state=cast(s0),
                         output_final_state=True, form="chunk", chunk_size=C)
    assert o.dtype == dtype and o.shape == (B, T, H, Dv) and s.shape == (B, H, Dk, Dv)
    tol = 1e-10 if dtype == F64 else 1e-4
    assert_close(o, o_ref, tol=tol, what="output")
    assert_close(s, s_ref, tol=tol, what="final state")


@pytest.mark.parametrize("form", ["recurrent", "chunk"])
@pytest.mark.parametrize("g_mode", [None, "rand"])
def test_one_step_per_token_is_delta_rule(form, g_mode):
    q, k, v, beta, g, s0 = inputs(2, 29, 2, 1, 6, 4, g_mode)
    o, s = delta_product(q, k, v, beta, g, initial_state=s0, output_final_state=True,
                         form=form, chunk_size=8)
    o_d, s_d = delta_rule(q, k[:, :, :, 0], v[:, :, :, 0], beta[..., 0], g, initial_state=s0,
                          output_final_state=True, form=form, chunk_size=8)
    assert torch.equal(o, o_d) and torch.equal(s, s_d)


@pytest.mark.parametrize("form", ["recurrent", "chunk"])
@pytest.mark.parametrize("weights", ["uniform", "geometric"])
@pytest.mark.parametrize("steps", [1, 2, 3])
def test_reference_sgd_steps_is_repeated_pair(steps, weights, form):
    """Optimizer.sgd(steps=n): n SGD steps on (k_t, v_t) per token (Eq. 26-28 iterated) =
    DeltaProduct with n_h = n and the pair (and step size) repeated n times."""
    q, k, v, beta, g, _ = inputs(2, 11, 2, 1, 5, 3, "rand")
    k = 1.2 * k[:, :, :, 0]  # [B, T, H, Dk], not unit-norm: steps on a non-projection
    v, beta = v[:, :, :, 0], beta[..., 0]
    g = g if weights == "geometric" else None
    recipe = Recipe(Weights(weights), FunctionClass.linear(), Optimizer.sgd(steps=steps))
    expected = solve(recipe, q, k, v, g=g, beta=beta)
    rep = lambda x: x.unsqueeze(3).expand(*x.shape[:3], steps, *x.shape[3:])
    o, _ = delta_product(q, rep(k), rep(v), rep(beta), g, form=form, chunk_size=4)
    assert_close(o, expected, tol=1e-10)


@pytest.mark.parametrize("form", ["recurrent", "chunk"])
@pytest.mark.parametrize("split", [1, 13])
def test_state_carry_over(form, split):
    xs = inputs(2, 29, 2, 3, 5, 4)
    o, s = delta_product(*xs[:5], output_final_state=True, form=form, chunk_size=8)
    o1, s1 = delta_product(*cut(xs[:5], 0, split), output_final_state=True, form=form,
                           chunk_size=8)
    o2, s2 = delta_product(*cut(xs[:5], split, 29), initial_state=s1, output_final_state=True,
                           form=form, chunk_size=8)
    assert_close(torch.cat([o1, o2], dim=1), o, tol=1e-10, what="split output")
    assert_close(s2, s, tol=1e-10, what="final state")


@pytest.mark.parametrize("form", ["recurrent", "chunk"])
@pytest.mark.parametrize("g_mode", [None, "rand"])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "initial-state"])
def test_step_decoding(with_state, g_mode, form):
    q, k, v, beta, g, s0 = inputs(2, 9, 2, 3, 5, 4, g_mode)
    s0 = s0 if with_state else None
    o, s = delta_product(q, k, v, beta, g, initial_state=s0, output_final_state=True,
                         form=form, chunk_size=4)
    state, outs = s0, []
    for t in range(9):
        o_t, state = delta_product_step(q[:, t], k[:, t], v[:, t], beta[:, t],
                                        None if g is None else g[:, t], state)
        outs.append(o_t)
    assert_close(torch.stack(outs, dim=1), o, tol=1e-10, what="decoded output")
    assert_close(state, s, tol=1e-10, what="final state")


@pytest.mark.parametrize("form", ["recurrent", "chunk"])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "initial-state"])
def test_cu_seqlens(with_state, form):
    lens = [5, 1, 13, 9]
    bounds = [0] + torch.tensor(lens).cumsum(0).tolist()
    cu = torch.tensor(bounds, dtype=torch.int32)
    q, k, v, beta, g, _ = inputs(1, sum(lens), 2, 2, 5, 4)
    s0 = 0.5 * torch.randn(len(lens), 2, 5, 4, dtype=F64) if with_state else None
    o, s = delta_product(q, k, v, beta, g, initial_state=s0, output_final_state=True,
                         cu_seqlens=cu, form=form, chunk_size=4)
    outs = []
    for i, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False)):
        si = None if s0 is None else s0[i : i + 1]
        oi, fi = delta_product(*cut((q, k, v, beta, g), a, b), initial_state=si,
                               output_final_state=True, form=form, chunk_size=4)
        outs.append(oi)
        assert_close(s[i : i + 1], fi, tol=1e-12, what=f"final state {i}")
    assert_close(o, torch.cat(outs, dim=1), tol=1e-12, what="packed output")


@pytest.mark.parametrize("form", ["recurrent", "chunk"])
@pytest.mark.parametrize("g_mode", [None, "rand"])
def test_gradcheck(form, g_mode):
    q, k, v, beta, g, s0 = inputs(1, 4, 1, 2, 3, 2, g_mode, seed=3)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, beta, s0)]
    if g is not None:
        leaves.append((g - 0.05).requires_grad_())  # finite differences stay inside g <= 0

    def f(q, k, v, beta, s0, g=None):
        return delta_product(q, k, v, beta, g, initial_state=s0, output_final_state=True,
                             form=form, chunk_size=3)  # 3 sub-steps: cuts tokens in two

    assert torch.autograd.gradcheck(f, tuple(leaves), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("form", ["recurrent", "chunk"])
def test_bf16_keeps_dtype_and_accumulates_in_f32(form):
    xs = inputs(1, 20, 2, 2, 8, 8)
    half = [x.to(torch.bfloat16) for x in xs[:5]]
    o, s = delta_product(*half, initial_state=xs[5].float(), output_final_state=True,
                         form=form, chunk_size=8)
    assert o.dtype == torch.bfloat16 and s.dtype == F32
    o_ref, s_ref = delta_product(*(x.to(F64) for x in half), initial_state=xs[5],
                                 output_final_state=True, form="recurrent")
    assert_close(o, o_ref, dtype=torch.bfloat16, what="bf16 output")
    assert_close(s, s_ref, tol=1e-4, what="f32 state")


@settings(max_examples=20, deadline=None)
@given(B=st.integers(1, 2), T=st.integers(1, 20), H=st.integers(1, 2), n_h=st.integers(1, 4),
       Dk=st.integers(1, 6), Dv=st.integers(1, 6), C=st.integers(1, 40), decay=st.booleans(),
       seed=st.integers(0, 99))
def test_property_any_shape_chunk_equals_recurrent(B, T, H, n_h, Dk, Dv, C, decay, seed):
    q, k, v, beta, g, s0 = inputs(B, T, H, n_h, Dk, Dv, "rand" if decay else None, seed=seed)
    o, s = delta_product(q, k, v, beta, g, initial_state=s0, output_final_state=True,
                         chunk_size=C)
    o_ref, s_ref = delta_product(q, k, v, beta, g, initial_state=s0, output_final_state=True,
                                 form="recurrent")
    assert_close(o, o_ref, tol=1e-10, what="output")
    assert_close(s, s_ref, tol=1e-10, what="final state")


def _bad(**over):
    q, k, v, beta, g, s0 = inputs(1, 5, 2, 3, 4, 3)
    kw = dict(q=q, k=k, v=v, beta=beta, g=g, initial_state=s0, chunk_size=4)
    kw.update(over)
    return kw


@pytest.mark.parametrize("over, err, name", [
    (dict(k=torch.zeros(1, 5, 2, 4, dtype=F64)), ValueError, "k"),  # missing n_h axis
    (dict(k=torch.zeros(1, 5, 2, 3, 5, dtype=F64)), ValueError, "k"),  # Dk != that of q
    (dict(k=torch.zeros(1, 5, 2, 3, 4, dtype=F32)), TypeError, "k"),
    (dict(v=torch.zeros(1, 5, 2, 2, 3, dtype=F64)), ValueError, "v"),  # n_h != that of k
    (dict(q=torch.zeros(1, 6, 2, 4, dtype=F64)), ValueError, "k"),
    (dict(beta=None), ValueError, "beta"),
    (dict(beta=torch.rand(1, 5, 2, dtype=F64)), ValueError, "beta"),  # [B, T, H], no n_h
    (dict(g=torch.full((1, 5, 2), 0.1, dtype=F64)), ValueError, "g"),
    (dict(g=-torch.rand(1, 5, 2, 4, dtype=F64)), ValueError, "g"),  # per-dim decay: not here
    (dict(initial_state=torch.zeros(1, 2, 3, 4, dtype=F64)), ValueError, "initial_state"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(form="parallel"), ValueError, "form"),
])
def test_bad_input_names_the_argument(over, err, name):
    kw = _bad(**over)
    with pytest.raises(err, match=f"^{name}"):
        delta_product(kw.pop("q"), kw.pop("k"), kw.pop("v"), kw.pop("beta"), kw.pop("g"), **kw)


@pytest.mark.parametrize("over, err, name", [
    (dict(k_t=torch.zeros(1, 2, 4, dtype=F64)), ValueError, "k_t"),
    (dict(v_t=torch.zeros(1, 2, 1, 3, dtype=F64)), ValueError, "v_t"),
    (dict(beta_t=torch.rand(1, 2, dtype=F64)), ValueError, "beta_t"),
    (dict(g_t=torch.full((1, 2), 0.5, dtype=F64)), ValueError, "g_t"),
    (dict(state=torch.zeros(1, 2, 4, 4, dtype=F64)), ValueError, "state"),
])
def test_step_bad_input_names_the_argument(over, err, name):
    q, k, v, beta, g, s0 = inputs(1, 1, 2, 3, 4, 3)
    kw = dict(q_t=q[:, 0], k_t=k[:, 0], v_t=v[:, 0], beta_t=beta[:, 0], g_t=g[:, 0], state=s0)
    kw.update(over)
    with pytest.raises(err, match=f"^{name}"):
        delta_product_step(**kw)

"""The chunkwise (WY / UT-transform) delta rule against its spec, the recurrent form, and
against the oracle `ttr.reference.solve` for the SGD recipes (Eq. 26-29, 37-41).

Keys are L2-normalized and beta in (0, 1), as in DeltaNet: each step is then a contraction and
the recurrence itself is well conditioned, so every error measured here is the chunk form's.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import ttr.ops.delta_chunk as delta_chunk
import ttr.ops.delta_factored as delta_factored
from ttr.ops import delta_rule
from ttr.ops.delta_chunk import chunk_delta_rule
from ttr.recipe import FunctionClass, Optimizer, Recipe, Weights, sgd_gates
from ttr.reference import solve
from ttr.testing import assert_close

F64 = torch.float64
recurrent = partial(delta_rule, form="recurrent")  # the spec (the default form is "chunk")


def inputs(B, T, H, Dk, Dv, g_mode, dtype=F64, seed=0, state=True):
    """q, k, v, beta, g, initial_state with unit-norm keys; g_mode None, a constant, or "rand"."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=F64)
    q, v = r(B, T, H, Dk), r(B, T, H, Dv)
    k = F.normalize(r(B, T, H, Dk), dim=-1)
    beta = torch.rand(B, T, H, generator=gen, dtype=F64)
    if g_mode is None:
        g = None
    elif g_mode == "rand":
        g = -torch.rand(B, T, H, generator=gen, dtype=F64)
    else:
        g = torch.full((B, T, H), float(g_mode), dtype=F64)
    s0 = r(B, H, Dk, Dv) if state else None
    cast = lambda x: None if x is None else x.to(dtype)
    return tuple(cast(x) for x in (q, k, v, beta, g, s0))


G_MODES = [
    pytest.param(None, id="g=None"),
    pytest.param(-1e-4, id="g=-1e-4"),
    pytest.param("rand", id="g~U(-1,0)"),
    pytest.param(-5.0, id="g=-5"),
]
SIZES = [  # (T, chunk_size): T = 1, T < C, T = C, T not a multiple of C
    pytest.param(T, C, id=f"T{T}-C{C}") for T in (1, 7, 64, 100) for C in (16, 32, 64)
]
DTYPES = [pytest.param(F64, id="f64"), pytest.param(torch.float32, id="f32")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T, C", SIZES)
@pytest.mark.parametrize("g_mode", G_MODES)
def test_chunk_equals_recurrent(g_mode, T, C, dtype):
    q, k, v, beta, g, s0 = inputs(2, T, 3, 60, 24, g_mode, dtype)
    o, s = chunk_delta_rule(q, k, v, beta, g, initial_state=s0, output_final_state=True,
                            chunk_size=C)
    # The spec in float64 on the same (rounded) inputs: the error measured is the chunk form's.
    up = lambda x: None if x is None else x.to(F64)
    o_ref, s_ref = recurrent(*map(up, (q, k, v, beta, g)), initial_state=up(s0),
                             output_final_state=True)
    assert o.dtype == dtype and s.dtype == dtype
    assert_close(o, o_ref, dtype=dtype, what="output")
    assert_close(s, s_ref, dtype=dtype, what="final state")


@pytest.mark.parametrize("g_mode", G_MODES)
@pytest.mark.parametrize("T, split, C", [(100, 37, 16), (64, 32, 32), (9, 1, 4), (20, 19, 64)])
def test_split_with_carried_state_equals_one_pass(g_mode, T, split, C):
    q, k, v, beta, g, s0 = inputs(2, T, 3, 12, 5, g_mode)
    whole, s_whole = chunk_delta_rule(q, k, v, beta, g, initial_state=s0,
                                      output_final_state=True, chunk_size=C)
    cut = lambda x, sl: None if x is None else x[:, sl]
    first, s_mid = chunk_delta_rule(*(cut(x, slice(0, split)) for x in (q, k, v, beta, g)),
                                    initial_state=s0, output_final_state=True, chunk_size=C)
    second, s_end = chunk_delta_rule(*(cut(x, slice(split, T)) for x in (q, k, v, beta, g)),
                                     initial_state=s_mid, output_final_state=True, chunk_size=C)
    assert_close(torch.cat([first, second], dim=1), whole, what="output")
    assert_close(s_end, s_whole, what="final state")


def test_no_state_in_no_state_out():
    q, k, v, beta, g, _ = inputs(1, 10, 2, 8, 4, "rand", state=False)
    o, s = chunk_delta_rule(q, k, v, beta, g, chunk_size=4)
    assert s is None
    o_ref, _ = recurrent(q, k, v, beta, g)
    assert_close(o, o_ref)


@pytest.mark.parametrize("g_mode", [None, "rand"])
def test_gradcheck(g_mode):
    q, k, v, beta, g, s0 = inputs(1, 5, 1, 3, 2, g_mode)
    if g is not None:
        g = g - 0.05  # finite differences must stay inside g <= 0
    args = [x.requires_grad_() for x in (q, k, v, beta, s0)]
    if g is not None:
        args.append(g.requires_grad_())

    def f(q, k, v, beta, s0, g=None):
        return chunk_delta_rule(q, k, v, beta, g, initial_state=s0, output_final_state=True,
                                chunk_size=2)

    assert torch.autograd.gradcheck(f, tuple(args))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("g_value", [-20.0, -5.0, -0.01])
def test_gradients_match_recurrent_under_any_decay(g_value, dtype):
    # g = -20 over a 64-token chunk drives exp(G) to 0 in float32: the masked-before-exp decay
    # ratios must keep the backward free of inf * 0, and the gradient of g (tiny there) must not
    # be swamped by rounding noise of cancelling terms (why Gamma is built from segment sums).
    q, k, v, beta, g, s0 = inputs(1, 70, 2, 16, 8, g_value)
    grads = []
    for fn, dt in ((chunk_delta_rule, dtype), (recurrent, F64)):
        xs = [x.to(dt).requires_grad_() for x in (q, k, v, beta, g, s0)]
        o, s = fn(*xs[:5], initial_state=xs[5], output_final_state=True)
        (o.square().sum() + s.square().sum()).backward()
        grads.append([x.grad for x in xs])
    for name, a, b in zip(("q", "k", "v", "beta", "g", "initial_state"), *grads, strict=True):
        assert_close(a, b, dtype=dtype, what=f"grad {name}")


RECIPES = [
    pytest.param(Recipe(Weights.uniform(), FunctionClass.linear(), Optimizer.sgd()),
                 id="deltanet"),
    pytest.param(Recipe(Weights.geometric(), FunctionClass.linear(), Optimizer.sgd()),
                 id="gated-deltanet"),
    pytest.param(Recipe(Weights.uniform(), FunctionClass.linear(),
                        Optimizer.sgd(weight_decay=0.3)), id="leaky-lms-eq37"),
    pytest.param(Recipe(Weights.geometric(), FunctionClass.linear(),
                        Optimizer.sgd("longhorn")), id="longhorn-eq31"),
    pytest.param(Recipe(Weights.uniform(), FunctionClass.linear(), Optimizer.sgd("nlms")),
                 id="nlms-eq33"),
]


@pytest.mark.parametrize("recipe", RECIPES)
def test_chunk_equals_reference_sgd(recipe):
    q, k, v, beta, g, _ = inputs(2, 11, 2, 6, 3, "rand", state=False)
    k = k * 1.3  # non-unit keys, so that the step-size rules differ from constant beta
    need = recipe.needs()
    g = g if need["g"] else None
    beta = beta if need["beta"] else None
    expected = solve(recipe, q, k, v, g=g, beta=beta)  # [B, T, H, Dv] float64
    # The recipe -> op translation (step-size rule, Eq. 41 weight decay as decay + scaled v).
    b_op, g_op, v_scale = sgd_gates(recipe, k, beta, g)
    v_op = v if v_scale is None else v * v_scale.unsqueeze(-1)
    o, _ = chunk_delta_rule(q, k, v_op, b_op, g_op, chunk_size=4)
    assert_close(o, expected, what=str(recipe.optimizer))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_computes_in_float32(dtype):
    q, k, v, beta, g, s0 = inputs(1, 50, 2, 16, 8, "rand")
    half = [x.to(dtype) for x in (q, k, v, beta, g)]
    o, s = chunk_delta_rule(*half, initial_state=s0.float(), output_final_state=True,
                            chunk_size=16)
    assert o.dtype == dtype and s.dtype == torch.float32
    o_ref, s_ref = recurrent(*(x.to(F64) for x in half), initial_state=s0,
                             output_final_state=True)
    assert_close(o, o_ref)
    assert_close(s, s_ref, tol=1e-4)  # the state never passes through half precision


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 2), T=st.integers(1, 40), H=st.integers(1, 3), Dk=st.integers(1, 9),
       Dv=st.integers(1, 9), C=st.integers(1, 48), decay=st.booleans(), seed=st.integers(0, 99))
def test_property_any_shape_equals_recurrent(B, T, H, Dk, Dv, C, decay, seed):
    q, k, v, beta, g, s0 = inputs(B, T, H, Dk, Dv, "rand" if decay else None, seed=seed)
    o, s = chunk_delta_rule(q, k, v, beta, g, initial_state=s0, output_final_state=True,
                            chunk_size=C)
    o_ref, s_ref = recurrent(q, k, v, beta, g, initial_state=s0, output_final_state=True)
    assert o.shape == (B, T, H, Dv) and s.shape == (B, H, Dk, Dv)
    assert_close(o, o_ref, what="output")
    assert_close(s, s_ref, what="final state")


def _bad(**over):
    q, k, v, beta, g, s0 = inputs(1, 5, 2, 4, 3, "rand")
    kw = dict(q=q, k=k, v=v, beta=beta, g=g, initial_state=s0, chunk_size=4)
    kw.update(over)
    return kw


@pytest.mark.parametrize("over, err, name", [
    (dict(beta=None), ValueError, "beta"),
    (dict(beta=torch.rand(1, 5, 3, dtype=F64)), ValueError, "beta"),
    (dict(g=torch.full((1, 5, 2), 0.1, dtype=F64)), ValueError, "g"),
    (dict(g=-torch.rand(1, 5, 2, 4, dtype=F64)), ValueError, "g"),  # per-dim decay: not here
    (dict(initial_state=torch.zeros(1, 2, 3, 4, dtype=F64)), ValueError, "initial_state"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(chunk_size=True), ValueError, "chunk_size"),
    (dict(v=torch.zeros(1, 6, 2, 3, dtype=F64)), ValueError, "v"),
    (dict(k=torch.zeros(1, 5, 2, 4, dtype=torch.float32)), TypeError, "k"),
])
def test_bad_input_names_the_argument(over, err, name):
    kw = _bad(**over)
    with pytest.raises(err, match=f"^{name}"):
        chunk_delta_rule(kw.pop("q"), kw.pop("k"), kw.pop("v"), kw.pop("beta"), kw.pop("g"),
                         **kw)


@pytest.mark.parametrize("half", [False, True], ids=["float64", "bf16-autocast"])
@pytest.mark.parametrize("with_s0", [False, True], ids=["no-s0", "s0"])
@pytest.mark.parametrize("gated", [False, True], ids=["delta", "gated"])
def test_factored_backward_equals_autograd(written_out_equals_autograd, half, with_s0, gated):
    """On the CPU, with every chunk mild, the chunk form is `_FactoredDelta` (the decay factored
    through the chunk start, the backward written out); against the decay-matrix path autograd
    differentiates (taken when compiling): outputs, final state and the gradients of q, k, v,
    beta, g and the initial state, in float64 and under bf16 autocast."""
    dt = torch.float32 if half else F64
    q, k, v, beta, g, s0 = (None if x is None else x.to(dt) for x in
                            inputs(2, 37, 2, 5, 3, "rand" if gated else None, seed=7))
    g = None if g is None else 0.3 * g  # chunks of 8 decaying by at most e^-2.4: all mild
    s0 = s0 if with_s0 else None
    gen = torch.Generator().manual_seed(8)
    w = torch.randn(2, 37, 2, 3, dtype=dt, generator=gen)
    ws = torch.randn(2, 2, 5, 3, dtype=dt, generator=gen)

    def run():
        xs = [x.clone().requires_grad_() for x in (q, k, v, beta, g, s0) if x is not None]
        it = iter(xs)
        args = [next(it) for _ in range(4)] + [next(it) if gated else None]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=half):
            o, S = chunk_delta_rule(*args, initial_state=next(it) if with_s0 else None,
                                    output_final_state=True, chunk_size=8)
        loss = (o.to(dt) * w).sum() + (S * ws).sum()
        return [o, S, *torch.autograd.grad(loss, xs)]

    # under bf16 the two paths round different products ((q e^G)(k e^-G)^T against q k^T times
    # a decay matrix), so they agree to bf16's relative RMSE bound
    written_out_equals_autograd(delta_factored._FactoredDelta, delta_chunk, run,
                                tol=2e-2 if half else 1e-10, rmse=half)


def test_strong_decay_takes_the_decay_matrix_path(monkeypatch):
    """A chunk decaying by more than e^-FACTOR_SPAN leaves the factors e^-G unbounded: the whole
    call then takes the exact decay-matrix path, and still equals the spec."""
    q, k, v, beta, g, s0 = inputs(1, 40, 2, 6, 4, -0.5)  # chunks of 16 decay by e^-8
    monkeypatch.setattr(delta_factored._FactoredDelta, "apply", None)  # must not be called
    o, s = chunk_delta_rule(q, k, v, beta, g, initial_state=s0, output_final_state=True,
                            chunk_size=16)
    o_ref, s_ref = recurrent(q, k, v, beta, g, initial_state=s0, output_final_state=True)
    assert_close(o, o_ref)
    assert_close(s, s_ref)

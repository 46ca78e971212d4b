"""local_linear_attention (p = 1 local polynomial, Eq. 52-54): the recurrent spec and the naive
form vs reference, naive and blocked vs the spec, ridge vs a literal weighted ridge fit, decoding
steps, large norms, gradients, state, packing, input."""

from __future__ import annotations

import math

import pytest
import torch

from ttr.ops.local_linear import local_linear_attention
from ttr.ops.local_linear_moments import _packed_outer, _unpack
from ttr.ops.steps import local_linear_attention_step
from ttr.recipe import FunctionClass, Optimizer, Recipe, Weights
from ttr.reference import solve
from ttr.testing import assert_close

F64 = torch.float64


def qkv(B, T, H, Dk, Dv, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, T, H, d, generator=g, dtype=dtype) for d in (Dk, Dk, Dv))


# Explicit bandwidths are moderate: the moments form G = X^T W X squares the design's
# condition number, which the reference (pinv of the design X) does not.
@pytest.mark.parametrize("T, Dk, bandwidth", [
    pytest.param(1, 8, None, id="T1"),
    pytest.param(2, 8, None, id="T2"),
    pytest.param(3, 8, 6.0, id="T3-bw6"),
    pytest.param(3, 60, None, id="T3-D60"),
    pytest.param(37, 8, None, id="T37"),
    pytest.param(37, 60, 20.0, id="T37-D60-bw20"),
    pytest.param(23, 4, 3.0, id="T23-D4-bw3"),
    pytest.param(23, 5, 3.0, id="T23-D5-bw3"),  # odd Dk: the packing has no doubled row
])
@pytest.mark.parametrize("form", ["recurrent", "naive"])
def test_equals_reference(form, T, Dk, bandwidth):
    q, k, v = qkv(2, T, 3, Dk, 5)
    recipe = Recipe(Weights.local(bandwidth), FunctionClass.local_polynomial(1), Optimizer.exact())
    o, _ = local_linear_attention(q, k, v, bandwidth=bandwidth, form=form)
    assert_close(o, solve(recipe, q, k, v), F64, what=f"{form} vs reference")


@pytest.mark.parametrize("D", [1, 2, 3, 5, 8, 64])
def test_packed_outer_products_unpack_to_the_outer_product(D):
    x = torch.randn(3, 7, D, dtype=F64, requires_grad=True)
    outer = x[..., :, None] * x[..., None, :]
    assert _packed_outer(x).shape[-1] == (D // 2 + 1) * D
    assert torch.equal(_unpack(_packed_outer(x), D), outer)  # under autograd
    with torch.no_grad():
        assert torch.equal(_unpack(_packed_outer(x), D), outer)  # written in place


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype, ridge", [
    pytest.param(F64, 0.0, id="f64"), pytest.param(F64, 0.1, id="f64-ridge"),
    pytest.param(torch.float32, 0.1, id="f32-ridge"),
])
def test_naive_equals_recurrent(dtype, ridge, causal):
    """The moments form (centered, Eq. 54) against the spec's joint solve of Eq. 52-53, with a
    cache of earlier keys."""
    q, k, v = qkv(2, 19, 3, 12, 5, dtype)
    cache = tuple(x[:, :6] for x in qkv(2, 6, 3, 12, 5, dtype, seed=1)[1:])
    kw = {"ridge": ridge, "causal": causal, "initial_state": cache}
    o_r, _ = local_linear_attention(q, k, v, form="recurrent", **kw)
    o_n, _ = local_linear_attention(q, k, v, form="naive", **kw)
    assert o_r.dtype == dtype
    assert_close(o_n, o_r, dtype, what="naive vs recurrent")


@pytest.mark.parametrize("ridge", [0.0, 0.2])
def test_step_decoding_equals_the_forms(ridge):
    """Token by token from an empty cache: the step's outputs equal the recurrent and the
    blocked forms over the whole sequence, and its cache is every key and value seen."""
    q, k, v = qkv(2, 11, 3, 6, 4)
    state, outs = None, []
    for t in range(q.shape[1]):
        o_t, state = local_linear_attention_step(q[:, t], k[:, t], v[:, t], state,
                                                 bandwidth=3.0, ridge=ridge)
        assert o_t.shape == (2, 3, 4) and state[0].shape == (2, t + 1, 3, 6)
        outs.append(o_t)
    o = torch.stack(outs, 1)
    for form in ("recurrent", "blocked"):
        expected, _ = local_linear_attention(q, k, v, bandwidth=3.0, ridge=ridge, form=form,
                                             block_size=4)
        assert_close(o, expected, F64, what=f"steps vs {form}")
    assert torch.equal(state[0], k) and torch.equal(state[1], v)


def test_step_bad_input_names_argument():
    q, k, v = qkv(2, 1, 2, 3, 3)
    with pytest.raises(ValueError, match="v_t"):
        local_linear_attention_step(q[:, 0], k[:, 0], v[:, 0, :1])
    with pytest.raises(ValueError, match="state"):
        local_linear_attention_step(q[:, 0], k[:, 0], v[:, 0],
                                    (torch.zeros(2, 1, 2, 4), torch.zeros(2, 1, 2, 3)))
    with pytest.raises(ValueError, match="ridge"):
        local_linear_attention_step(q[:, 0], k[:, 0], v[:, 0], ridge=-1.0)


# float32 with ridge = 0 solves nearly singular normal equations (weights concentrate on a few
# keys), so it is compared with a ridge; float64 runs both.
@pytest.mark.parametrize("dtype, ridge", [
    pytest.param(F64, 0.0, id="f64"), pytest.param(F64, 0.1, id="f64-ridge"),
    pytest.param(torch.float32, 0.1, id="f32-ridge"),
])
@pytest.mark.parametrize("T, block_size", [(37, 16), (5, 16), (33, 8)])
def test_blocked_equals_naive(dtype, ridge, T, block_size):
    q, k, v = qkv(2, T, 3, 60, 7, dtype)
    o_n, _ = local_linear_attention(q, k, v, ridge=ridge, form="naive")
    o_b, _ = local_linear_attention(q, k, v, ridge=ridge, form="blocked", block_size=block_size)
    assert o_b.dtype == dtype
    assert_close(o_b, o_n, dtype, what="blocked vs naive")


def test_bfloat16_accumulates_in_float32():
    q, k, v = qkv(1, 20, 2, 8, 4, torch.bfloat16)
    o, _ = local_linear_attention(q, k, v, ridge=0.1, block_size=8)
    expected, _ = local_linear_attention(*(x.double() for x in (q, k, v)), ridge=0.1, form="naive")
    assert o.dtype == torch.bfloat16
    assert_close(o, expected, torch.bfloat16)


def test_blocked_float32_training_accuracy():
    """Output and gradients of the blocked form in float32 (its two-pass ridge path: the output
    is read off the attention weights, one right-hand side per query) against the float64
    naive form, at a rank-deficient MQAR-like size (T <= Dk): measured 9e-6 to 1e-5 (the one-pass
    solve with Dv + 1 right-hand sides it replaced: 4e-6 to 1e-5)."""
    q, k, v = (x.requires_grad_() for x in qkv(2, 96, 2, 64, 64))
    g = torch.randn(2, 96, 2, 64, dtype=F64)
    o64 = local_linear_attention(q, k, v, ridge=0.1, form="naive")[0]
    expected = (o64, *torch.autograd.grad(o64, (q, k, v), g))
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    o32 = local_linear_attention(q32, k32, v32, ridge=0.1, form="blocked", block_size=32)[0]
    got = (o32, *torch.autograd.grad(o32, (q32, k32, v32), g.float()))
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, expected, strict=True):
        assert_close(a, b, torch.float32, what=f"float32 blocked {name}")


def literal_ridge(q, k, v, bandwidth, ridge):
    """min sum_i p_i ||v_i - M0 - M1 d_i||^2 + ridge ||M1||^2 per query, by normal equations."""
    B, T, H, Dk = q.shape
    out = torch.zeros(B, T, H, v.shape[-1], dtype=F64)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                d = k[b, :t + 1, h] - q[b, t, h]  # [t+1, Dk]
                w = torch.exp(-(d * d).sum(-1) / bandwidth)
                p = w / w.sum()
                X = torch.cat([torch.ones(t + 1, 1, dtype=F64), d], 1)  # [t+1, 1+Dk]
                A = X.T @ (p[:, None] * X)
                A[1:, 1:] += ridge * torch.eye(Dk, dtype=F64)  # ridge on M1 only
                theta = torch.linalg.solve(A, X.T @ (p[:, None] * v[b, :t + 1, h]))
                out[b, t, h] = theta[0]
    return out


@pytest.mark.parametrize("form", ["recurrent", "naive", "blocked"])
def test_ridge_equals_literal(form):
    q, k, v = qkv(2, 9, 2, 4, 3)
    expected = literal_ridge(q, k, v, 2.5, 0.3)
    o, _ = local_linear_attention(q, k, v, bandwidth=2.5, ridge=0.3, form=form, block_size=4)
    assert_close(o, expected, F64)


@pytest.mark.parametrize("ridge", [0.0, 1e-3])
def test_large_norm_queries_stay_finite(ridge):
    # ||k - q||^2 / bandwidth ~ 4e3: exp underflows without the online max; T = 16384
    q, k, v = qkv(1, 16384, 1, 16, 8, torch.float32)
    o, _ = local_linear_attention(30 * q, 30 * k, v, ridge=ridge, block_size=256)
    assert torch.isfinite(o).all()


@pytest.mark.parametrize("form", ["recurrent", "naive", "blocked"])
def test_gradcheck(form):
    q, k, v = (x.requires_grad_() for x in qkv(1, 5, 2, 3, 2))
    fn = lambda q, k, v: local_linear_attention(q, k, v, ridge=0.2, form=form, block_size=2)[0]
    assert torch.autograd.gradcheck(fn, (q, k, v))


def _graph(fn) -> list[str]:
    seen, stack, names = set(), [fn], []
    while stack:
        f = stack.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        names.append(type(f).__name__)
        stack.extend(g for g, _ in f.next_functions)
    return names


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("cache", [False, True])
def test_blocked_backward_by_recomputation(causal, cache, recompute):
    """The custom backward of the blocked form (ridge > 0) equals autograd through the naive
    form, for the queries, keys, values and a KV cache, causal or not; and gradcheck holds."""
    q, k, v = (x.requires_grad_() for x in qkv(2, 13, 2, 3, 4))
    state = tuple(x.requires_grad_() for x in qkv(2, 3, 2, 3, 4, seed=1)[1:]) if cache else ()

    def fn(form):
        return lambda q, k, v, *c: local_linear_attention(
            q, k, v, ridge=0.3, bandwidth=2.0, form=form, block_size=4, causal=causal,
            initial_state=c or None, recompute=recompute)[0]

    args = (q, k, v, *state)
    o = fn("blocked")(*args)
    nodes = _graph(o.grad_fn)  # one custom node, not the autograd graph of every block pair
    assert "_BlockedFnBackward" in nodes and len(nodes) < 30, nodes
    g = torch.randn_like(o)
    for a, b in zip(torch.autograd.grad(o, args, g),
                    torch.autograd.grad(fn("naive")(*args), args, g), strict=True):
        assert_close(a, b, F64)
    assert torch.autograd.gradcheck(fn("blocked"), args)


@pytest.mark.parametrize("form", ["recurrent", "naive", "blocked"])
def test_state_carry_over(form):
    q, k, v = qkv(2, 21, 2, 6, 4)
    kw = {"form": form, "block_size": 8, "ridge": 0.05}
    o, S = local_linear_attention(q, k, v, output_final_state=True, **kw)
    o1, S1 = local_linear_attention(q[:, :9], k[:, :9], v[:, :9], output_final_state=True, **kw)
    o2, S2 = local_linear_attention(q[:, 9:], k[:, 9:], v[:, 9:], initial_state=S1,
                                    output_final_state=True, **kw)
    assert_close(torch.cat([o1, o2], 1), o, F64)
    assert_close(S2[0], S[0], F64)
    assert_close(S2[1], S[1], F64)


@pytest.mark.parametrize("with_state", [False, True])
def test_cu_seqlens(with_state):
    q, k, v = qkv(1, 23, 2, 5, 3)
    cu = torch.tensor([0, 7, 8, 23], dtype=torch.int32)
    caches = [tuple(x[:, :3] for x in qkv(1, 3, 2, 5, 3, seed=i + 1)[1:]) for i in range(3)]
    s0 = caches if with_state else None
    o, finals = local_linear_attention(q, k, v, cu_seqlens=cu, initial_state=s0,
                                       output_final_state=True, block_size=4)
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        oi, si = local_linear_attention(q[:, a:b], k[:, a:b], v[:, a:b], block_size=4,
                                        initial_state=caches[i] if with_state else None,
                                        output_final_state=True)
        assert_close(o[:, a:b], oi, F64)
        assert_close(finals[i][0], si[0], F64)


def test_default_bandwidth_is_eq51():
    q, k, v = qkv(1, 6, 1, 9, 2)
    o1, _ = local_linear_attention(q, k, v)
    o2, _ = local_linear_attention(q, k, v, bandwidth=2 * math.sqrt(9))
    assert_close(o1, o2, F64)


@pytest.mark.parametrize("kw, name, err", [
    ({"bandwidth": 0.0}, "bandwidth", ValueError),
    ({"bandwidth": "1"}, "bandwidth", TypeError),
    ({"ridge": -1.0}, "ridge", ValueError),
    ({"ridge": float("nan")}, "ridge", ValueError),
    ({"form": "chunk"}, "form", ValueError),
    ({"form": "parallel"}, "form", ValueError),
    ({"block_size": 0}, "block_size", ValueError),
    ({"initial_state": torch.zeros(2, 3)}, "initial_state", TypeError),
    ({"cu_seqlens": torch.tensor([0, 2])}, "cu_seqlens", ValueError),
])
def test_bad_input_names_argument(kw, name, err):
    q, k, v = qkv(2, 4, 2, 3, 3)
    with pytest.raises(err, match=name):
        local_linear_attention(q, k, v, **kw)


def test_bad_shape_names_argument():
    q, k, v = qkv(2, 4, 2, 3, 3)
    with pytest.raises(ValueError, match="v"):
        local_linear_attention(q, k, v[:, :3])
    with pytest.raises(ValueError, match=r"initial_state\[0\]"):
        local_linear_attention(q, k, v, initial_state=(torch.zeros(2, 1, 2, 4), v[:, :1]))

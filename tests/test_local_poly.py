"""local_polynomial_attention (Eq. 48-49, any degree): vs reference for p = 0, 1, 2, vs
softmax_attention (p = 0) and local_linear_attention (p = 1), ridge vs a literal fit,
gradients, state, packing, large norms, input."""

from __future__ import annotations

import math

import pytest
import torch

import ttr.ops.local_poly as local_poly
from ttr.ops.local import softmax_attention
from ttr.ops.local_linear import local_linear_attention
from ttr.ops.local_poly import local_polynomial_attention, monomials
from ttr.recipe import FunctionClass, Optimizer, Recipe, Weights
from ttr.reference import _monomials, solve
from ttr.testing import assert_close

F64 = torch.float64


def qkv(B, T, H, Dk, Dv, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, T, H, d, generator=g, dtype=dtype) for d in (Dk, Dk, Dv))


@pytest.fixture
def small_query_block(monkeypatch):
    monkeypatch.setattr(local_poly, "QUERY_BLOCK", 4)  # several query blocks at small T


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_monomials_match_reference(degree):
    d = torch.randn(2, 3, 4, dtype=F64)
    assert torch.equal(monomials(d, degree), _monomials(d, degree))
    assert monomials(d, degree).shape[-1] == math.comb(4 + degree, degree)


@pytest.mark.parametrize("degree", [0, 1, 2])
@pytest.mark.parametrize("T, Dk, bandwidth", [
    pytest.param(1, 3, None, id="T1"),
    pytest.param(9, 3, None, id="T9"),
    pytest.param(23, 3, 3.0, id="T23-bw3"),
    pytest.param(23, 4, None, id="T23-D4"),
])
def test_equals_reference(degree, T, Dk, bandwidth, small_query_block):
    q, k, v = qkv(2, T, 2, Dk, 3)
    recipe = Recipe(Weights.local(bandwidth), FunctionClass.local_polynomial(degree),
                    Optimizer.exact())
    o, _ = local_polynomial_attention(q, k, v, degree=degree, bandwidth=bandwidth)
    assert_close(o, solve(recipe, q, k, v), F64, what="vs reference")


@pytest.mark.parametrize("bandwidth", [None, 2.5])
def test_degree0_is_softmax_attention(bandwidth):
    q, k, v = qkv(2, 17, 3, 6, 4)
    bw = bandwidth if bandwidth is not None else 2 * math.sqrt(6)
    o, _ = local_polynomial_attention(q, k, v, degree=0, bandwidth=bandwidth, ridge=0.5)
    assert_close(o, softmax_attention(q, k, v, bandwidth=bw)[0], F64)


@pytest.mark.parametrize("ridge", [0.0, 0.3])
@pytest.mark.parametrize("T", [1, 5, 19])
def test_degree1_is_local_linear(ridge, T):
    q, k, v = qkv(2, T, 2, 4, 3)
    o, _ = local_polynomial_attention(q, k, v, degree=1, bandwidth=5.0, ridge=ridge)
    expected, _ = local_linear_attention(q, k, v, bandwidth=5.0, ridge=ridge, form="naive")
    assert_close(o, expected, F64)


def literal_ridge(q, k, v, degree, bandwidth, ridge):
    """min sum_i p_i ||v_i - theta^T x(d_i)||^2 + ridge ||theta_{1:}||^2 per query."""
    B, T, H, _ = q.shape
    out = torch.zeros(B, T, H, v.shape[-1], dtype=F64)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                d = k[b, :t + 1, h] - q[b, t, h]  # [t+1, Dk]
                w = torch.exp(-(d * d).sum(-1) / bandwidth)
                p = w / w.sum()
                X = _monomials(d, degree)  # [t+1, P]
                A = X.T @ (p[:, None] * X)
                A[1:, 1:] += ridge * torch.eye(X.shape[1] - 1, dtype=F64)
                out[b, t, h] = torch.linalg.solve(A, X.T @ (p[:, None] * v[b, :t + 1, h]))[0]
    return out


@pytest.mark.parametrize("degree", [1, 2])
def test_ridge_equals_literal(degree, small_query_block):
    q, k, v = qkv(2, 9, 2, 3, 3)
    o, _ = local_polynomial_attention(q, k, v, degree=degree, bandwidth=2.5, ridge=0.3)
    assert_close(o, literal_ridge(q, k, v, degree, 2.5, 0.3), F64)


def test_degree2_fits_a_quadratic_exactly():
    # values that are a quadratic function of the key: the p = 2 fit reproduces it at the query
    q, k, _ = qkv(1, 40, 1, 2, 1)
    f = lambda x: 1 + x[..., :1] - 2 * x[..., 1:] + x[..., :1] * x[..., 1:] + 0.5 * x[..., :1] ** 2
    o, _ = local_polynomial_attention(q, k, f(k), degree=2)
    assert_close(o[:, 10:], f(q)[:, 10:], F64)  # enough keys for the 6 coefficients
    o1, _ = local_polynomial_attention(q, k, f(k), degree=1)
    assert (o1[:, 10:] - f(q)[:, 10:]).norm() > 1e-3 * f(q)[:, 10:].norm()


def test_float32_and_bfloat16():
    q, k, v = qkv(1, 20, 2, 3, 4)
    expected, _ = local_polynomial_attention(q, k, v, degree=2, ridge=0.1)
    for dtype in (torch.float32, torch.bfloat16):
        o, _ = local_polynomial_attention(*(x.to(dtype) for x in (q, k, v)), degree=2, ridge=0.1)
        assert o.dtype == dtype
        assert_close(o, expected, dtype)


@pytest.mark.parametrize("ridge", [0.0, 1e-3])
def test_large_norm_queries_stay_finite(ridge):
    # ||k - q||^2 / bandwidth ~ 1e3: exp underflows to all-zero weights without the max shift
    q, k, v = qkv(1, 200, 1, 3, 2, torch.float32)
    o, _ = local_polynomial_attention(20 * q, 20 * k, v, degree=2, ridge=ridge)
    assert torch.isfinite(o).all()


def test_gradcheck():
    q, k, v = (x.requires_grad_() for x in qkv(1, 5, 2, 2, 2))
    fn = lambda q, k, v: local_polynomial_attention(q, k, v, degree=2, ridge=0.2)[0]
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_gradcheck_ridge0_full_rank_prefixes():
    # pinv's gradient exists where the weighted design has full rank: t >= P = 3 keys here
    q, k, v = (x.requires_grad_() for x in qkv(1, 7, 1, 2, 2))
    fn = lambda q, k, v: local_polynomial_attention(q, k, v, degree=1)[0][:, 4:]
    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("ridge", [0.0, 0.05])
def test_state_carry_over(ridge, small_query_block):
    q, k, v = qkv(2, 21, 2, 3, 4)
    kw = {"degree": 2, "ridge": ridge}
    o, S = local_polynomial_attention(q, k, v, output_final_state=True, **kw)
    o1, S1 = local_polynomial_attention(q[:, :9], k[:, :9], v[:, :9], output_final_state=True,
                                        **kw)
    o2, S2 = local_polynomial_attention(q[:, 9:], k[:, 9:], v[:, 9:], initial_state=S1,
                                        output_final_state=True, **kw)
    assert_close(torch.cat([o1, o2], 1), o, F64)
    assert_close(S2[0], S[0], F64)
    assert_close(S2[1], S[1], F64)


@pytest.mark.parametrize("with_state", [False, True])
def test_cu_seqlens(with_state):
    q, k, v = qkv(1, 23, 2, 3, 3)
    cu = torch.tensor([0, 7, 8, 23], dtype=torch.int32)
    caches = [tuple(x[:, :3] for x in qkv(1, 3, 2, 3, 3, seed=i + 1)[1:]) for i in range(3)]
    s0 = caches if with_state else None
    o, finals = local_polynomial_attention(q, k, v, degree=2, ridge=0.1, cu_seqlens=cu,
                                           initial_state=s0, output_final_state=True)
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        oi, si = local_polynomial_attention(q[:, a:b], k[:, a:b], v[:, a:b], degree=2,
                                            ridge=0.1, output_final_state=True,
                                            initial_state=caches[i] if with_state else None)
        assert_close(o[:, a:b], oi, F64)
        assert_close(finals[i][0], si[0], F64)


@pytest.mark.parametrize("kw, name, err", [
    ({}, "degree", TypeError),
    ({"degree": -1}, "degree", ValueError),
    ({"degree": True}, "degree", ValueError),
    ({"degree": 1.0}, "degree", ValueError),
    ({"degree": 2, "bandwidth": 0.0}, "bandwidth", ValueError),
    ({"degree": 2, "bandwidth": "1"}, "bandwidth", TypeError),
    ({"degree": 2, "ridge": -1.0}, "ridge", ValueError),
    ({"degree": 2, "ridge": float("nan")}, "ridge", ValueError),
    ({"degree": 2, "initial_state": torch.zeros(2, 3)}, "initial_state", TypeError),
    ({"degree": 2, "cu_seqlens": torch.tensor([0, 2])}, "cu_seqlens", ValueError),
])
def test_bad_input_names_argument(kw, name, err):
    q, k, v = qkv(2, 4, 2, 3, 3)
    with pytest.raises(err, match=name):
        local_polynomial_attention(q, k, v, **kw)


def test_bad_shape_names_argument():
    q, k, v = qkv(2, 4, 2, 3, 3)
    with pytest.raises(ValueError, match="v"):
        local_polynomial_attention(q, k, v[:, :3], degree=2)
    with pytest.raises(ValueError, match=r"initial_state\[0\]"):
        local_polynomial_attention(q, k, v, degree=2,
                                   initial_state=(torch.zeros(2, 1, 2, 4), v[:, :1]))

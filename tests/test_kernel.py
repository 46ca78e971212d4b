"""kernel_regression (Eq. 42-47): blocked vs recurrent vs reference for every kernel and both
solvers, sample weights, state, packing, gradients, causality, ridge -> 0, large norms, input."""

from __future__ import annotations

import pytest
import torch

from ttr.ops.kernel import kernel_regression
from ttr.recipe import FunctionClass, Optimizer, Recipe, Weights
from ttr.reference import solve
from ttr.testing import assert_close

F64 = torch.float64
KERNELS = [pytest.param("exp", None, id="exp"), pytest.param("rbf", None, id="rbf"),
           pytest.param("polynomial", 2, id="poly2"), pytest.param("polynomial", 3, id="poly3")]


def qkv(B, T, H, Dk, Dv, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, T, H, d, generator=g, dtype=dtype) for d in (Dk, Dk, Dv))


def weights(B, T, H, seed=1):
    return torch.rand(B, T, H, generator=torch.Generator().manual_seed(seed), dtype=F64) + 0.1


def recipe(kernel, degree, ridge):
    opt = Optimizer.gd() if ridge is None else Optimizer.exact(ridge)
    return Recipe(Weights.uniform(), FunctionClass.kernel_class(kernel, degree), opt)


@pytest.mark.parametrize("kernel, degree", KERNELS)
@pytest.mark.parametrize("ridge, weighted", [
    pytest.param(0.5, False, id="ridge"), pytest.param(0.5, True, id="ridge-beta"),
    pytest.param(0.0, False, id="ridge0"), pytest.param(None, False, id="gd"),
])
@pytest.mark.parametrize("T, block_size", [(1, 4), (13, 4), (13, 64)])
def test_forms_equal_reference(kernel, degree, ridge, weighted, T, block_size):
    if ridge == 0.0 and kernel == "polynomial":
        pytest.skip("a polynomial Gram is singular beyond C(Dk + p, p) keys "
                    "(test_ridge_zero_singular_raises)")
    q, k, v = qkv(2, T, 3, 6, 4)
    beta = weights(2, T, 3) if weighted else None
    expected = solve(recipe(kernel, degree, ridge), q, k, v, beta=beta)
    solver = "gd" if ridge is None else "exact"
    for form in ("recurrent", "blocked"):
        o, _ = kernel_regression(q, k, v, beta, kernel=kernel, degree=degree, ridge=ridge,
                                 solver=solver, form=form, block_size=block_size)
        assert_close(o, expected, F64, what=f"{form} vs reference")


@pytest.mark.parametrize("kernel, degree", KERNELS)
@pytest.mark.parametrize("solver", ["exact", "gd"])
def test_float32_and_bfloat16(kernel, degree, solver):
    q, k, v = qkv(1, 37, 2, 8, 5)
    ridge = 1.0 if solver == "exact" else None
    expected = solve(recipe(kernel, degree, ridge), q, k, v)
    for dtype in (torch.float32, torch.bfloat16):
        o, _ = kernel_regression(*(x.to(dtype) for x in (q, k, v)), kernel=kernel, degree=degree,
                                 ridge=ridge, solver=solver, block_size=16)
        assert o.dtype == dtype
        # bf16 inputs are rounded before the float32 computation: compare with those inputs
        exp = expected if dtype == torch.float32 else solve(
            recipe(kernel, degree, ridge), *(x.to(dtype) for x in (q, k, v)))
        assert_close(o, exp, dtype)


@pytest.mark.parametrize("solver", ["exact", "gd"])
@pytest.mark.parametrize("form", ["recurrent", "blocked"])
@pytest.mark.parametrize("weighted", [False, True])
def test_state_carry_over(solver, form, weighted):
    q, k, v = qkv(2, 21, 2, 5, 3)
    beta = weights(2, 21, 2) if weighted else None
    kw = {"solver": solver, "form": form, "block_size": 8, "output_final_state": True,
          "ridge": 0.3 if solver == "exact" else None}
    o, S = kernel_regression(q, k, v, beta, **kw)
    cut = lambda x, a, b: None if x is None else x[:, a:b]
    o1, S1 = kernel_regression(q[:, :9], k[:, :9], v[:, :9], cut(beta, 0, 9), **kw)
    o2, S2 = kernel_regression(q[:, 9:], k[:, 9:], v[:, 9:], cut(beta, 9, 21),
                               initial_state=S1, **kw)
    assert_close(torch.cat([o1, o2], 1), o, F64)
    assert len(S2) == (3 if weighted else 2)
    for a, b in zip(S2, S, strict=True):
        assert_close(a, b, F64)


def test_cache_pair_means_unit_weights():
    q, k, v = qkv(1, 10, 2, 4, 3)
    beta = weights(1, 10, 2)
    ones = torch.ones_like(beta)
    o, _ = kernel_regression(q, k, v, torch.cat([ones[:, :4], beta[:, 4:]], 1), ridge=0.3)
    _, S1 = kernel_regression(q[:, :4], k[:, :4], v[:, :4], ridge=0.3, output_final_state=True)
    o2, S2 = kernel_regression(q[:, 4:], k[:, 4:], v[:, 4:], beta[:, 4:], ridge=0.3,
                               initial_state=S1, output_final_state=True)
    assert len(S1) == 2 and len(S2) == 3
    assert_close(o2, o[:, 4:], F64)
    assert_close(S2[2][:, :4], ones[:, :4], F64)


@pytest.mark.parametrize("solver", ["exact", "gd"])
@pytest.mark.parametrize("with_state", [False, True])
def test_cu_seqlens(solver, with_state):
    q, k, v = qkv(1, 23, 2, 5, 3)
    beta = weights(1, 23, 2)
    cu = torch.tensor([0, 7, 8, 23], dtype=torch.int32)
    caches = [tuple(x[:, :3] for x in qkv(1, 3, 2, 5, 3, seed=i + 1)[1:]) for i in range(3)]
    kw = {"solver": solver, "block_size": 4, "ridge": 0.3 if solver == "exact" else None}
    o, finals = kernel_regression(q, k, v, beta, cu_seqlens=cu, output_final_state=True,
                                  initial_state=caches if with_state else None, **kw)
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        oi, si = kernel_regression(q[:, a:b], k[:, a:b], v[:, a:b], beta[:, a:b],
                                   initial_state=caches[i] if with_state else None,
                                   output_final_state=True, **kw)
        assert_close(o[:, a:b], oi, F64)
        for x, y in zip(finals[i], si, strict=True):
            assert_close(x, y, F64)


@pytest.mark.parametrize("kernel, degree", KERNELS[:3])
@pytest.mark.parametrize("solver", ["exact", "gd"])
def test_gradcheck(kernel, degree, solver):
    q, k, v = (x.requires_grad_() for x in qkv(1, 6, 2, 3, 2))
    beta = weights(1, 6, 2).requires_grad_()
    ridge = 0.3 if solver == "exact" else None
    fn = lambda q, k, v, beta: kernel_regression(q, k, v, beta, kernel=kernel, degree=degree,
                                                 ridge=ridge, solver=solver, block_size=4)[0]
    assert torch.autograd.gradcheck(fn, (q, k, v, beta))


@pytest.mark.parametrize("solver", ["exact", "gd"])
def test_causal(solver):
    q, k, v = qkv(2, 11, 2, 4, 3)
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, 6:] = 5 * torch.randn_like(x[:, 6:])
    kw = {"solver": solver, "block_size": 4, "ridge": 0.3 if solver == "exact" else None}
    o, _ = kernel_regression(q, k, v, **kw)
    o2, _ = kernel_regression(q2, k2, v2, **kw)
    assert torch.equal(o[:, :6], o2[:, :6])


@pytest.mark.parametrize("kernel", ["exp", "rbf"])
def test_ridge_zero_interpolates(kernel):
    # distinct keys: the Gram is positive definite and the fit passes through every pair
    q, k, v = qkv(2, 15, 2, 8, 3)
    o, _ = kernel_regression(k, k, v, kernel=kernel, ridge=0.0, block_size=4)
    assert_close(o, v, F64)
    o_small, _ = kernel_regression(k, k, v, kernel=kernel, ridge=1e-9, block_size=4)
    assert_close(o_small, v, F64, tol=1e-6)
    o_big, _ = kernel_regression(k, k, v, kernel=kernel, ridge=1e3, block_size=4)
    assert (o_big - v).norm() > 0.5 * v.norm()  # a large ridge shrinks towards 0


@pytest.mark.parametrize("case", ["duplicate-keys", "polynomial", "zero-weight"])
def test_ridge_zero_singular_raises(case):
    q, k, v = qkv(1, 12, 1, 3, 2)
    kw, beta = {"ridge": 0.0, "block_size": 4}, None  # the failure is in a later block
    if case == "duplicate-keys":
        k[:, 7] = k[:, 2]
    elif case == "polynomial":
        kw.update(kernel="polynomial", degree=1)  # rank <= Dk + 1 = 4 < 12 keys
    else:
        beta = torch.ones(1, 12, 1, dtype=F64)
        beta[:, 5] = 0
    with pytest.raises(ValueError, match="ridge.*positive definite"):
        kernel_regression(q, k, v, beta, **kw)
    if case == "zero-weight":  # an exact zero pivot: the LU of the spec sees it too
        with pytest.raises(ValueError, match="ridge.*singular"):
            kernel_regression(q, k, v, beta, form="recurrent", **kw)


def test_large_norms_stay_finite():
    # The raw exp Gram exp(k.k / sqrt(Dk)) overflows float32 here (k.k/4 = 225); the scaled
    # factorization does not. Queries far from the keys in norm (x5) give outputs ~1e11.
    q, k, v = qkv(1, 2048, 1, 16, 4)
    unit = lambda x: x / x.norm(dim=-1, keepdim=True)
    for qs, ks in [(30 * unit(q), 30 * unit(k)), (30 * unit(k) + 0.1 * q, 30 * unit(k)),
                   (5 * q, k)]:
        o32, _ = kernel_regression(qs.float(), ks.float(), v.float(), block_size=256)
        o64, _ = kernel_regression(qs, ks, v, block_size=256)
        assert torch.isfinite(o32).all()
        assert_close(o32, o64, torch.float32)


def test_gd_beyond_the_exp_range():
    # logits up to ~120 > 88.7: exp overflows float32, the shifted sum does not
    q, k, v = qkv(1, 64, 1, 16, 4, torch.float32)
    q = 60 * q / q.norm(dim=-1, keepdim=True)
    k = 8 * k / k.norm(dim=-1, keepdim=True)
    v = 1e-20 * v
    o, _ = kernel_regression(q, k, v, solver="gd")
    expected, _ = kernel_regression(q.double(), k.double(), v.double(), solver="gd",
                                    form="recurrent")
    assert expected.abs().max() < 1e30 and torch.isfinite(o).all()
    assert_close(o, expected, torch.float32)


@pytest.mark.parametrize("kw, name, err", [
    ({"kernel": "laplace"}, "kernel", ValueError),
    ({"kernel": "polynomial"}, "degree", ValueError),
    ({"kernel": "polynomial", "degree": 0}, "degree", ValueError),
    ({"degree": 2}, "degree", ValueError),
    ({"ridge": -1.0}, "ridge", ValueError),
    ({"ridge": float("inf")}, "ridge", ValueError),
    ({"ridge": "1"}, "ridge", TypeError),
    ({"solver": "gd", "ridge": 1.0}, "ridge", ValueError),
    ({"solver": "cg"}, "solver", ValueError),
    ({"form": "chunk"}, "form", ValueError),
    ({"block_size": 0}, "block_size", ValueError),
    ({"initial_state": torch.zeros(2, 3)}, "initial_state", TypeError),
    ({"initial_state": (torch.zeros(2, 1, 2, 3),) * 4}, "initial_state", TypeError),
    ({"cu_seqlens": torch.tensor([0, 2])}, "cu_seqlens", ValueError),
])
def test_bad_input_names_argument(kw, name, err):
    q, k, v = qkv(2, 4, 2, 3, 3)
    with pytest.raises(err, match=name):
        kernel_regression(q, k, v, **kw)


def test_bad_shapes_name_argument():
    q, k, v = qkv(2, 4, 2, 3, 3)
    with pytest.raises(ValueError, match="v"):
        kernel_regression(q, k, v[:, :3])
    with pytest.raises(ValueError, match="beta"):
        kernel_regression(q, k, v, torch.ones(2, 4, 3, dtype=F64))
    with pytest.raises(ValueError, match="beta"):
        kernel_regression(q, k, v, -torch.ones(2, 4, 2, dtype=F64))
    with pytest.raises(ValueError, match=r"initial_state\[0\]"):
        kernel_regression(q, k, v, initial_state=(torch.zeros(2, 1, 2, 4), v[:, :1]))
    with pytest.raises(ValueError, match=r"initial_state\[2\] \(beta\)"):
        kernel_regression(q, k, v, initial_state=(k[:, :1], v[:, :1], torch.ones(2, 2, 2)))

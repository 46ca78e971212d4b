"""`ttr.ops.inverse_cholesky`: the blocked inverse Cholesky factor and lower-triangular inverse
against LAPACK's, values and gradients (float64, sizes below, at and above the recursion's leaf
size, odd splits), gradchecks, float32 accuracy on the delta rule's ill-conditioned case, and the
error on a matrix that is not positive definite."""

import pytest
import torch

from ttr.ops import NumericalError
from ttr.ops.inverse_cholesky import BASE, inverse_cholesky, inverse_lower


def spd(n: int, batch=(3,), seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(*batch, n, n, dtype=torch.float64, generator=gen)
    return X @ X.mT / n + 0.1 * torch.eye(n, dtype=torch.float64)


def value_and_grad(f, X, G):
    """f(X) and the gradient of sum(f(X) * G) with respect to X."""
    X = X.clone().requires_grad_()
    W = f(X)
    (W * G).sum().backward()
    return W, X.grad


@pytest.mark.parametrize("n", [1, 5, BASE, BASE + 1, 37, 64])
def test_equals_lapack_with_gradients(n):
    S = spd(n, batch=(2, 3))
    G = torch.randn(S.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    eye = torch.eye(n, dtype=torch.float64)

    def lapack(S):
        return torch.linalg.solve_triangular(torch.linalg.cholesky(S), eye.expand_as(S),
                                             upper=False)

    (W, dS), (W0, dS0) = (value_and_grad(f, S, G) for f in (inverse_cholesky, lapack))
    torch.testing.assert_close(W, W0, rtol=1e-10, atol=1e-10)
    assert torch.equal(W, W.tril())
    torch.testing.assert_close(dS, dS0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(W.mT @ W, torch.linalg.inv(S), rtol=1e-9, atol=1e-9)


def test_gradcheck():
    X = torch.randn(2, 21, 21, dtype=torch.float64, requires_grad=True)
    eye = torch.eye(21, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda X: inverse_cholesky(X @ X.mT / 21 + eye), (X,))


def test_not_positive_definite_is_a_numerical_error():
    S = spd(40)
    S[1] = -S[1]
    with pytest.raises(NumericalError, match="not positive definite"):
        inverse_cholesky(S)


@pytest.mark.parametrize("n", [1, 5, BASE, BASE + 1, 37, 64])
def test_inverse_lower_equals_lapack_with_gradients(n):
    gen = torch.Generator().manual_seed(2)
    eye = torch.eye(n, dtype=torch.float64)
    T = 0.3 * torch.randn(2, 3, n, n, dtype=torch.float64, generator=gen).tril(-1) + eye
    T = T + 0.5 * torch.diag_embed(torch.rand(2, 3, n, dtype=torch.float64, generator=gen))
    G = torch.randn(T.shape, dtype=torch.float64, generator=gen)
    (W, dT), (W0, dT0) = (
        value_and_grad(f, T, G) for f in (
            inverse_lower,
            lambda T: torch.linalg.solve_triangular(T, eye.expand_as(T), upper=False)))
    torch.testing.assert_close(W, W0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dT, dT0, rtol=1e-9, atol=1e-9)
    assert torch.equal(dT, dT.tril())


def test_inverse_lower_gradcheck():
    X = torch.randn(2, 19, 19, dtype=torch.float64, requires_grad=True)
    eye = torch.eye(19, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda X: inverse_lower(0.3 * X.tril(-1) + eye), (X,))


def test_inverse_lower_float32_on_nearly_collinear_keys():
    """The delta rule's I + A with beta = 1 and nearly collinear unit keys: the inverse has
    entries <= 1 while powers of A explode; the blocked inverse stays as accurate as LAPACK's."""
    gen = torch.Generator().manual_seed(3)
    C, D = 64, 16
    base = torch.randn(D, dtype=torch.float64, generator=gen)
    k = base + 1e-3 * torch.randn(8, C, D, dtype=torch.float64, generator=gen)
    k = k / k.norm(dim=-1, keepdim=True)
    T = torch.eye(C, dtype=torch.float64) + (k @ k.mT).tril(-1)
    exact = torch.linalg.inv(T)
    eye32 = torch.eye(C).expand(8, C, C)
    errs = [((W.double() - exact).norm() / exact.norm()).item()
            for W in (inverse_lower(T.float()),
                      torch.linalg.solve_triangular(T.float(), eye32, upper=False))]
    assert errs[0] <= 10 * errs[1] + 1e-6, errs

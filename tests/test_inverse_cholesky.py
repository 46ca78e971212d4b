"""`ttr.ops.inverse_cholesky`: the blocked inverse Cholesky factor against LAPACK's, values and
gradients (float64, sizes below, at and above the recursion's leaf size, odd splits), a
gradcheck, and the error on a matrix that is not positive definite."""

import pytest
import torch

from ttr.ops import NumericalError
from ttr.ops.inverse_cholesky import BASE, inverse_cholesky


def spd(n: int, batch=(3,), seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(*batch, n, n, dtype=torch.float64, generator=gen)
    return X @ X.mT / n + 0.1 * torch.eye(n, dtype=torch.float64)


@pytest.mark.parametrize("n", [1, 5, BASE, BASE + 1, 37, 64])
def test_equals_lapack_with_gradients(n):
    S = spd(n, batch=(2, 3))
    G = torch.randn(S.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    eye = torch.eye(n, dtype=torch.float64)

    def lapack(S):
        return torch.linalg.solve_triangular(torch.linalg.cholesky(S), eye.expand_as(S),
                                             upper=False)

    out = []
    for f in (inverse_cholesky, lapack):
        Sr = S.clone().requires_grad_()
        W = f(Sr)
        (W * G).sum().backward()
        out.append((W, Sr.grad))
    (W, dS), (W0, dS0) = out
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

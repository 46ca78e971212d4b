"""Inverse Cholesky factors of many small SPD matrices, and inverses of lower-triangular ones,
by 2 x 2 blocks: matmuls in place of slow batched LAPACK calls.

For S symmetric positive definite [..., n, n] with S = L L^T (L lower triangular, positive
diagonal), `inverse_cholesky(S)` returns W = L^{-1}, lower triangular; S^{-1} = W^T W.

Why not LAPACK: torch runs a batched `cholesky`, `solve_triangular` or `inv` as one LAPACK call
per matrix, and on some CPUs those calls on many 64 x 64 matrices are many times slower than a
batched matmul of the same size (measured on a 2-core AMD EPYC with AVX2, 512 matrices of
64 x 64, forward / forward + backward: cholesky + solve_triangular 47 / 111 ms, LU `inv` 56 / 68
ms, this file 15 / 31 ms). Only the leaves of the recursion, at n <= BASE, call LAPACK.

Forward, splitting at h = n // 2 (the factorization of a 2 x 2 block matrix):

    S = [[S11, S12], [S21, S22]],  L = [[L11, 0], [L21, L22]],  W = [[W11, 0], [W21, W22]];
    L11 L11^T = S11                                  ->  W11 = inverse_cholesky(S11),
    L21 = S21 L11^{-T} = S21 W11^T,
    L22 L22^T = S22 - L21 L21^T  (the Schur complement: SPD)  ->  W22 = inverse_cholesky(.),
    W21 = -W22 L21 W11     (from W L = I: W21 L11 + W22 L21 = 0).

Backward, written out (through the recursion, autograd would repeat the leaves' LAPACK
backward): with G the gradient of W (only its lower triangle counts, W being lower
triangular), dW = -W dL W, so the gradient of L is Lbar = -W^T G W^T, and the Cholesky
backward (Murray 2016, "Differentiation of the Cholesky decomposition", the form torch uses)
gives, using L^T Lbar = -(W L)^T G W^T = -G W^T,

    Sbar = W^T Phi(-G W^T) W,  symmetrized,

with Phi the lower triangle with the diagonal halved: three n x n matmuls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ttr.ops.common import NumericalError, _is_compiling

# leaves of the recursion go to LAPACK; 16 was the fastest leaf size (512 matrices of 64 x 64,
# forward + backward through autograd, AVX2 EPYC: leaves of 8 61-64 ms, 16 53-57, 32 78-79)
BASE = 16


def inverse_cholesky(S: torch.Tensor) -> torch.Tensor:
    """W = L^{-1} for S = L L^T, S [..., n, n] symmetric positive definite (only its lower
    triangle is read). Raises NumericalError if S is not positive definite to working
    precision (not checked while compiling: a data-dependent branch; autograd then differentiates
    the recursion itself)."""
    if _is_compiling():
        return _forward(S, check=False)
    return _BlockInverse.apply(S, True)


def _forward(S: torch.Tensor, check: bool = True) -> torch.Tensor:
    n = S.shape[-1]
    if n <= BASE:
        L, info = torch.linalg.cholesky_ex(S)
        if check and bool((info != 0).any()):
            raise NumericalError(
                f"inverse_cholesky: a matrix is not positive definite to {S.dtype} precision "
                "(a Schur complement of the blocks lost its positive pivots); expected SPD "
                "input, e.g. a larger ridge")
        return torch.linalg.solve_triangular(L, _leaf_eye(L), upper=False)
    h = n // 2
    W11 = _forward(S[..., :h, :h], check)  # [.., h, h]
    L21 = S[..., h:, :h] @ W11.mT  # [.., n - h, h]
    W22 = _forward(S[..., h:, h:] - L21 @ L21.mT, check)  # [.., n - h, n - h]
    return _assemble(W11, -(W22 @ L21) @ W11, W22)


def _assemble(W11, W21, W22):
    """The lower-triangular [[W11, 0], [W21, W22]]."""
    return torch.cat([F.pad(W11, (0, W22.shape[-1])), torch.cat([W21, W22], -1)], -2)


def _leaf_eye(X: torch.Tensor) -> torch.Tensor:
    """The identity right-hand sides of a leaf's LAPACK solve, shaped like X."""
    return torch.eye(X.shape[-1], dtype=X.dtype, device=X.device).expand_as(X)


def inverse_lower(T: torch.Tensor) -> torch.Tensor:
    """T^{-1} for T [..., n, n] lower triangular with a nonzero diagonal (only its lower
    triangle is read), lower triangular itself. By the same 2 x 2 blocks: W11 = T11^{-1} and
    W22 = T22^{-1} (independent, so one call on both when the halves are equal),
    W21 = -W22 T21 W11; LAPACK `solve_triangular` only at n <= BASE. Backward, from dW = -W dT W:
    Tbar = lower triangle of -W^T G W^T (two matmuls).

    Used by the delta rule's chunk form for (I + A)^{-1} (512 matrices of 64 x 64 there)."""
    if _is_compiling():
        return _forward_lower(T)
    return _BlockInverse.apply(T, False)


def _forward_lower(T: torch.Tensor) -> torch.Tensor:
    n = T.shape[-1]
    if n <= BASE:
        return torch.linalg.solve_triangular(T, _leaf_eye(T), upper=False)
    h = n // 2
    if 2 * h == n:  # both diagonal blocks in one call
        W11, W22 = _forward_lower(torch.stack([T[..., :h, :h], T[..., h:, h:]])).unbind(0)
    else:
        W11, W22 = _forward_lower(T[..., :h, :h]), _forward_lower(T[..., h:, h:])
    return _assemble(W11, -(W22 @ T[..., h:, :h]) @ W11, W22)


class _BlockInverse(torch.autograd.Function):
    """W from `_forward` (cholesky=True: W = L^{-1}, S = L L^T) or `_forward_lower` (W = T^{-1}),
    with the backward of each written out (the module docstring and `inverse_lower`)."""

    @staticmethod
    def forward(ctx, X, cholesky: bool):
        W = _forward(X) if cholesky else _forward_lower(X)
        ctx.save_for_backward(W)
        ctx.cholesky = cholesky
        return W

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, G):
        (W,) = ctx.saved_tensors
        if not ctx.cholesky:
            return (W.mT @ G.tril() @ W.mT).tril_().neg_(), None  # -tril(W^T G W^T)
        X = (G.tril() @ W.mT).tril_()  # -L^T Lbar, lower triangle
        X.diagonal(dim1=-2, dim2=-1).mul_(0.5)  # -Phi(L^T Lbar)
        Sbar = W.mT @ X @ W  # -(W^T Phi(L^T Lbar) W)
        return (Sbar + Sbar.mT).mul_(-0.5), None  # symmetrized, the sign restored

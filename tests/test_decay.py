"""ttr.ops.decay: exact segment-sum decay factors, flushed to 0 below the exp floor."""

import math

import pytest
import torch

from ttr.ops import delta_rule, linear_attention
from ttr.ops.decay import EXP_FLOOR, decay_exp, decay_matrix, must_flush


def _reference(g: torch.Tensor) -> torch.Tensor:
    """exp(sum_{i<j<=t} g_j) below and on the diagonal, 0 above, by a loop in float64."""
    C = g.shape[-1]
    D = torch.zeros(*g.shape, C, dtype=torch.float64)
    for t in range(C):
        for i in range(t + 1):
            D[..., t, i] = torch.exp(g[..., i + 1:t + 1].double().sum(-1))
    return D


@pytest.mark.parametrize("flush", [False, True])
@pytest.mark.parametrize("C", [1, 5, 16])
def test_decay_matrix_is_the_segment_product(C, flush):
    g = -torch.rand(3, 2, C, dtype=torch.float64)
    torch.testing.assert_close(decay_matrix(g, flush), _reference(g), rtol=1e-13, atol=0)


def test_strong_decay_flushes_to_exact_zero():
    gen = torch.Generator().manual_seed(3)
    g = -30 * torch.rand(4, 32, generator=gen)  # float32: most products far below exp(EXP_FLOOR)
    D, ref = decay_matrix(g), _reference(g)
    log_ref = torch.log(ref)  # -inf above the diagonal
    kept = log_ref >= EXP_FLOOR[torch.float32] + 1e-3
    flushed = log_ref < EXP_FLOOR[torch.float32] - 1e-3
    assert kept.any() and flushed.any()
    assert torch.equal(D[flushed], torch.zeros_like(D[flushed]))  # incl. above the diagonal
    # a float32 segment sum near the floor (~ -80) is exact to ~|L| eps sqrt(C) ~ 1e-5 (an
    # unseeded run failed rtol 1e-5 one time in nine), which exp turns into a relative error
    torch.testing.assert_close(D[kept].double(), ref[kept], rtol=1e-4, atol=0)
    assert torch.equal(D.triu(1), torch.zeros_like(D))


@pytest.mark.parametrize("flush", [False, True])
def test_gradcheck(flush):
    g = (-torch.rand(2, 6, dtype=torch.float64)).requires_grad_()
    torch.autograd.gradcheck(lambda g: decay_matrix(g, flush), (g,))
    torch.autograd.gradcheck(lambda g: decay_exp(g, flush), (g,))


def test_flushed_entries_have_zero_gradient():
    floor = EXP_FLOOR[torch.float64]
    x = torch.tensor([0.0, -1.0, floor + 1, floor - 1, 10 * floor], dtype=torch.float64,
                     requires_grad=True)
    y = decay_exp(x)
    assert torch.equal(y[3:], torch.zeros(2, dtype=torch.float64))
    (grad,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(grad[:3], torch.exp(x[:3].detach()))
    assert torch.equal(grad[3:], torch.zeros(2, dtype=torch.float64))


def test_must_flush():
    floor = EXP_FLOOR[torch.float32]
    assert not must_flush(torch.full((3,), floor + 1))
    assert must_flush(torch.tensor([0.0, floor - 1]))
    assert not must_flush(torch.zeros(0))
    assert math.exp(floor) > torch.finfo(torch.float32).tiny  # flushed values stay normal


@pytest.mark.parametrize("op", ["linear_scalar", "linear_per_dim", "gated_delta"])
def test_chunk_forms_with_mixed_strong_and_mild_decay(op):
    """Heads with strong decay take the flushed path (some chunks far below the floor), the
    others not: the chunk form still equals the recurrent spec, values and gradients."""
    torch.manual_seed(0)
    B, T, H, D = 1, 45, 2, 4
    q, k, v = (torch.randn(B, T, H, D, dtype=torch.float64) for _ in range(3))
    shape = (B, T, H, D) if op == "linear_per_dim" else (B, T, H)
    g = -torch.rand(*shape, dtype=torch.float64) * 0.05
    g[:, :, 0] = -120 * torch.rand_like(g[:, :, 0])  # head 0: chunks decay past exp(EXP_FLOOR)
    chunk_totals = g[0, :32, 0].reshape(2, 16, -1).sum(1)  # head 0's first two chunks
    assert must_flush(chunk_totals)  # the float64 floor is ~ -700
    beta = torch.rand(B, T, H, dtype=torch.float64)
    k = torch.nn.functional.normalize(k, dim=-1)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, g)]

    def run(form, q, k, v, g):
        if op == "gated_delta":
            return delta_rule(q, k, v, beta, g, form=form, chunk_size=16)[0]
        return linear_attention(q, k, v, g, form=form, chunk_size=16)[0]

    w = torch.randn(B, T, H, D, dtype=torch.float64)
    outs, grads = {}, {}
    for form in ("recurrent", "chunk"):
        o = run(form, *leaves)
        outs[form] = o.detach()
        grads[form] = torch.autograd.grad((o * w).sum(), leaves)
    torch.testing.assert_close(outs["chunk"], outs["recurrent"], rtol=1e-10, atol=1e-12)
    for a, b in zip(grads["chunk"], grads["recurrent"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


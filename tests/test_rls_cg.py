"""The decayed RLS chunk form (conjugate gradient, ttr/ops/rls_cg.py): the stated tolerance holds,
the iteration knobs act, gradients equal the recurrent form's, and bad knobs are refused.
(Equality with the recurrent form and the oracle over many sizes and decays is in
test_ops_forms.py and test_equivalence.py, which run this form like every other.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ttr.ops import rls
from ttr.ops.rls_cg import _cg, cg_iterations
from ttr.testing import rel_rmse


def _inputs(B=2, T=150, H=2, D=16, Dv=8, dtype=torch.float32, g_scale=0.05, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = (F.normalize(torch.randn(B, T, H, D, generator=gen, dtype=dtype), dim=-1)
            for _ in range(2))
    v = torch.randn(B, T, H, Dv, generator=gen, dtype=dtype)
    g = -g_scale * torch.rand(B, T, H, generator=gen, dtype=dtype)
    return q, k, v, g


def test_cg_reaches_the_stated_relative_residual():
    gen = torch.Generator().manual_seed(1)
    M = torch.randn(50, 12, 12, generator=gen, dtype=torch.float64)
    A = M @ M.mT + 0.1 * torch.eye(12, dtype=torch.float64)  # SPD, cond ~1e3
    b = torch.randn(50, 12, generator=gen, dtype=torch.float64)
    for tol in (1e-4, 1e-8, 1e-12):
        x, n = _cg(b, lambda p: (A @ p.unsqueeze(-1)).squeeze(-1), tol, max_iter=100)
        res = (b - (A @ x.unsqueeze(-1)).squeeze(-1)).norm(dim=-1) / b.norm(dim=-1)
        assert res.max() <= tol and 0 < n < 100


def test_iterations_knob_and_default_accuracy():
    q, k, v, g = _inputs()
    o_ref, _ = rls(q.double(), k.double(), v.double(), g.double(), ridge=0.5, form="recurrent")
    o, _ = rls(q, k, v, g, ridge=0.5, form="chunk", chunk_size=32)
    o1, _ = rls(q, k, v, g, ridge=0.5, form="chunk", chunk_size=32, cg_max_iter=1)
    assert rel_rmse(o, o_ref) < 1e-4  # the float32 default: relative residual 1e-5
    assert rel_rmse(o1, o_ref) > 1e-2  # one iteration is far from the solution
    n = cg_iterations(q, k, g, ridge=0.5, chunk_size=32)
    assert 1 < n <= 2 * q.shape[-1]
    assert cg_iterations(q, k, g, ridge=0.5, chunk_size=32, max_iter=3) == 3
    # a large ridge makes the systems well conditioned: fewer iterations
    assert cg_iterations(q, k, g, ridge=100.0, chunk_size=32) < n


def test_gradients_equal_the_recurrent_form_float64():
    q, k, v, g = (x.double() for x in _inputs(T=40, D=6, Dv=5, g_scale=1.0))
    gen = torch.Generator().manual_seed(2)
    beta = torch.rand(q.shape[:3], generator=gen, dtype=torch.float64)
    ridge = 0.3 + torch.rand(q.shape[-1], generator=gen, dtype=torch.float64)
    B, _, H, D = q.shape
    s0 = (torch.eye(D, dtype=torch.float64).expand(B, H, D, D).clone(),
          torch.randn(B, H, D, v.shape[-1], generator=gen, dtype=torch.float64))
    leaves = [x.clone().requires_grad_() for x in (q, k, v, g, beta, ridge, *s0)]

    def loss(form):
        q, k, v, g, beta, ridge, h0, h1 = leaves
        o, (hkk, hkv) = rls(q, k, v, g, beta, ridge=ridge, initial_state=(h0, h1),
                            output_final_state=True, form=form, chunk_size=16)
        return o.sin().sum() + hkk.cos().sum() + hkv.sum()

    want = torch.autograd.grad(loss("recurrent"), leaves)
    got = torch.autograd.grad(loss("chunk"), leaves)
    for name, a, b in zip(("q", "k", "v", "g", "beta", "ridge", "H_kk0", "H_kv0"), got, want,
                          strict=True):
        assert rel_rmse(a, b) < 1e-10, name


def test_long_sequence_strong_and_weak_decay_float32():
    for g_scale in (20.0, 1e-4):
        q, k, v, g = _inputs(B=1, T=4096, H=1, D=8, Dv=4, g_scale=g_scale)
        o, s = rls(q, k, v, g, ridge=1.0, form="chunk", output_final_state=True)
        assert torch.isfinite(o).all() and all(torch.isfinite(x).all() for x in s)
        o_ref, _ = rls(q.double(), k.double(), v.double(), g.double(), ridge=1.0,
                       form="parallel")
        assert rel_rmse(o, o_ref) < 1e-3


@pytest.mark.parametrize("kw, match", [
    ({"cg_tol": 0.0}, "cg_tol"), ({"cg_tol": 1.5}, "cg_tol"), ({"cg_tol": "1e-5"}, "cg_tol"),
    ({"cg_max_iter": 0}, "cg_max_iter"), ({"cg_max_iter": 2.0}, "cg_max_iter"),
])
def test_bad_cg_knobs_are_refused(kw, match):
    q, k, v, g = _inputs(T=5, D=4, Dv=3)
    with pytest.raises(ValueError, match=match):
        rls(q, k, v, g, ridge=1.0, form="chunk", **kw)

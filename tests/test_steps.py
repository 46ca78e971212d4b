"""The one-token decoding steps (ttr.ops.steps): token by token from an empty (or params) state
they give the op's recurrent form over the whole sequence and its final state; bad input is
named by the step's own argument names."""

from __future__ import annotations

import pytest
import torch

from ttr import ops
from ttr.testing import assert_close

F64 = torch.float64
B, T, H, D = 2, 9, 3, 4


def _data(seed=0, Dv=D):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, D, generator=g, dtype=F64) for _ in range(2))
    v = torch.randn(B, T, H, Dv, generator=g, dtype=F64)
    rate = torch.rand(B, T, H, generator=g, dtype=F64)  # in [0, 1]: weights, steps, gates
    return q, k, v, rate


def _decode(step, q, k, v, per_token, state=None, **kw):
    """Run step token by token; per_token: tensors [B, T, H] (sliced per token) or floats."""
    outs = []
    for t in range(q.shape[1]):
        xs = [x[:, t] if isinstance(x, torch.Tensor) else x for x in per_token]
        o_t, state = step(q[:, t], k[:, t], v[:, t], *xs, state, **kw)
        outs.append(o_t)
    return torch.stack(outs, 1), state


def _assert_states(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_close(a[key], b[key], F64, what=key)
    else:
        for x, y in zip(a, b, strict=True):
            assert_close(x, y, F64)


@pytest.mark.parametrize("solver, kernel, weighted", [
    ("exact", "exp", False), ("exact", "rbf", True), ("gd", "exp", True),
    ("exact", "polynomial", False),
])
def test_kernel_regression_step(solver, kernel, weighted):
    q, k, v, rate = _data()
    beta = rate if weighted else None
    kw = {"kernel": kernel, "solver": solver, "degree": 2 if kernel == "polynomial" else None,
          "ridge": 1.0 if solver == "exact" else None}
    o, state = _decode(ops.kernel_regression_step, q, k, v, [beta], **kw)
    expected, final = ops.kernel_regression(q, k, v, beta, form="recurrent",
                                            output_final_state=True, **kw)
    assert_close(o, expected, F64)
    _assert_states(state, final)


@pytest.mark.parametrize("degree", [0, 1, 2])
def test_local_polynomial_attention_step(degree):
    q, k, v, _ = _data()
    kw = {"degree": degree, "bandwidth": 4.0, "ridge": 0.1}
    o, state = _decode(ops.local_polynomial_attention_step, q, k, v, [], **kw)
    expected, final = ops.local_polynomial_attention(q, k, v, output_final_state=True, **kw)
    assert_close(o, expected, F64)
    _assert_states(state, final)


@pytest.mark.parametrize("model", ["linear", "mlp"])
def test_ttt_step_is_online_sgd(model):
    q, k, v, rate = _data()
    eta = 0.5 * rate
    params = ops.ttt_params(H, D, model, dtype=F64, generator=torch.Generator().manual_seed(1))
    o, state = _decode(lambda *a: ops.ttt_step(*a[:4], params, a[4], model=model),
                       q, k, v, [eta])
    expected, final = ops.ttt(q, k, v, eta, params, model=model, mini_batch=1,
                              form="recurrent", output_final_state=True)
    assert_close(o, expected, F64)
    _assert_states(state, final)


@pytest.mark.parametrize("gates", ["tensors", "floats"])
def test_titans_step_is_the_recurrence(gates):
    q, k, v, rate = _data(Dv=3)
    params = ops.titans_params(H, D, 3, depth=2, hidden=8, dtype=F64,
                               generator=torch.Generator().manual_seed(1))
    # small steps: with lr 0.3 and momentum 0.9 the memory's recurrence itself diverges on
    # these unnormalized keys (both forms overflow by the 9th token)
    lr, mom, dec = (0.1 * rate, rate.flip(1), 0.1 * rate) if gates == "tensors" else (0.1, 0.5,
                                                                                       0.05)
    o, state = _decode(lambda *a: ops.titans_step(*a[:6], params, a[6]), q, k, v,
                       [lr, mom, dec])
    expected, final = ops.titans(q, k, v, lr, mom, dec, params, form="recurrent",
                                 output_final_state=True)
    assert_close(o, expected, F64)
    _assert_states(state, final)


def test_steps_name_their_own_arguments():
    q, k, v, rate = _data()
    q_t, k_t, v_t = q[:, 0], k[:, 0], v[:, 0]
    with pytest.raises(ValueError, match="^v_t"):
        ops.kernel_regression_step(q_t, k_t, v_t[:, :1])
    with pytest.raises(ValueError, match=r"^beta_t: expected shape \[B, H\]"):
        ops.kernel_regression_step(q_t, k_t, v_t, rate[:, :2])
    with pytest.raises(TypeError, match="^state"):
        ops.local_polynomial_attention_step(q_t, k_t, v_t, torch.zeros(2), degree=1)
    with pytest.raises(ValueError, match="^state"):
        ops.kernel_regression_step(q_t, k_t, v_t, None, (k[:, :2, :2], v[:, :2]))
    params = ops.ttt_params(H, D, dtype=F64)
    with pytest.raises(ValueError, match="^eta_t"):
        ops.ttt_step(q_t, k_t, v_t, None, params)
    tparams = ops.titans_params(H, D, D, dtype=F64)
    with pytest.raises(ValueError, match="^decay_t"):
        ops.titans_step(q_t, k_t, v_t, 0.1, 0.9, 1.5 + rate[:, 0], tparams)

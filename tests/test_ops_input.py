"""Bad input to any op raises ValueError / TypeError whose message names the argument."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ttr.ops import (
    delta_rule,
    delta_rule_step,
    linear_attention,
    linear_attention_step,
    rls,
    rls_step,
    softmax_attention,
    softmax_attention_step,
)

OPS = ["linear_attention", "delta_rule", "rls", "softmax_attention"]
FAST = settings(max_examples=25, deadline=None)




def inputs(op, B=2, T=5, H=3, Dk=4, Dv=6, dtype=torch.float32):
    x = {"q": torch.randn(B, T, H, Dk, dtype=dtype), "k": torch.randn(B, T, H, Dk, dtype=dtype),
         "v": torch.randn(B, T, H, Dv, dtype=dtype)}
    if op in ("linear_attention", "delta_rule", "rls"):
        x["g"] = -torch.rand(B, T, H, dtype=dtype)
    if op in ("delta_rule", "rls"):
        x["beta"] = torch.rand(B, T, H, dtype=dtype)
    if op == "rls":
        x["ridge"] = 0.5
    return x


def state(op, N=2, H=3, Dk=4, Dv=6, Tc=2):
    if op == "rls":
        return (torch.eye(Dk).expand(N, H, Dk, Dk).clone(), torch.zeros(N, H, Dk, Dv))
    if op == "softmax_attention":
        return (torch.randn(N, Tc, H, Dk), torch.randn(N, Tc, H, Dv))
    return torch.zeros(N, H, Dk, Dv)


def call(op, x, **kw):
    x = dict(x)
    q, k, v = x.pop("q"), x.pop("k"), x.pop("v")
    if op == "linear_attention":
        return linear_attention(q, k, v, x.pop("g", None), **x, **kw)
    if op == "delta_rule":
        return delta_rule(q, k, v, x.pop("beta"), x.pop("g", None), **x, **kw)
    if op == "rls":
        return rls(q, k, v, **x, **kw)
    return softmax_attention(q, k, v, **x, **kw)


def raises_naming(name, fn, exc=(ValueError, TypeError)):
    """fn() raises `exc` and the message mentions `name` as a whole word."""
    with pytest.raises(exc) as info:
        fn()
    msg = str(info.value)
    assert re.search(rf"(?<![\w\[]){re.escape(name)}(?![\w])", msg), msg
    return msg


def test_valid_inputs_pass():
    for op in OPS:
        o, s = call(op, inputs(op), initial_state=state(op), output_final_state=True)
        assert o.shape == (2, 5, 3, 6)


# -- shapes (hypothesis) -------------------------------------------------------------------------

dims = st.integers(1, 4)


@FAST
@given(op=st.sampled_from(OPS), shape=st.tuples(dims, dims, dims, dims, dims),
       which=st.sampled_from(["q", "k", "v"]), axis=st.integers(0, 3), delta=st.integers(1, 3))
def test_qkv_shape_mismatch_names_argument(op, shape, which, axis, delta):
    B, T, H, Dk, Dv = shape
    if which == "v" and axis == 3:
        axis = 2  # Dv is free
    x = inputs(op, B, T, H, Dk, Dv)
    bad = list(x[which].shape)
    bad[axis] += delta
    x[which] = torch.randn(*bad)
    raises_naming(which, lambda: call(op, x), ValueError)


@FAST
@given(op=st.sampled_from(["linear_attention", "delta_rule", "rls"]),
       name=st.sampled_from(["g", "beta"]), shape=st.tuples(dims, dims, dims),
       axis=st.integers(0, 2), delta=st.integers(1, 3))
def test_per_token_shape_mismatch_names_argument(op, name, shape, axis, delta):
    if name == "beta" and op == "linear_attention":
        name = "g"
    B, T, H = shape
    x = inputs(op, B, T, H)
    bad = list(x[name].shape)
    bad[axis] += delta
    x[name] = -torch.rand(*bad) if name == "g" else torch.rand(*bad)
    raises_naming(name, lambda: call(op, x), ValueError)


@FAST
@given(op=st.sampled_from(OPS), axis=st.integers(0, 3), delta=st.integers(1, 3),
       part=st.integers(0, 1))
def test_initial_state_shape_names_argument(op, axis, delta, part):
    s = state(op)
    if isinstance(s, torch.Tensor):
        bad = list(s.shape)
        bad[axis] += delta
        s = torch.zeros(*bad)
    else:
        if op == "softmax_attention" and axis == 1:
            axis = 0  # the cache length Tc is free (but K and V must agree)
        parts = list(s)
        bad = list(parts[part].shape)
        bad[axis] += delta
        parts[part] = torch.zeros(*bad)
        s = tuple(parts)
    raises_naming("initial_state", lambda: call(op, inputs(op), initial_state=s), ValueError)


@pytest.mark.parametrize("op", OPS)
def test_wrong_rank(op):
    x = inputs(op)
    x["q"] = x["q"][0]
    raises_naming("q", lambda: call(op, x), ValueError)
    x = inputs(op)
    x["v"] = x["v"][..., None]
    raises_naming("v", lambda: call(op, x), ValueError)


# -- dtypes, devices, values ----------------------------------------------------------------------

@pytest.mark.parametrize("op", OPS)
def test_dtype_mismatch(op):
    x = inputs(op)
    x["k"] = x["k"].double()
    raises_naming("k", lambda: call(op, x), TypeError)
    x = inputs(op)
    x["q"] = x["q"].to(torch.int64)
    raises_naming("q", lambda: call(op, x), TypeError)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("name", ["k", "v", "g", "beta", "initial_state"])
def test_device_mismatch(op, name):
    x = inputs(op)
    if name in ("g", "beta") and name not in x:
        pytest.skip(f"{op} takes no {name}")
    kw = {}
    if name == "initial_state":
        s = state(op)
        kw["initial_state"] = (s.to("meta") if isinstance(s, torch.Tensor)
                               else (s[0].to("meta"), s[1].to("meta")))
    else:
        x[name] = x[name].to("meta")
    msg = raises_naming(name, lambda: call(op, x, **kw), ValueError)
    assert "device" in msg


@pytest.mark.parametrize("op", OPS)
def test_nan_in_q(op):
    x = inputs(op)
    x["q"][0, 1, 2, 3] = float("nan")
    raises_naming("q", lambda: call(op, x), ValueError)


@pytest.mark.parametrize("op", OPS)
def test_finite_checks_can_be_turned_off_for_a_block(op):
    """`finite_checks(False)` lets a NaN through to the output (no host read of the data), for
    that block only; shape checks stay on; nested blocks restore the outer setting."""
    from ttr.ops import finite_checks

    x = inputs(op)
    x["q"][0, 1, 2, 3] = float("nan")
    with finite_checks(False):
        o, _ = call(op, x)
        # (SDPA's CPU kernel returns finite numbers for a NaN query: wrong, silently)
        assert torch.isnan(o).any() or op == "softmax_attention"
        with finite_checks(True):
            raises_naming("q", lambda: call(op, x), ValueError)
        call(op, x)  # off again after the inner block
        y = inputs(op)
        y["v"] = y["v"][:, :, :1]
        raises_naming("v", lambda: call(op, y), ValueError)
    raises_naming("q", lambda: call(op, x), ValueError)
    with pytest.raises(TypeError, match="^enabled"), finite_checks(0):
        pass


@pytest.mark.parametrize("op", ["linear_attention", "delta_rule", "rls"])
def test_positive_log_decay(op):
    x = inputs(op)
    x["g"][1, 2, 0] = 0.1
    msg = raises_naming("g", lambda: call(op, x), ValueError)
    assert "<= 0" in msg


@pytest.mark.parametrize("op", ["delta_rule", "rls"])
def test_per_dim_decay_only_for_linear_attention(op):
    x = inputs(op)
    x["g"] = -torch.rand(2, 5, 3, 4)
    raises_naming("g", lambda: call(op, x), ValueError)
    x = inputs("linear_attention")
    x["g"] = -torch.rand(2, 5, 3, 4)
    call("linear_attention", x)  # per-dimension decay is fine here


@pytest.mark.parametrize("op", OPS)
def test_bad_form(op):
    msg = raises_naming("form", lambda: call(op, inputs(op), form="blocked"), ValueError)
    assert "recurrent" in msg


@pytest.mark.parametrize("op", ["linear_attention", "delta_rule", "rls"])
@pytest.mark.parametrize("chunk_size", [0, -3, 2.5, True])
def test_bad_chunk_size(op, chunk_size):
    raises_naming("chunk_size", lambda: call(op, inputs(op), chunk_size=chunk_size), ValueError)


def test_delta_rule_needs_beta():
    x = inputs("delta_rule")
    x["beta"] = None
    raises_naming("beta", lambda: call("delta_rule", x), ValueError)


# -- cu_seqlens --------------------------------------------------------------------------------

@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("B,offsets,exc", [
    pytest.param(2, [0, 2, 5], ValueError, id="batch-not-1"),
    pytest.param(1, [0, 3, 3, 5], ValueError, id="not-increasing"),
    pytest.param(1, [0, 4, 2, 5], ValueError, id="decreasing"),
    pytest.param(1, [0, 2, 4], ValueError, id="last-not-T"),
    pytest.param(1, [1, 2, 5], ValueError, id="first-not-0"),
])
def test_bad_cu_seqlens(op, B, offsets, exc):
    cu = torch.tensor(offsets, dtype=torch.int32)
    raises_naming("cu_seqlens", lambda: call(op, inputs(op, B=B), cu_seqlens=cu), exc)


@pytest.mark.parametrize("op", OPS)
def test_cu_seqlens_dtype_and_state_count(op):
    cu = torch.tensor([0.0, 2.0, 5.0])
    raises_naming("cu_seqlens", lambda: call(op, inputs(op, B=1), cu_seqlens=cu), TypeError)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    # two sequences but three initial states
    raises_naming("initial_state", lambda: call(op, inputs(op, B=1), cu_seqlens=cu,
                                                initial_state=state(op, N=3)), ValueError)


def test_softmax_cache_list_length():
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    caches = [state("softmax_attention", N=1)] * 3
    raises_naming("initial_state", lambda: call("softmax_attention", inputs(
        "softmax_attention", B=1), cu_seqlens=cu, initial_state=caches), ValueError)


# -- op-specific options ---------------------------------------------------------------------------

@pytest.mark.parametrize("ridge", [0.0, -1.0, float("nan"), torch.tensor([0.5, 0.0, 1.0, 1.0])])
def test_rls_ridge_must_be_positive(ridge):
    msg = raises_naming("ridge", lambda: call("rls", dict(inputs("rls"), ridge=ridge)),
                        ValueError)
    if not (isinstance(ridge, float) and ridge != ridge):
        assert "ttr.reference" in msg


@pytest.mark.parametrize("ridge,exc", [(torch.ones(3), ValueError), ("1", TypeError),
                                       (None, TypeError), (torch.ones(4, 1), ValueError)])
def test_rls_ridge_type_and_shape(ridge, exc):
    raises_naming("ridge", lambda: call("rls", dict(inputs("rls"), ridge=ridge)), exc)


def test_rls_negative_sample_weight_and_state_pair():
    x = inputs("rls")
    x["beta"][0, 0, 0] = -0.5
    raises_naming("beta", lambda: call("rls", x), ValueError)
    raises_naming("initial_state", lambda: call("rls", inputs("rls"),
                                                initial_state=torch.zeros(2, 3, 4, 6)), TypeError)


@pytest.mark.parametrize("kw,name", [({"scale": 0.5, "bandwidth": 2.0}, "scale"),
                                     ({"bandwidth": 0.0}, "bandwidth"),
                                     ({"bandwidth": -1.0}, "bandwidth"),
                                     ({"scale": float("inf")}, "scale")])
def test_softmax_similarity_options(kw, name):
    raises_naming(name, lambda: call("softmax_attention", inputs("softmax_attention"), **kw),
                  ValueError)


# -- step functions --------------------------------------------------------------------------------

def test_step_functions_validate():
    q, k, v = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 6)
    raises_naming("q_t", lambda: linear_attention_step(q[None], k, v), ValueError)
    raises_naming("k_t", lambda: linear_attention_step(q, k[:, :2], v), ValueError)
    raises_naming("v_t", lambda: linear_attention_step(q, k, v[:1]), ValueError)
    raises_naming("g_t", lambda: linear_attention_step(q, k, v, -torch.rand(2, 3, 5)), ValueError)
    raises_naming("g_t", lambda: linear_attention_step(q, k, v, torch.rand(2, 3) + 0.1),
                  ValueError)
    raises_naming("state", lambda: linear_attention_step(q, k, v, None, torch.zeros(2, 3, 4, 5)),
                  ValueError)
    raises_naming("beta_t", lambda: delta_rule_step(q, k, v, torch.rand(2)), ValueError)
    raises_naming("g_t", lambda: delta_rule_step(q, k, v, torch.rand(2, 3),
                                                 -torch.rand(2, 3, 4)), ValueError)
    raises_naming("ridge", lambda: rls_step(q, k, v, ridge=0.0), ValueError)
    raises_naming("state", lambda: rls_step(q, k, v, state=torch.zeros(2, 3, 4, 4), ridge=1.0),
                  TypeError)
    raises_naming("state", lambda: softmax_attention_step(
        q, k, v, (torch.zeros(2, 1, 3, 4), torch.zeros(2, 2, 3, 6))), ValueError)
    raises_naming("k_t", lambda: softmax_attention_step(q, k.double(), v), TypeError)

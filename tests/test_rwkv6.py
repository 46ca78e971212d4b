"""RWKV-6 (Finch) wkv: the chunk form against the recurrent loop (the spec), and both against an
independent double loop over the paper's sum

    wkv_t = diag(u) k_t v_t^T + sum_{j<t} diag(prod_{l=j+1}^{t-1} exp(w_l)) k_j v_j^T,
    o_t = wkv_t^T r_t.

Decay regimes: none (w = 0), RWKV-like (w = -exp(N(-1, 1))), strong (w = -20: the state keeps
e^-20 of itself per step, and the chunk form must neither overflow nor divide by it) and mixed
(w ~ U(-20, 0) per dimension).
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

from ttr.ops.rwkv6 import rwkv6, rwkv6_step
from ttr.testing import assert_close

F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16
recurrent = partial(rwkv6, form="recurrent")  # the spec (the default form is "chunk")


def inputs(B, T, H, Dk, Dv, decay="rwkv", dtype=F64, seed=0, state=True):
    """r, k, v, w, u, initial state S or None."""
    gen = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=gen, dtype=F64)
    r, k, v, u = rn(B, T, H, Dk), rn(B, T, H, Dk), rn(B, T, H, Dv), rn(H, Dk)
    if decay == "none":
        w = torch.zeros(B, T, H, Dk, dtype=F64)
    elif decay == "rwkv":
        w = -torch.exp(rn(B, T, H, Dk) - 1.0)
    elif decay == "strong":
        w = torch.full((B, T, H, Dk), -20.0, dtype=F64)
    else:  # "mixed"
        w = -20 * torch.rand(B, T, H, Dk, generator=gen, dtype=F64)
    s0 = rn(B, H, Dk, Dv) if state else None
    cast = lambda x: None if x is None else x.to(dtype)
    return tuple(map(cast, (r, k, v, w, u, s0)))


def paper_sum(r, k, v, w, u, s0=None):
    """The explicit sums of the RWKV-6 paper, O(T^2), no recurrence: (o, S_T)."""
    B, T, H, Dk = r.shape
    decay = lambda a, b: torch.exp(w[:, a:b].sum(1))  # prod_{l=a}^{b-1} exp(w_l), [B, H, Dk]
    kv = lambda j: k[:, j, ..., None] * v[:, j, :, None, :]  # [B, H, Dk, Dv]
    os = []
    for t in range(T):
        wkv = u[..., None] * kv(t)
        for j in range(t):
            wkv = wkv + decay(j + 1, t)[..., None] * kv(j)
        if s0 is not None:
            wkv = wkv + decay(0, t)[..., None] * s0
        os.append(torch.einsum("bhk,bhkv->bhv", r[:, t], wkv))
    S = sum(decay(j + 1, T)[..., None] * kv(j) for j in range(T))
    if s0 is not None:
        S = S + decay(0, T)[..., None] * s0
    return torch.stack(os, dim=1), S


DECAYS = ["none", "rwkv", "strong", "mixed"]
SIZES = [pytest.param(T, C, id=f"T{T}-C{C}") for T, C in [(1, 16), (7, 16), (32, 16), (45, 16),
                                                          (45, 64), (20, 1)]]
DTYPES = [pytest.param(F64, id="f64"), pytest.param(F32, id="f32")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T, C", SIZES)
@pytest.mark.parametrize("decay", DECAYS)
def test_chunk_equals_recurrent(decay, T, C, dtype):
    r, k, v, w, u, s0 = inputs(2, T, 3, 6, 5, decay, dtype)
    o, s = rwkv6(r, k, v, w, u, initial_state=s0, output_final_state=True, chunk_size=C)
    # the spec in float64 on the same (rounded) inputs: the error measured is the chunk form's
    up = lambda x: x.to(F64)
    o_ref, s_ref = recurrent(*map(up, (r, k, v, w, u)), initial_state=up(s0),
                             output_final_state=True)
    assert o.dtype == dtype and s.dtype == dtype
    assert_close(o, o_ref, dtype=dtype, what="output")
    assert_close(s, s_ref, dtype=dtype, what="final state")


@pytest.mark.parametrize("state", [False, True])
@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("form", ["recurrent", "chunk"])
def test_every_form_equals_the_paper_sum(form, decay, state):
    r, k, v, w, u, s0 = inputs(2, 21, 2, 4, 3, decay, state=state)
    o, s = rwkv6(r, k, v, w, u, initial_state=s0, output_final_state=True, form=form,
                 chunk_size=8)
    o_ref, s_ref = paper_sum(r, k, v, w, u, s0)
    assert_close(o, o_ref, dtype=F64, what="output")
    assert_close(s, s_ref, dtype=F64, what="final state")


def test_bonus_weights_only_the_current_pair():
    """u = 0: the read is exclusive (token t sees only j < t); u = 1 and w = 0: it is causal
    linear attention without decay, o_t = sum_{j<=t} (r_t . k_j) v_j."""
    r, k, v, w, u, _ = inputs(1, 9, 2, 4, 3, state=False)
    zero_u = torch.zeros_like(u)
    o, _ = rwkv6(r, k, v, w, zero_u, chunk_size=4)
    o2, _ = rwkv6(r, k.index_fill(1, torch.tensor([8]), 5.0), v.index_fill(1, torch.tensor([8]),
                  5.0), w, zero_u, chunk_size=4)
    assert torch.equal(o, o2)  # no output, not even the last one, sees the last pair
    o, _ = rwkv6(r, k, v, torch.zeros_like(w), torch.ones_like(u), chunk_size=4)
    A = torch.einsum("bthd,bjhd->bhtj", r, k).tril()
    assert_close(o, torch.einsum("bhtj,bjhv->bthv", A, v), dtype=F64)


@pytest.mark.parametrize("decay", ["rwkv", "mixed"])
@pytest.mark.parametrize("form", ["recurrent", "chunk"])
def test_gradcheck(form, decay):
    r, k, v, w, u, s0 = inputs(1, 6, 1, 3, 2, decay, seed=1)
    w = w.clamp(max=-0.05)  # finite differences stay inside w <= 0
    leaves = [x.clone().requires_grad_() for x in (r, k, v, w, u, s0)]
    fn = lambda r, k, v, w, u, s0: rwkv6(r, k, v, w, u, initial_state=s0,
                                         output_final_state=True, form=form, chunk_size=4)
    assert torch.autograd.gradcheck(fn, tuple(leaves), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decay", DECAYS)
def test_gradients_equal_recurrent(decay, dtype):
    xs = inputs(2, 29, 2, 5, 4, decay, dtype, seed=2)

    def grads(form):
        leaves = [x.clone().requires_grad_() for x in xs]
        o, s = rwkv6(*leaves[:5], initial_state=leaves[5], output_final_state=True, form=form,
                     chunk_size=8)
        gen = torch.Generator().manual_seed(7)
        return torch.autograd.grad(sum((y * torch.randn(y.shape, generator=gen, dtype=dtype))
                                       .sum() for y in (o, s)), leaves)

    chunk, spec = grads("chunk"), grads("recurrent")
    for name, a, b in zip(["r", "k", "v", "w", "u", "S0"], chunk, spec, strict=True):
        assert torch.isfinite(a).all(), name
        assert_close(a, b, dtype=dtype, what=f"grad {name}")


@pytest.mark.parametrize("form", ["recurrent", "chunk"])
@pytest.mark.parametrize("T, split", [(40, 17), (9, 1), (20, 19)])
def test_split_with_carried_state_equals_one_pass(form, T, split):
    r, k, v, w, u, s0 = inputs(2, T, 2, 4, 3)
    run = partial(rwkv6, u=u, output_final_state=True, form=form, chunk_size=8)
    whole, s_whole = run(r, k, v, w, initial_state=s0)
    first, s_mid = run(*(x[:, :split] for x in (r, k, v, w)), initial_state=s0)
    second, s_end = run(*(x[:, split:] for x in (r, k, v, w)), initial_state=s_mid)
    assert_close(torch.cat([first, second], dim=1), whole, dtype=F64)
    assert_close(s_end, s_whole, dtype=F64)


def test_step_decoding_equals_chunk():
    r, k, v, w, u, s0 = inputs(2, 13, 2, 4, 3)
    o_ref, s_ref = rwkv6(r, k, v, w, u, initial_state=s0, output_final_state=True, chunk_size=4)
    state, os = s0, []
    for t in range(13):
        o, state = rwkv6_step(r[:, t], k[:, t], v[:, t], w[:, t], u, state)
        os.append(o)
    assert_close(torch.stack(os, dim=1), o_ref, dtype=F64)
    assert_close(state, s_ref, dtype=F64)
    o0, _ = rwkv6_step(r[:, 0], k[:, 0], v[:, 0], w[:, 0], u)  # no state: zeros
    assert_close(o0, rwkv6(*(x[:, :1] for x in (r, k, v, w)), u)[0][:, 0], dtype=F64)


@pytest.mark.parametrize("form", ["recurrent", "chunk"])
@pytest.mark.parametrize("state", [False, True])
def test_cu_seqlens_equals_a_loop_over_sequences(form, state):
    r, k, v, w, u, _ = inputs(1, 30, 2, 4, 3)
    cu = torch.tensor([0, 5, 6, 30], dtype=torch.int32)
    s0 = inputs(3, 1, 2, 4, 3, seed=4)[5] if state else None
    o, s = rwkv6(r, k, v, w, u, initial_state=s0, output_final_state=True, cu_seqlens=cu,
                 form=form, chunk_size=4)
    for n, (a, b) in enumerate([(0, 5), (5, 6), (6, 30)]):
        s0_n = None if s0 is None else s0[n : n + 1]
        o_n, s_n = recurrent(*(x[:, a:b] for x in (r, k, v, w)), u, initial_state=s0_n,
                             output_final_state=True)
        assert_close(o[:, a:b], o_n, dtype=F64)
        assert_close(s[n : n + 1], s_n, dtype=F64)


@pytest.mark.parametrize("form", ["recurrent", "chunk"])
def test_bf16_keeps_dtype_and_accumulates_in_f32(form):
    r, k, v, w, u, s0 = inputs(1, 40, 2, 8, 8, "mixed")
    half = [x.to(BF16) for x in (r, k, v, w, u)]
    o, s = rwkv6(*half, initial_state=s0.float(), output_final_state=True, form=form,
                 chunk_size=16)
    assert o.dtype == BF16 and s.dtype == F32
    o_ref, s_ref = recurrent(*(x.to(F64) for x in half), initial_state=s0,
                             output_final_state=True)
    assert_close(o, o_ref, dtype=BF16)
    assert_close(s, s_ref, dtype=F32)


def _bad(**over):
    r, k, v, w, u, s0 = inputs(1, 5, 2, 4, 3)
    kw = dict(r=r, k=k, v=v, w=w, u=u, initial_state=s0)
    kw.update(over)
    return kw


@pytest.mark.parametrize("over, err, name", [
    (dict(u=torch.zeros(4, dtype=F64)), ValueError, "u"),
    (dict(u=torch.zeros(2, 3, dtype=F64)), ValueError, "u"),
    (dict(u=torch.zeros(1, 5, 2, 4, dtype=F64)), ValueError, "u"),
    (dict(u=None), ValueError, "u"),
    (dict(u=torch.full((2, 4), float("inf"), dtype=F64)), ValueError, "u"),
    (dict(w=torch.full((1, 5, 2, 4), 0.1, dtype=F64)), ValueError, "w"),
    (dict(w=-torch.rand(1, 5, 2, dtype=F64)), ValueError, "w"),  # scalar decay: not RWKV-6
    (dict(w=None), ValueError, "w"),
    (dict(r=torch.zeros(1, 5, 2, 3, dtype=F64)), ValueError, "r"),
    (dict(r=torch.zeros(5, 2, 4, dtype=F64)), ValueError, "r"),
    (dict(r=torch.full((1, 5, 2, 4), float("nan"), dtype=F64)), ValueError, "r"),
    (dict(k=torch.zeros(1, 5, 2, 4, dtype=F32)), TypeError, "k"),
    (dict(v=torch.zeros(1, 6, 2, 3, dtype=F64)), ValueError, "v"),
    (dict(initial_state=torch.zeros(1, 2, 3, 4, dtype=F64)), ValueError, "initial_state"),
    (dict(form="parallel"), ValueError, "form"),
    (dict(chunk_size=-1), ValueError, "chunk_size"),
])
def test_bad_input_names_the_argument(over, err, name):
    kw = _bad(**over)
    with pytest.raises(err, match=f"^{name}"):
        rwkv6(*[kw.pop(n) for n in "rkvwu"], **kw)


def test_bad_step_input_names_the_argument():
    r, k, v, w, u, s0 = inputs(1, 1, 2, 4, 3)
    x = [t[:, 0] for t in (r, k, v, w)]
    with pytest.raises(ValueError, match="^u"):
        rwkv6_step(*x, u[:, :3], s0)
    with pytest.raises(ValueError, match="^w_t"):
        rwkv6_step(*x[:3], x[3][..., 0], u, s0)
    with pytest.raises(ValueError, match="^r_t"):
        rwkv6_step(x[0][..., :3], *x[1:], u, s0)
    with pytest.raises(ValueError, match="^state"):
        rwkv6_step(*x, u, s0[..., :2])

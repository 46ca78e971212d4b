"""mLSTM (xLSTM Eq. 19-27): the chunk and parallel forms against the stabilized loop (the spec),
and all forms against an independent loop of the paper's UNstabilized equations.

Gate regimes: moderate (i ~ N(0, 1), forget gates near 1), large (i ~ U(-30, 30): e^i spans
26 orders of magnitude, which only the stabilizer keeps representable in the states) and strong
forgetting (f = -20 per step).
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from ttr.ops.mlstm import mlstm, mlstm_step
from ttr.testing import assert_close

F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16
recurrent = partial(mlstm, form="recurrent")  # the spec (the default form is "chunk")


def inputs(B, T, H, Dk, Dv, gates="moderate", dtype=F64, seed=0, state=True):
    """q, k, v, i, f, initial state (C~, n~, m) or None."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=F64)
    q, k, v = r(B, T, H, Dk), r(B, T, H, Dk), r(B, T, H, Dv)
    if gates == "moderate":
        i, f = r(B, T, H), F.logsigmoid(2.0 + r(B, T, H))
    elif gates == "large":
        i = 60 * torch.rand(B, T, H, generator=gen, dtype=F64) - 30
        f = F.logsigmoid(3 * r(B, T, H))
    else:  # "strong": every step forgets all but e^-20
        i, f = r(B, T, H), torch.full((B, T, H), -20.0, dtype=F64)
    s0 = (r(B, H, Dk, Dv), r(B, H, Dk), r(B, H)) if state else None
    cast = lambda x: x.to(dtype)
    return (*map(cast, (q, k, v, i, f)), None if s0 is None else tuple(map(cast, s0)))


def unstabilized(q, k, v, i, f, s0=None):
    """xLSTM Eq. 19-21 verbatim (C = sum v k^T, [Dv, Dk]), one token at a time, with the
    initial state converted back from the stabilized one: C_0 = e^{m_0} C~_0^T."""
    B, T, H, Dk = q.shape
    C = q.new_zeros(B, H, v.shape[-1], Dk)
    n = q.new_zeros(B, H, Dk)
    if s0 is not None:
        C = torch.exp(s0[2])[..., None, None] * s0[0].mT
        n = torch.exp(s0[2])[..., None] * s0[1]
    hs = []
    for t in range(T):
        ft, it = torch.exp(f[:, t])[..., None], torch.exp(i[:, t])[..., None]  # [B, H, 1]
        C = ft[..., None] * C + it[..., None] * torch.einsum("bhv,bhk->bhvk", v[:, t], k[:, t])
        n = ft * n + it * k[:, t]
        num = torch.einsum("bhvk,bhk->bhv", C, q[:, t])
        den = torch.einsum("bhk,bhk->bh", n, q[:, t]).abs().clamp(min=1.0)
        hs.append(num / den[..., None])
    return torch.stack(hs, dim=1)


def assert_state(s, s_ref, dtype, what="final state"):
    for name, a, b in zip("Cnm", s, s_ref, strict=True):
        assert_close(a, b, dtype=dtype, what=f"{what} {name}")


GATES = ["moderate", "large", "strong"]
SIZES = [pytest.param(T, C, id=f"T{T}-C{C}") for T, C in [(1, 16), (7, 16), (32, 16), (45, 16),
                                                          (45, 64), (20, 1)]]
DTYPES = [pytest.param(F64, id="f64"), pytest.param(F32, id="f32")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T, C", SIZES)
@pytest.mark.parametrize("gates", GATES)
@pytest.mark.parametrize("form", ["chunk", "parallel"])
def test_forms_equal_recurrent(form, gates, T, C, dtype):
    q, k, v, i, f, s0 = inputs(2, T, 3, 6, 5, gates, dtype)
    h, s = mlstm(q, k, v, i, f, initial_state=s0, output_final_state=True, form=form,
                 chunk_size=C)
    # the spec in float64 on the same (rounded) inputs: the error measured is the form's
    up = lambda x: x.to(F64)
    h_ref, s_ref = recurrent(*map(up, (q, k, v, i, f)), initial_state=tuple(map(up, s0)),
                             output_final_state=True)
    assert h.dtype == dtype and all(x.dtype == dtype for x in s)
    assert_close(h, h_ref, dtype=dtype, what="output")
    assert_state(s, s_ref, dtype)


@pytest.mark.parametrize("state", [False, True])
@pytest.mark.parametrize("form", ["recurrent", "parallel", "chunk"])
def test_every_form_equals_the_unstabilized_equations(form, state):
    q, k, v, i, f, s0 = inputs(2, 30, 2, 4, 3, "moderate", state=state)
    s0 = None if s0 is None else (s0[0], s0[1], 0.5 * s0[2])
    h, _ = mlstm(q, k, v, i, f, initial_state=s0, form=form, chunk_size=8)
    assert_close(h, unstabilized(q, k, v, i, f, s0), dtype=F64)


@pytest.mark.parametrize("form", ["recurrent", "parallel", "chunk"])
def test_large_input_gates_stay_finite_where_the_unstabilized_form_overflows(form):
    q, k, v, i, f, _ = inputs(1, 24, 2, 4, 3, "large", state=False)
    i = i.clone()
    i[:, ::5] = 100.0  # e^100 > float32 max
    naive = unstabilized(*(x.float() for x in (q, k, v, i, f)))
    assert not torch.isfinite(naive).all()
    h, s = mlstm(*(x.float() for x in (q, k, v, i, f)), output_final_state=True, form=form,
                 chunk_size=8)
    h_ref, s_ref = recurrent(q, k, v, i, f, output_final_state=True)
    assert_close(h, h_ref, dtype=F32)
    assert_state(s, s_ref, F32)


def test_zero_initial_state_equals_none():
    q, k, v, i, f, s0 = inputs(2, 19, 2, 4, 3, "large")
    zero = tuple(torch.zeros_like(x) for x in s0)
    for form in ("recurrent", "parallel", "chunk"):
        a, sa = mlstm(q, k, v, i, f, output_final_state=True, form=form, chunk_size=8)
        b, sb = mlstm(q, k, v, i, f, initial_state=zero, output_final_state=True, form=form,
                      chunk_size=8)
        assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(sa, sb, strict=True))


@pytest.mark.parametrize("form", ["recurrent", "parallel", "chunk"])
def test_gradcheck(form):
    q, k, v, i, f, s0 = inputs(1, 6, 1, 3, 2, "large", seed=1)
    f = f.clamp(max=-0.05)  # finite differences stay inside f <= 0
    leaves = [x.clone().requires_grad_() for x in (q, k, v, i, f, *s0)]

    def fn(q, k, v, i, f, C0, n0, m0):
        h, s = mlstm(q, k, v, i, f, initial_state=(C0, n0, m0), output_final_state=True,
                     form=form, chunk_size=4)
        return h, *s

    assert torch.autograd.gradcheck(fn, tuple(leaves), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("gates", GATES)
@pytest.mark.parametrize("form", ["chunk", "parallel"])
def test_gradients_equal_recurrent(form, gates):
    xs = inputs(2, 29, 2, 5, 4, gates, seed=2)
    xs = [*xs[:5], *xs[5]]
    gen = torch.Generator().manual_seed(7)

    def grads(form):
        leaves = [x.clone().requires_grad_() for x in xs]
        h, s = mlstm(*leaves[:5], initial_state=tuple(leaves[5:]), output_final_state=True,
                     form=form, chunk_size=8)
        gen.manual_seed(7)
        loss = sum((y * torch.randn(y.shape, generator=gen, dtype=F64)).sum() for y in (h, *s))
        return torch.autograd.grad(loss, leaves)

    for name, a, b in zip(["q", "k", "v", "i", "f", "C0", "n0", "m0"], grads(form),
                          grads("recurrent"), strict=True):
        assert_close(a, b, dtype=F64, what=f"grad {name}")


@pytest.mark.parametrize("form", ["recurrent", "parallel", "chunk"])
@pytest.mark.parametrize("T, split", [(40, 17), (9, 1), (20, 19)])
def test_split_with_carried_state_equals_one_pass(form, T, split):
    q, k, v, i, f, s0 = inputs(2, T, 2, 4, 3, "large")
    run = partial(mlstm, output_final_state=True, form=form, chunk_size=8)
    whole, s_whole = run(q, k, v, i, f, initial_state=s0)
    first, s_mid = run(*(x[:, :split] for x in (q, k, v, i, f)), initial_state=s0)
    second, s_end = run(*(x[:, split:] for x in (q, k, v, i, f)), initial_state=s_mid)
    assert_close(torch.cat([first, second], dim=1), whole, dtype=F64)
    assert_state(s_end, s_whole, F64)


def test_step_decoding_equals_chunk():
    q, k, v, i, f, s0 = inputs(2, 13, 2, 4, 3, "large")
    h_ref, s_ref = mlstm(q, k, v, i, f, initial_state=s0, output_final_state=True, chunk_size=4)
    state, hs = s0, []
    for t in range(13):
        h, state = mlstm_step(q[:, t], k[:, t], v[:, t], i[:, t], f[:, t], state)
        hs.append(h)
    assert_close(torch.stack(hs, dim=1), h_ref, dtype=F64)
    assert_state(state, s_ref, F64)
    h0, s1 = mlstm_step(q[:, 0], k[:, 0], v[:, 0], i[:, 0], f[:, 0])  # no state: zeros, m = 0
    h1, _ = mlstm(q[:, :1], k[:, :1], v[:, :1], i[:, :1], f[:, :1])
    assert_close(h0, h1[:, 0], dtype=F64)


@pytest.mark.parametrize("form", ["recurrent", "parallel", "chunk"])
@pytest.mark.parametrize("state", [False, True])
def test_cu_seqlens_equals_a_loop_over_sequences(form, state):
    q, k, v, i, f, _ = inputs(1, 30, 2, 4, 3, "large")
    cu = torch.tensor([0, 5, 6, 30], dtype=torch.int32)
    s0 = inputs(3, 1, 2, 4, 3, seed=4)[5] if state else None
    h, s = mlstm(q, k, v, i, f, initial_state=s0, output_final_state=True, cu_seqlens=cu,
                 form=form, chunk_size=4)
    for n, (a, b) in enumerate([(0, 5), (5, 6), (6, 30)]):
        s0_n = None if s0 is None else tuple(x[n : n + 1] for x in s0)
        h_n, s_n = recurrent(*(x[:, a:b] for x in (q, k, v, i, f)), initial_state=s0_n,
                             output_final_state=True)
        assert_close(h[:, a:b], h_n, dtype=F64)
        assert_state(tuple(x[n : n + 1] for x in s), s_n, F64)


@pytest.mark.parametrize("form", ["recurrent", "parallel", "chunk"])
def test_bf16_keeps_dtype_and_accumulates_in_f32(form):
    q, k, v, i, f, s0 = inputs(1, 40, 2, 8, 8, "large")
    half = [x.to(BF16) for x in (q, k, v, i, f)]
    h, s = mlstm(*half, initial_state=tuple(x.float() for x in s0), output_final_state=True,
                 form=form, chunk_size=16)
    assert h.dtype == BF16 and all(x.dtype == F32 for x in s)
    h_ref, s_ref = recurrent(*(x.to(F64) for x in half), initial_state=s0,
                             output_final_state=True)
    assert_close(h, h_ref, dtype=BF16)
    assert_state(s, s_ref, F32)


def _bad(**over):
    q, k, v, i, f, s0 = inputs(1, 5, 2, 4, 3)
    kw = dict(q=q, k=k, v=v, i=i, f=f, initial_state=s0)
    kw.update(over)
    return kw


S = inputs(1, 5, 2, 4, 3)[5]


@pytest.mark.parametrize("over, err, name", [
    (dict(i=torch.zeros(1, 5, 2, 1, dtype=F64)), ValueError, "i"),
    (dict(i=None), ValueError, "i"),
    (dict(i=torch.zeros(1, 5, 2, dtype=torch.int64)), TypeError, "i"),
    (dict(i=torch.full((1, 5, 2), float("nan"), dtype=F64)), ValueError, "i"),
    (dict(f=torch.full((1, 5, 2), 0.1, dtype=F64)), ValueError, "f"),
    (dict(f=-torch.rand(1, 5, 2, 4, dtype=F64)), ValueError, "f"),
    (dict(f=None), ValueError, "f"),
    (dict(initial_state=S[:2]), TypeError, "initial_state"),
    (dict(initial_state=torch.zeros(1, 2, 4, 3, dtype=F64)), TypeError, "initial_state"),
    (dict(initial_state=(S[0], S[1][..., :3], S[2])), ValueError, r"initial_state\[1\] \(n\)"),
    (dict(initial_state=(S[0], S[1], S[2][..., None])), ValueError, r"initial_state\[2\] \(m\)"),
    (dict(form="chunked"), ValueError, "form"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(k=torch.zeros(1, 5, 2, 3, dtype=F64)), ValueError, "q"),
    (dict(v=torch.zeros(1, 6, 2, 3, dtype=F64)), ValueError, "v"),
    (dict(cu_seqlens=torch.tensor([0, 2, 4], dtype=torch.int32)), ValueError, "cu_seqlens"),
])
def test_bad_input_names_the_argument(over, err, name):
    kw = _bad(**over)
    with pytest.raises(err, match=f"^{name}"):
        mlstm(*[kw.pop(n) for n in "qkvif"], **kw)


def test_bad_step_input_names_the_argument():
    q, k, v, i, f, s0 = inputs(1, 1, 2, 4, 3)
    x = [t[:, 0] for t in (q, k, v, i, f)]
    with pytest.raises(ValueError, match="^f_t"):
        mlstm_step(*x[:4], -x[4] + 1.0, s0)
    with pytest.raises(ValueError, match="^i_t"):
        mlstm_step(*x[:3], x[3][..., None], x[4], s0)
    with pytest.raises(ValueError, match=r"^state\[0\] \(C\)"):
        mlstm_step(*x, (s0[0][..., :2], s0[1], s0[2]))

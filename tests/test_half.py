"""Half-precision chunk forms: matmuls in bf16, decays and states in float32.

Under `torch.autocast` (float32 inputs), the chunk forms of linear attention and of the delta
rule cast q, k, v once and run their chunk-local matmuls in bf16
(`half_matmul_dtype`); the decay factors are computed in float32 and the state passed between
chunks is summed in float32 (the delta rule also keeps its triangular solve in float32).
Checked against the float32 chunk form (itself checked against the spec in test_ops_forms):
outputs, gradients and the final state to the bf16 tolerance (2e-2 relative RMSE), the carried
state, packed sequences and ragged T.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ttr.ops import delta_rule, linear_attention
from ttr.ops.common import half_matmul_dtype
from ttr.testing import assert_close

BF16, F32 = torch.bfloat16, torch.float32
KINDS = ["none", "scalar", "dim"]


def inputs(kind, B=2, T=150, H=2, D=16, seed=0, strength=0.2):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, D, generator=gen) for _ in range(3))
    shape = {"none": None, "scalar": (B, T, H), "dim": (B, T, H, D)}[kind]
    g = None if shape is None else -strength * torch.rand(shape, generator=gen)
    return q, k, v, g


def leaves(*xs):
    return [None if x is None else x.clone().requires_grad_() for x in xs]


def grads(xs):
    return [None if x is None else x.grad for x in xs]


def test_half_matmul_dtype():
    x = torch.zeros(2)
    assert half_matmul_dtype(x) is None
    assert half_matmul_dtype(x.to(BF16)) is None  # half inputs are computed in float32
    with torch.autocast("cpu", dtype=BF16):
        assert half_matmul_dtype(x) == BF16
        assert half_matmul_dtype(x.double()) is None  # autocast leaves float64 alone
    with torch.autocast("cpu", dtype=BF16, enabled=False):
        assert half_matmul_dtype(x) is None


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk_size", [16, 64])
def test_autocast_matches_float32(kind, chunk_size):
    """T = 150 is not a multiple of the chunk size; the last chunk is padded."""
    q, k, v, g = inputs(kind)
    s0 = torch.randn(2, 2, 16, 16)
    w = torch.randn(2, 150, 2, 16)
    ref = leaves(q, k, v, g, s0)
    o_ref, s_ref = linear_attention(*ref[:4], initial_state=ref[4], output_final_state=True,
                                    chunk_size=chunk_size)
    ((o_ref * w).sum() + s_ref.sum()).backward()
    half = leaves(q, k, v, g, s0)
    with torch.autocast("cpu", dtype=BF16):
        o, s = linear_attention(*half[:4], initial_state=half[4], output_final_state=True,
                                chunk_size=chunk_size)
    assert o.dtype == BF16 and s.dtype == F32
    ((o.float() * w).sum() + s.sum()).backward()
    assert_close(o, o_ref, dtype=BF16, what=f"{kind} output")
    assert_close(s, s_ref, dtype=BF16, what=f"{kind} final state")
    for name, a, b in zip("q k v g s0".split(), grads(half), grads(ref), strict=True):
        if b is None:
            continue
        assert a.dtype == F32, name  # the gradients of float32 leaves are float32
        assert_close(a, b, dtype=BF16, what=f"{kind} d{name}")


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_inputs_are_computed_in_float32(kind):
    q, k, v, g = inputs(kind, seed=1)
    o_ref, s_ref = linear_attention(q, k, v, g, output_final_state=True)
    xb = [None if x is None else x.to(BF16) for x in (q, k, v)] + [g if g is None else g.to(BF16)]
    o, s = linear_attention(*xb, output_final_state=True)
    assert o.dtype == BF16 and s.dtype == F32
    assert_close(o, o_ref, dtype=BF16)
    # the same float32 computation on the rounded inputs: the state never passes through bf16
    s32 = linear_attention(*[None if x is None else x.float() for x in xb],
                           output_final_state=True)[1]
    assert_close(s, s32, tol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_autocast_state_carry_and_packed(kind):
    """A split carried through the float32 state, and packed sequences, equal one pass."""
    q, k, v, g = inputs(kind, B=1, T=100, seed=2)
    with torch.autocast("cpu", dtype=BF16):
        o, s = linear_attention(q, k, v, g, output_final_state=True, chunk_size=16)
        part = [None if x is None else x[:, :37] for x in (q, k, v, g)]
        rest = [None if x is None else x[:, 37:] for x in (q, k, v, g)]
        o1, s1 = linear_attention(*part, output_final_state=True, chunk_size=16)
        o2, s2 = linear_attention(*rest, initial_state=s1, output_final_state=True, chunk_size=16)
        assert s1.dtype == F32
        cu = torch.tensor([0, 37, 100])
        op, sp = linear_attention(q, k, v, g, output_final_state=True, chunk_size=16,
                                  cu_seqlens=cu)
    assert_close(torch.cat([o1, o2], 1), o, dtype=BF16)
    assert_close(s2, s, dtype=BF16)
    assert_close(op[:, :37], o1, dtype=BF16)
    assert_close(sp[1], linear_attention(*rest, output_final_state=True)[1][0], dtype=BF16)


def test_autocast_strong_decay_stays_finite():
    """Chunks whose total decay underflows (g = -20 per step) under bf16 matmuls."""
    q, k, v, g = inputs("dim", T=128, seed=3, strength=20.0)
    ref = linear_attention(q, k, v, g)[0]
    with torch.autocast("cpu", dtype=BF16):
        o = linear_attention(q, k, v, g)[0]
    assert bool(torch.isfinite(o).all())
    assert_close(o, ref, dtype=BF16)


@pytest.mark.parametrize("gated", [False, True], ids=["delta", "gated-delta"])
def test_delta_rule_autocast_matches_float32(gated):
    gen = torch.Generator().manual_seed(4)
    B, T, H, D = 2, 150, 2, 16
    q, v = (torch.randn(B, T, H, D, generator=gen) for _ in range(2))
    k = F.normalize(torch.randn(B, T, H, D, generator=gen), dim=-1)
    beta = torch.rand(B, T, H, generator=gen)
    g = -0.2 * torch.rand(B, T, H, generator=gen) if gated else None
    s0 = torch.randn(B, H, D, D, generator=gen)
    w = torch.randn(B, T, H, D, generator=gen)
    ref = leaves(q, k, v, beta, g, s0)
    o_ref, s_ref = delta_rule(*ref[:5], initial_state=ref[5], output_final_state=True,
                              chunk_size=32)
    ((o_ref * w).sum() + s_ref.sum()).backward()
    half = leaves(q, k, v, beta, g, s0)
    with torch.autocast("cpu", dtype=BF16):
        o, s = delta_rule(*half[:5], initial_state=half[5], output_final_state=True,
                          chunk_size=32)
    assert o.dtype == BF16 and s.dtype == F32
    ((o.float() * w).sum() + s.sum()).backward()
    assert_close(o, o_ref, dtype=BF16, what="output")
    assert_close(s, s_ref, dtype=BF16, what="final state")
    for name, a, b in zip("q k v beta g s0".split(), grads(half), grads(ref), strict=True):
        if b is not None:
            assert a.dtype == F32, name
            assert_close(a, b, dtype=BF16, what=f"d{name}")


# -- every op and form under autocast ------------------------------------------------------------

def _every_op_case(gen):
    """{name: (op, positional tensors, keyword options, forms)} on small float32 inputs."""
    from ttr import ops

    B, T, H, D = 2, 70, 2, 16  # T: two chunks of 64 and a ragged one; blocks of 64 too
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    u = lambda *s: torch.rand(*s, generator=gen)  # noqa: E731
    q, v = r(B, T, H, D), r(B, T, H, D)
    k = F.normalize(r(B, T, H, D), dim=-1)
    beta, g, gd = u(B, T, H), -0.1 * u(B, T, H), -0.1 * u(B, T, H, D)
    return {
        "linear_attention": (ops.linear_attention, (q, k, v, gd), {},
                             ("recurrent", "parallel", "chunk")),
        "delta_rule": (ops.delta_rule, (q, k, v, beta, g), {}, ("recurrent", "chunk")),
        "delta_product": (ops.delta_product, (q, F.normalize(r(B, T, H, 2, D), dim=-1),
                                              r(B, T, H, 2, D), u(B, T, H, 2), g), {},
                          ("recurrent", "chunk")),
        "momentum_delta_rule": (ops.momentum_delta_rule, (q, k, v, beta, 0.9 * u(B, T, H), g),
                                {}, ("recurrent", "chunk", "chunk_recurrent")),
        "rls": (ops.rls, (q, k, v), {"ridge": 1.0}, ("recurrent", "parallel", "chunk")),
        "rls_decay": (ops.rls, (q, k, v, g), {"ridge": 1.0}, ("recurrent", "parallel", "chunk")),
        "kernel_regression": (ops.kernel_regression, (q, k, v), {"ridge": 1.0},
                              ("recurrent", "blocked")),
        "softmax_attention": (ops.softmax_attention, (q, k, v), {}, ("recurrent", "fused")),
        "local_linear_attention": (ops.local_linear_attention, (q, k, v), {"ridge": 0.1},
                                   ("naive", "blocked")),
        "mlstm": (ops.mlstm, (q, k, v, r(B, T, H), F.logsigmoid(r(B, T, H) + 3)), {},
                  ("recurrent", "parallel", "chunk")),
        "rwkv6": (ops.rwkv6, (q, k, v, gd, r(H, D)), {}, ("recurrent", "chunk")),
        "ttt": (ops.ttt, (q, k, v, 0.1 * u(B, T, H)), {"params": ops.ttt_params(H, D)},
                ("recurrent", "chunk")),
        "titans": (ops.titans, (q, k, v, 0.1 * u(B, T, H), 0.5 * u(B, T, H), 0.1 * u(B, T, H)),
                   {"params": ops.titans_params(H, D, D, generator=gen)},
                   ("recurrent", "chunk", "chunk_recurrent")),
    }


# ops that compute in float32 under autocast (`computes_in_float32_under_autocast`); the
# recurrent and parallel forms (the specs) of every op do too
FLOAT32_OPS = ("rls", "rls_decay", "kernel_regression", "mlstm", "rwkv6")
AUTOCAST_CASES = [pytest.param(name, form, id=f"{name}-{form}")
                  for name, (_, _, _, forms) in _every_op_case(torch.Generator()).items()
                  for form in forms]


def _tensors(state):
    if isinstance(state, torch.Tensor):
        return [state]
    items = state.values() if isinstance(state, dict) else state
    return [t for x in items for t in _tensors(x)]


@pytest.mark.parametrize("name, form", AUTOCAST_CASES)
def test_every_op_runs_under_autocast(name, form):
    """The autocast contract (ttr.ops.common.float32_under_autocast): every op and form runs
    under bf16 autocast with float32 inputs, forward and backward; its final state is float32,
    its gradients float32 and within the bf16 tolerance of the float32 call's, its output too.
    The specs and the solvers compute in float32: they equal the float32 call. The other forms
    take a half path of their own or autocast's half-precision matmuls."""
    op, args, kw, _ = _every_op_case(torch.Generator().manual_seed(5))[name]
    w = torch.randn(2, 70, 2, 16, generator=torch.Generator().manual_seed(6))
    ref = leaves(*args)
    o_ref, s_ref = op(*ref, form=form, output_final_state=True, **kw)
    (o_ref * w).sum().backward()
    half = leaves(*args)
    with torch.autocast("cpu", dtype=BF16):
        o, s = op(*half, form=form, output_final_state=True, **kw)
    (o.float() * w).sum().backward()
    assert o.dtype in (BF16, F32)
    assert all(x.dtype == F32 for x in _tensors(s)), f"state dtypes {_tensors(s)}"
    for a, b in zip(_tensors(s), _tensors(s_ref), strict=True):
        assert_close(a, b, dtype=BF16, what="final state")
    assert_close(o, o_ref, dtype=BF16, what="output")
    if form in ("recurrent", "parallel") or name in FLOAT32_OPS:
        assert o.dtype == F32
        assert_close(o, o_ref, tol=1e-6, what="float32 output")
    for i, (a, b) in enumerate(zip(grads(half), grads(ref), strict=True)):
        assert a.dtype == F32, f"gradient {i}"
        assert_close(a, b, dtype=BF16, what=f"gradient of argument {i}")

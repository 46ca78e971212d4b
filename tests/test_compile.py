"""The chunk forms trace under `torch.compile(fullgraph=True)`: no graph breaks, forward and
backward (issue: GPU users get generated fused kernels from the same code).

`aot_eager` runs dynamo's trace and AOTAutograd's forward/backward graphs without generating
code, so a graph break, a data-dependent shape or an untraceable custom backward fails here in
seconds; the compiled values must equal the eager ones. (Inductor's C++ codegen is exercised by
`ttr bench --compile`, which takes minutes per op.)
"""

from __future__ import annotations

import pytest
import torch

from ttr.bench_cases import OPS
from ttr.ops import mlstm, rwkv6

CHUNKED = [name for name, op in OPS.items() if "chunk" in op.forms]


def _inputs(make, T=37, H=2, D=8):
    torch.manual_seed(0)
    return [x.double().requires_grad_() for x in make(1, T, H, D)]


def _check(fn, xs):
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    o = compiled(*xs)
    grads = torch.autograd.grad(o.square().sum(), xs)
    o_ref = fn(*xs)
    grads_ref = torch.autograd.grad(o_ref.square().sum(), xs)
    torch.testing.assert_close(o, o_ref, rtol=1e-12, atol=1e-12)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)


def test_every_chunked_bench_op_is_listed():
    # the parametric memories of the issue, so a new chunked op is not silently left out
    assert {"linear_attention", "linear_attention_scalar", "linear_attention_per_dim",
            "delta_rule", "gated_delta_rule", "delta_product", "momentum_delta_rule",
            "rls"} <= set(CHUNKED)


@pytest.mark.parametrize("name", CHUNKED)
@pytest.mark.parametrize("chunk_size", [16, 12], ids=["C16", "C12"])  # 12: not a power of 2
def test_chunk_form_compiles_fullgraph(name, chunk_size):
    op = OPS[name]

    def fn(*xs):
        return op.fn(*xs, form="chunk", chunk_size=chunk_size, **op.kwargs)[0]

    _check(fn, _inputs(op.make))


def test_mlstm_and_rwkv6_chunk_forms_compile_fullgraph():
    torch.manual_seed(0)
    B, T, H, D = 1, 37, 2, 8
    q, k, v = (torch.randn(B, T, H, D, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    i = torch.randn(B, T, H, dtype=torch.float64, requires_grad=True)
    f = (-torch.rand(B, T, H, dtype=torch.float64)).requires_grad_()  # log forget gate <= 0
    _check(lambda *xs: mlstm(*xs, form="chunk", chunk_size=16)[0], [q, k, v, i, f])
    w = (-torch.rand(B, T, H, D, dtype=torch.float64)).requires_grad_()
    u = torch.randn(H, D, dtype=torch.float64, requires_grad=True)
    _check(lambda *xs: rwkv6(*xs, form="chunk", chunk_size=16)[0], [q, k, v, w, u])

"""Input validation and packing shared by every op in `ttr.ops`.

Every op takes `q, k: [B, T, H, Dk]`, `v: [B, T, H, Dv]`, per-token scalars `[B, T, H]` and
per-dimension log-decays `[B, T, H, Dk]` (DESIGN.md, "The op contract"). These helpers turn a
wrong shape, dtype, device or value into a `ValueError`/`TypeError` that names the argument,
what it got and what was expected, instead of a silent broadcast deep inside a matmul.

`varlen` implements `cu_seqlens` for any op by running it once per packed sequence; it is
exact by construction, which makes it the spec that faster packed kernels are tested against.
Ops whose state ignores trailing zero inputs (`pad_neutral`) instead run all sequences as one
zero-padded batch, when padding at most doubles the tokens.
`constant` caches the small index and operator tensors the chunk forms build once per size.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable
from itertools import pairwise

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _is_compiling() -> bool:
    # Value checks read tensor data; under torch.compile that would break the graph.
    return bool(getattr(torch.compiler, "is_compiling", lambda: False)())


_CONSTANTS: dict[tuple, object] = {}


def constant(key: tuple, build):
    """build(), cached under `key` in eager mode; under torch.compile it is traced (a cache
    would be a side effect dynamo warns about)."""
    if _is_compiling():
        return build()
    if key not in _CONSTANTS:
        _CONSTANTS[key] = build()
    return _CONSTANTS[key]


def float32_under_autocast(x: torch.Tensor):
    """A context that turns `torch.autocast` off on x's device (a no-op when it is off).

    The autocast contract of the ops: under autocast to a half dtype, with float32 inputs, an op
    either runs a half path of its own (the chunk forms of linear attention, the delta rule and
    DeltaProduct: chunk-local matmuls in the half dtype, decays and states in float32) or it
    computes in float32 throughout, as if autocast were off: the recurrent and parallel specs,
    and the solvers (RLS, kernel regression), whose factorizations and conjugate gradients are
    not safe with half-precision Grams. Left to autocast, their matmuls would return bf16
    operands to float32 in-place updates and solves (RuntimeError: dtypes must match), or
    accumulate a state in bf16."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


def computes_in_float32_under_autocast(op: Callable) -> Callable:
    """Decorate an op whose every form computes in float32 under autocast (see
    `float32_under_autocast`; the op's first argument is a tensor on the compute device)."""

    @functools.wraps(op)
    def wrapper(x, *args, **kwargs):
        if not isinstance(x, torch.Tensor):
            return op(x, *args, **kwargs)  # the op's own check names the argument
        with float32_under_autocast(x):
            return op(x, *args, **kwargs)

    return wrapper


def check_tensor(name: str, x, ndim: int | None = None) -> torch.Tensor:
    """`x` is a floating-point tensor of rank `ndim`."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating-point dtype, got {x.dtype}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(
            f"{name}: expected a {ndim}-d tensor, got shape {tuple(x.shape)} ({x.ndim}-d)"
        )
    return x


class NumericalError(ValueError):
    """Input of the right kind that the op cannot compute with in working precision: NaN or
    Inf values, or a Gram matrix singular to rounding. A training loop can tell this (its
    weights blew up) from a programming error, which stays a plain ValueError."""


_FINITE_CHECKS: contextvars.ContextVar[bool] = contextvars.ContextVar("ttr_finite_checks",
                                                                      default=True)


@contextlib.contextmanager
def finite_checks(enabled: bool):
    """Inside the block the ops check their inputs for NaN and Inf (`check_finite`) or not:
    `with ttr.ops.finite_checks(False): ...`. On by default; torch.compile skips them anyway.

    Why one would turn them off: each check reads the data back to the host, one reduction per
    input (linear attention's chunk forward, 16 heads, T = 2048, 2 threads, the 2-core Xeon:
    8.8 ms with the checks, 7.9 ms without); on a GPU each is a device-to-host synchronization
    that stalls the queue of launched kernels and rules out CUDA graph capture. Off, a NaN or
    Inf in the input propagates to the output instead of raising `NumericalError` here, or
    worse: SDPA's CPU kernel (softmax attention's fused form) returns finite numbers for a NaN
    query (tests/test_ops_input.py). Shape, dtype and device checks stay on (they read no
    data). The setting is per thread and per asyncio task."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled: expected a bool, got {type(enabled).__name__} {enabled!r}")
    token = _FINITE_CHECKS.set(enabled)
    try:
        yield
    finally:
        _FINITE_CHECKS.reset(token)


def check_finite(name: str, x: torch.Tensor) -> None:
    """Raise if `x` holds a NaN or an Inf (unless turned off by `finite_checks(False)`).

    A finite sum implies finite elements (an Inf or a NaN makes the sum Inf or NaN), and one
    reduction is ~20x cheaper than the elementwise `isfinite(x).all()`, which cost more than the
    chunked op itself (measured: 8 ms per [1, 2048, 16, 64] tensor, 1 thread). Only a sum that
    overflows from finite values needs the elementwise check.
    """
    if _is_compiling() or x.numel() == 0 or not _FINITE_CHECKS.get():
        return
    if not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
        raise NumericalError(f"{name}: contains NaN or Inf; expected finite values")


def check_qkv(q, k, v) -> tuple[int, int, int, int, int]:
    """Validate `q, k: [B, T, H, Dk]`, `v: [B, T, H, Dv]`; return (B, T, H, Dk, Dv)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, x, 4)
    B, T, H, Dk = k.shape
    Dv = v.shape[-1]
    if q.shape != k.shape:
        raise ValueError(
            f"q: expected shape {tuple(k.shape)} (the shape of k, [B, T, H, Dk]), "
            f"got {tuple(q.shape)}"
        )
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"v: expected shape [B, T, H, Dv] = [{B}, {T}, {H}, Dv] to match k, "
            f"got {tuple(v.shape)}"
        )
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {q.dtype} (the dtype of q), got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name}: expected device {q.device} (that of q), got {x.device}")
    if T == 0 or B == 0 or H == 0 or Dk == 0 or Dv == 0:
        raise ValueError(f"q/k/v: expected non-empty dimensions, got k {tuple(k.shape)}, v "
                         f"{tuple(v.shape)}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_finite(name, x)
    return B, T, H, Dk, Dv


def check_like(name: str, x, ref: torch.Tensor, shape: tuple[int, ...], what: str):
    """`x` is None or a float tensor of exactly `shape` on `ref`'s device."""
    if x is None:
        return None
    check_tensor(name, x)
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {what} = {list(shape)}, got {tuple(x.shape)}")
    if x.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} (that of q), got {x.device}")
    check_finite(name, x)
    return x


def check_log_decay(g, q: torch.Tensor, per_dim_ok: bool = True):
    """`g` is None, a scalar log-decay `[B, T, H]` or (if allowed) per-dimension `[B, T, H, Dk]`.

    Decay weights are gamma_t = exp(g_t) in (0, 1], so g must be <= 0.
    """
    if g is None:
        return None
    check_tensor("g", g)
    B, T, H, Dk = q.shape
    shapes = [(B, T, H)] + ([(B, T, H, Dk)] if per_dim_ok else [])
    if tuple(g.shape) not in shapes:
        want = " or ".join(str(list(s)) for s in shapes)
        names = "[B, T, H]" + (" or [B, T, H, Dk]" if per_dim_ok else "")
        raise ValueError(f"g: expected log-decay of shape {names} = {want}, got {tuple(g.shape)}")
    if g.device != q.device:
        raise ValueError(f"g: expected device {q.device} (that of q), got {g.device}")
    check_finite("g", g)
    if not _is_compiling() and bool(g.amax() > 0):  # one reduction, not a mask and a reduction
        raise ValueError(
            f"g: expected log-decay <= 0 (decay exp(g) in (0, 1]), got max {g.max().item():.4g}"
        )
    return g


def check_state(name: str, s, shape: tuple[int, ...], what: str, ref: torch.Tensor):
    if s is None:
        return None
    return check_like(name, s, ref, shape, what)


def check_causal(causal) -> None:
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__} {causal!r}")


def check_form(form: str, allowed: tuple[str, ...]) -> str:
    if form not in allowed:
        raise ValueError(f"form: expected one of {list(allowed)}, got {form!r}")
    return form


def check_cu_seqlens(cu_seqlens, q: torch.Tensor) -> torch.Tensor | None:
    """FlashAttention-style packing: B == 1 and int offsets 0 = c_0 < c_1 < ... < c_N = T."""
    if cu_seqlens is None:
        return None
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens: expected an int tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.ndim != 1:
        raise TypeError(
            f"cu_seqlens: expected a 1-d int32/int64 tensor, got {cu_seqlens.dtype} "
            f"of shape {tuple(cu_seqlens.shape)}"
        )
    if q.shape[0] != 1:
        raise ValueError(f"cu_seqlens: expected batch size 1 for packed input, got B={q.shape[0]}")
    c = cu_seqlens.tolist()
    if len(c) < 2 or c[0] != 0 or c[-1] != q.shape[1] or any(b <= a for a, b in pairwise(c)):
        raise ValueError(
            f"cu_seqlens: expected strictly increasing offsets from 0 to T={q.shape[1]}, got {c}"
        )
    return cu_seqlens


def time_steps(*xs: torch.Tensor | None):
    """Per-token slices of `[B, T, ...]` tensors (None stays None), for the recurrent forms.

    `unbind`, not `x[:, t]`: the backward of every `x[:, t]` writes a full-size zero gradient,
    which makes a loop's backward O(T^2) (measured 90x slower at T = 2048 than at T = 256).
    """
    T = next(x.shape[1] for x in xs if x is not None)
    return zip(*[[None] * T if x is None else x.unbind(1) for x in xs], strict=True)


def scan(step: Callable, state, *xs: torch.Tensor | None):
    """The recurrent form's loop: `o_t, state = step(x1_t, ..., xn_t, state)` for every t.

    xs are `[B, T, ...]` (or None); returns (o [B, T, ...], final state).
    """
    outs = []
    for x_t in time_steps(*xs):
        o, state = step(*x_t, state)
        outs.append(o)
    return torch.stack(outs, dim=1), state


PAD_WASTE = 2.0  # batch the padded sequences when N * longest <= PAD_WASTE * total tokens


def varlen(
    run: Callable[..., tuple[torch.Tensor, object]],
    cu_seqlens: torch.Tensor,
    tensors: dict[str, torch.Tensor | None],
    initial_state,
    output_final_state: bool,
    pad_neutral: bool = False,
):
    """Run `run(**tensors_i, initial_state=s_i)` on each packed sequence i and re-pack.

    `tensors` are `[1, T, ...]`; `initial_state` is None or a (pytree of) tensor(s) whose
    leading dimension is the number of sequences N. Returns (o [1, T, ...], final states
    stacked on a leading N dimension, or None).

    pad_neutral: the op's state is unchanged by a step whose inputs are all zero (k = 0 adds
    nothing, g = 0 decays nothing, beta = 0 steps nowhere: linear attention, the delta rule,
    RLS). Then the sequences run as one batch [N, longest, ...], each zero-padded at its end,
    so the final states are those after the last real token; o is gathered back from the real
    positions. One call instead of N (a loop's cost is per call, not per token, for short
    sequences), unless padding would more than double the tokens (PAD_WASTE).
    """
    bounds = cu_seqlens.tolist()
    lens = [b - a for a, b in pairwise(bounds)]
    if pad_neutral and len(lens) > 1 and len(lens) * max(lens) <= PAD_WASTE * bounds[-1]:
        return _padded(run, bounds, lens, tensors, initial_state, output_final_state)
    outs, finals = [], []
    for i, (a, b) in enumerate(pairwise(bounds)):
        piece = {n: (None if x is None else x[:, a:b]) for n, x in tensors.items()}
        s0 = None if initial_state is None else _index_state(initial_state, i)
        o, s = run(**piece, initial_state=s0, output_final_state=output_final_state)
        outs.append(o)
        finals.append(s)
    o = torch.cat(outs, dim=1)
    if not output_final_state:
        return o, None
    return o, _stack_states(finals)


def _padded(run, bounds, lens, tensors, initial_state, output_final_state):
    """`varlen` as one zero-padded batch (see there)."""
    present = [x for x in tensors.values() if x is not None]
    device, T, L = present[0].device, bounds[-1], max(lens)
    pos = torch.arange(L, device=device)  # [L]
    real = pos < torch.tensor(lens, device=device).unsqueeze(1)  # [N, L]
    # each sequence's token positions in the packed input; padding reads row T, a zero row
    index = (torch.tensor(bounds[:-1], device=device).unsqueeze(1) + pos).masked_fill(~real, T)

    def pad(x):  # [1, T, ...] -> [N, L, ...]
        return torch.cat([x[0], x.new_zeros(1, *x.shape[2:])])[index]

    o, s = run(**{n: None if x is None else pad(x) for n, x in tensors.items()},
               initial_state=initial_state, output_final_state=output_final_state)
    return o[real].unsqueeze(0), s  # real positions in row-major order: the packed order


def _index_state(s, i):
    if isinstance(s, torch.Tensor):
        return s[i : i + 1]
    return type(s)(_index_state(x, i) for x in s)


def _stack_states(states):
    first = states[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(states, dim=0)
    return type(first)(_stack_states(list(parts)) for parts in zip(*states, strict=True))


# -- dtypes and decoding steps, shared by the op families ------------------------------------------

def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Accumulate in float32 for half-precision inputs; keep float32 / float64 as is."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def half_matmul_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype a chunk form runs its chunk-local matmuls in: the autocast dtype when autocast
    is on for x's device with a half dtype and x is float32; else None (x's compute dtype
    throughout; half-precision inputs are computed in float32, the most accurate choice).

    Under autocast every matmul would otherwise cast its float32 operands again (a copy per
    call) and hand back half-precision results that the float32 elementwise work promotes
    straight back (0.94-1.12x of float32, session 3). The chunk forms cast once instead, in
    their chunking copy (0.9-1.45x so far: docs/benchmarks.md, session 7)."""
    device = x.device.type
    if x.dtype == torch.float32 and torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        return dtype if dtype in (torch.float16, torch.bfloat16) else None
    return None


def contiguous_as(x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """x as a contiguous copy in `dtype` (None: its own), in one pass. Not `.to` when the dtype
    stays: the backward of `.to` copies the gradient into x's strides, that of `.contiguous`
    passes it on (~5 ms per forward + backward of [1, 2048, 16, 64] scalar-decay linear
    attention)."""
    if dtype is None or dtype == x.dtype:
        return x.contiguous()
    return x.to(dtype=dtype, memory_format=torch.contiguous_format)


def check_chunk_size(chunk_size) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int, got {chunk_size!r}")
    return chunk_size


def check_step_qkv(q_t, k_t, v_t) -> tuple[int, int, int, int]:
    """Validate one decoding step `q_t, k_t: [B, H, Dk]`, `v_t: [B, H, Dv]`; return B, H, Dk, Dv."""
    for name, x in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t)):
        check_tensor(name, x, 3)
    if k_t.shape != q_t.shape:
        raise ValueError(f"k_t: expected shape {tuple(q_t.shape)} (that of q_t, [B, H, Dk]), "
                         f"got {tuple(k_t.shape)}")
    if v_t.shape[:2] != q_t.shape[:2]:
        raise ValueError(f"v_t: expected shape [B, H, Dv] = [{q_t.shape[0]}, {q_t.shape[1]}, Dv], "
                         f"got {tuple(v_t.shape)}")
    for name, x in (("k_t", k_t), ("v_t", v_t)):
        if x.dtype != q_t.dtype:
            raise TypeError(f"{name}: expected dtype {q_t.dtype} (that of q_t), got {x.dtype}")
        if x.device != q_t.device:
            raise ValueError(f"{name}: expected device {q_t.device} (that of q_t), got {x.device}")
    for name, x in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t)):
        check_finite(name, x)
    B, H, Dk = q_t.shape
    return B, H, Dk, v_t.shape[-1]


def check_step_decay(g_t, q_t: torch.Tensor, per_dim_ok: bool = True):
    """`g_t` is None, `[B, H]` or (if allowed) `[B, H, Dk]`, finite and <= 0."""
    if g_t is None:
        return None
    check_tensor("g_t", g_t)
    B, H, Dk = q_t.shape
    shapes = [(B, H)] + ([(B, H, Dk)] if per_dim_ok else [])
    if tuple(g_t.shape) not in shapes:
        want = " or ".join(str(list(s)) for s in shapes)
        names = "[B, H]" + (" or [B, H, Dk]" if per_dim_ok else "")
        raise ValueError(f"g_t: expected log-decay of shape {names} = {want}, "
                         f"got {tuple(g_t.shape)}")
    if g_t.device != q_t.device:
        raise ValueError(f"g_t: expected device {q_t.device} (that of q_t), got {g_t.device}")
    check_finite("g_t", g_t)
    if bool((g_t > 0).any()):
        raise ValueError(f"g_t: expected log-decay <= 0 (decay exp(g) in (0, 1]), "
                         f"got max {g_t.max().item():.4g}")
    return g_t

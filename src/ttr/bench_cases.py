"""What `ttr bench` times: the op table (inputs, forms, size caps) and the analytic FLOP counts.

Kept apart from the runner (ttr/bench.py) so that adding an op or a form is one edit here: a row
in `OPS`, and a formula in `FLOPS` (tests/test_bench.py checks that every (op, form) has one).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F

# Functions and FORMS by name from each module: `ttr.ops.delta_product` may become a function
# once the package exports it, so the modules themselves are not imported as attributes.
from ttr.ops.delta import FORMS as DELTA_FORMS
from ttr.ops.delta import delta_rule
from ttr.ops.delta_product import FORMS as PRODUCT_FORMS
from ttr.ops.delta_product import delta_product
from ttr.ops.linear import FORMS as LINEAR_FORMS
from ttr.ops.linear import linear_attention
from ttr.ops.local import FORMS as LOCAL_FORMS
from ttr.ops.local import softmax_attention
from ttr.ops.local_linear import FORMS as LOCAL_LINEAR_FORMS
from ttr.ops.local_linear import local_linear_attention
from ttr.ops.momentum import FORMS as MOMENTUM_FORMS
from ttr.ops.momentum import momentum_delta_rule
from ttr.ops.rls import FORMS as RLS_FORMS
from ttr.ops.rls import rls
from ttr.ops.rls_cg import cg_iterations

# -- what is benchmarked ------------------------------------------------------------------------

CHUNK, N_H = 64, 2  # the ops' default chunk; DeltaProduct steps


def _unit(*shape):  # unit-norm keys and queries keep the delta rule and RLS well conditioned
    return F.normalize(torch.randn(*shape), dim=-1)


def _beta(*shape):
    return torch.sigmoid(torch.randn(*shape))


def _log_decay(*shape):  # exp(g) ~ 0.98: a typical trained forget gate
    return F.logsigmoid(torch.randn(*shape) + 4.0)


@dataclasses.dataclass(frozen=True)
class Op:
    """One row group: `fn(*make(B, T, H, D), form=form, **kwargs)` returns (o, state)."""

    name: str
    fn: Callable
    forms: tuple[str, ...]  # the op module's FORMS, so a new form is benchmarked (and counted)
    make: Callable[[int, int, int, int], list[torch.Tensor]]
    about: str
    kwargs: dict = dataclasses.field(default_factory=dict)
    # iterative chunk forms: iterations(*inputs) -> the count that FLOPS[(name, "chunk")] takes
    iterations: Callable[..., int] | None = None


def _qkv(*params: Callable) -> Callable:
    """Inputs q, k (unit norm), v and per-token params [B, T, H] built by `params`."""
    return lambda B, T, H, D: [_unit(B, T, H, D), _unit(B, T, H, D), torch.randn(B, T, H, D),
                               *(p(B, T, H, D) for p in params)]


BETA = lambda B, T, H, D: _beta(B, T, H)
G = lambda B, T, H, D: _log_decay(B, T, H)
G_DIM = lambda B, T, H, D: _log_decay(B, T, H, D)
MU = lambda B, T, H, D: 0.9 * _beta(B, T, H)


def _product_inputs(B, T, H, D):  # DeltaProduct: n_h keys, values and step sizes per token
    return [_unit(B, T, H, D), _unit(B, T, H, N_H, D), torch.randn(B, T, H, N_H, D),
            _beta(B, T, H, N_H), _log_decay(B, T, H)]


RIDGE = {"ridge": 1.0}  # both RLS rows

OPS = {op.name: op for op in [
    Op("linear_attention", linear_attention, LINEAR_FORMS, _qkv(), "no decay (Eq. 2)"),
    Op("linear_attention_scalar", linear_attention, LINEAR_FORMS, _qkv(G),
       "scalar decay per head (RetNet / Mamba-2)"),
    Op("linear_attention_per_dim", linear_attention, LINEAR_FORMS, _qkv(G_DIM),
       "per-dimension decay (GLA)"),
    Op("delta_rule", delta_rule, DELTA_FORMS, _qkv(BETA), "DeltaNet"),
    Op("gated_delta_rule", delta_rule, DELTA_FORMS, _qkv(BETA, G), "Gated DeltaNet"),
    Op("delta_product", delta_product, PRODUCT_FORMS, _product_inputs,
       f"n_h = {N_H} steps per token, scalar decay"),
    Op("momentum_delta_rule", momentum_delta_rule, MOMENTUM_FORMS, _qkv(BETA, MU, G),
       "Titans-linear, scalar decay; its chunk form is a different function (chunk-start "
       "gradients) from its recurrent form"),
    Op("rls", rls, RLS_FORMS, _qkv(), "exact ridge regression, ridge 1, uniform weights",
       RIDGE),
    Op("rls_decay", rls, RLS_FORMS, _qkv(G), "ridge regression with scalar decay, ridge 1; "
       "its chunk form is conjugate gradient (relative residual 1e-5 in fp32)", RIDGE,
       iterations=lambda q, k, v, g: cg_iterations(q, k, g, **RIDGE)),
    Op("softmax_attention", softmax_attention, LOCAL_FORMS, _qkv(), "causal SDPA"),
    Op("local_linear_attention", local_linear_attention, LOCAL_LINEAR_FORMS, _qkv(),
       "p = 1 (Eq. 52-54), ridge 0.1, bandwidth 2 sqrt(D); blocked: custom backward",
       {"ridge": 0.1}),
    Op("local_linear_attention_recompute", local_linear_attention, ("blocked",), _qkv(),
       "the same, recompute=True: the backward recomputes the per-query statistics",
       {"ridge": 0.1, "recompute": True}),
]}

# Forms whose time or memory grows too fast for the default sizes (B*H = 16, D = 64) run only
# up to a length; the table says so. `--no-caps` lifts these.
LOOP_CAP = (2048, "a Python loop over tokens")
CAPS = {
    ("linear_attention", "parallel"): (2048, "O(T^2) memory: 4 GB per T x T tensor at 8192"),
    ("linear_attention_scalar", "parallel"): (2048, "O(T^2) memory"),
    ("linear_attention_per_dim", "parallel"): (256, "O(T^2 Dk) memory: 5 GB and 12 s per "
                                                    "fwd+bwd at T = 512"),
    ("rls", "parallel"): (2048, "O(T Dk^2) memory: 2 GB per prefix-Gram tensor at T = 8192"),
    ("rls_decay", "parallel"): (2048, "O(T Dk^2) memory"),
    ("softmax_attention", "recurrent"): (512, "a Python loop whose backward is O(T^2)"),
    ("local_linear_attention", "naive"): (4096, "O(T^2 (1 + D)) memory"),
    ("local_linear_attention", "recurrent"): (512, "a Python loop over queries, O(T^2 D^2) "
                                                   "work and an autograd graph per query"),
    # O(T^2 (Dk^2 + Dk Dv)) work: the T = 8192, 16-head case (6 forward and 6 forward+backward
    # calls) had not finished after 15 minutes
    ("local_linear_attention", "blocked"): (2048, "O(T^2 D^2) time: minutes per call at 8192"),
    ("local_linear_attention_recompute", "blocked"): (2048, "O(T^2 D^2) time"),
}


def cap(op: str, form: str) -> tuple[int, str] | None:
    return CAPS.get((op, form), LOOP_CAP if "recurrent" in form else None)


# -- analytic FLOP counts -----------------------------------------------------------------------
# Forward FLOPs of ONE (batch, head), a multiply-add = 2 FLOPs, leading terms only; T tokens,
# C = min(64, T) chunk, Dk = Dv = D. Forward+backward is counted as 3x the
# forward (the usual convention: the backward of a matmul is two matmuls) except in FWD_BWD.
#   linear attention  recurrent  4 T Dk Dv (rank-1 update k v^T + read S^T q), +T Dk Dv decay
#                     parallel   2 T^2 (Dk + Dv) + 2 T Dk Dv (full T x T QK^T and AV, final
#                                state); per-dim decay 3 T^2 Dk for the [T, T, Dk] einsum
#                     chunk      2 T C (Dk + Dv) + 4 T Dk Dv (intra-chunk QK^T and AV; chunk
#                                states K^T V; reads Q S_0); per-dim decay + 2 T C Dk: the
#                                triangular-matmul cumulative sums of its log2(C) levels
#   delta rule        recurrent  6 T Dk Dv (read S^T k, rank-1 update, read S^T q), +decay
#                     chunk      T (C^2 + 4 C (Dk + Dv) + 6 Dk Dv): per chunk KK^T, the C x C
#                                triangular solve against I (C^3), W = T K and U = T V, state
#                                pass W S and K^T u, outputs QK^T, Q S_0, A u
#   delta product     the delta rule's counts on T n_h sub-steps (+2 T Dk Dv per-token read)
#   momentum          recurrent  9 T Dk Dv (decay, read, outer product, mu U - step, S + U,
#                                read); chunk_recurrent 10 T Dk Dv (also decays S_ref);
#                     chunk      T (2 C^2 + 2 C (Dk + Dv) + 10 Dk Dv): per chunk Gamma P
#                                (2 C^3), QK^T, K S, two state updates, three output products
#   rls               recurrent  T (2/3 Dk^3 + 4 Dk^2 + 4 Dk Dv): Gram updates, one LU solve
#                                per token, read
#                     parallel   T (2/3 Dk^3 + 2 C Dk^2 + 7 Dk^2 + 2 C (Dk + Dv) + 4 Dk Dv):
#                                prefix Grams as chunk linear attention with Dk^2-wide values,
#                                batched LU solves, a second chunk linear attention
#                     chunk      T/C (Dk^3 + 16/3 C^3 + 10 C Dk^2 + 18 C^2 Dk + 2 C^2 Dv
#                                + 4 C Dk Dv): per chunk Cholesky + inverse of the base, one
#                                C x C Cholesky + triangular inverse, two Woodbury solves (one
#                                refinement), the refinement residual, the output
#   softmax           both       T^2 (Dk + Dv): the causal half of QK^T and PV
#   local linear      blocked    T^2/2 (2 Dk^2 + 2 Dk Dv + 4 Dk + 2 Dv) + T (Dk^3/3 + 2 Dk^2 Dv):
#                                per (query, visible key) the log-weight and the moments
#                                w k, w k k^T, w v, w v k^T; per query one Cholesky-sized
#                                solve; naive: the same on all T^2 pairs. Its backward
#                                (`FWD_BWD`) is no 2x matmul mirror of the forward: it only
#                                recomputes the log-weights and takes ~10 (query x key)
#                                products of width Dk or Dv, T^2/2 (20 Dk + 4 Dv).


def _la(T, C, K, V, decay):
    per_dim = decay == "per_dim"
    return {"recurrent": (4 + (decay != "none")) * T * K * V,
            "parallel": 2 * T * T * V + (3 if per_dim else 2) * T * T * K + 2 * T * K * V,
            "chunk": 2 * T * C * (K + V) + 4 * T * K * V
            + per_dim * 2 * T * C * K}


def _delta(T, C, K, V, decay):
    return {"recurrent": (6 + decay) * T * K * V,
            "chunk": T * (C * C + 4 * C * (K + V) + 6 * K * V)}


FLOPS: dict[tuple[str, str], Callable[[int, int, int, int], float]] = {
    **{(f"linear_attention{s}", f): (lambda T, C, K, V, f=f, d=d: _la(T, C, K, V, d)[f])
       for s, d in (("", "none"), ("_scalar", "scalar"), ("_per_dim", "per_dim"))
       for f in ("recurrent", "parallel", "chunk")},
    **{(n, f): (lambda T, C, K, V, f=f, d=d: _delta(T, C, K, V, d)[f])
       for n, d in (("delta_rule", 0), ("gated_delta_rule", 1)) for f in ("recurrent", "chunk")},
    ("delta_product", "recurrent"): lambda T, C, K, V: T * (4 * N_H + 3) * K * V,
    ("delta_product", "chunk"): lambda T, C, K, V: _delta(T * N_H, C, K, V, 1)["chunk"],
    ("momentum_delta_rule", "recurrent"): lambda T, C, K, V: 9 * T * K * V,
    ("momentum_delta_rule", "chunk_recurrent"): lambda T, C, K, V: 10 * T * K * V,
    ("momentum_delta_rule", "chunk"):
        lambda T, C, K, V: T * (2 * C * C + 2 * C * (K + V) + 10 * K * V),
    ("rls", "recurrent"): lambda T, C, K, V: T * (2 / 3 * K**3 + 4 * K * K + 4 * K * V),
    ("rls", "parallel"): lambda T, C, K, V: T * (2 / 3 * K**3 + 2 * C * K * K + 7 * K * K
                                                 + 2 * C * (K + V) + 4 * K * V),
    ("rls", "chunk"): lambda T, C, K, V: T / C * (K**3 + 16 / 3 * C**3 + 10 * C * K * K
                                                  + 18 * C * C * K + 2 * C * C * V
                                                  + 4 * C * K * V),
    # with decay: recurrent +2 T Dk (Dk + Dv) decays; the chunk form is CG, n iterations of a
    # chunked linear attention with Dv = Dk, then one with the values
    ("rls_decay", "recurrent"): lambda T, C, K, V: T * (2 / 3 * K**3 + 6 * K * K + 6 * K * V),
    ("rls_decay", "parallel"): lambda T, C, K, V: T * (2 / 3 * K**3 + 2 * C * K * K + 8 * K * K
                                                       + 2 * C * (K + V) + 4 * K * V),
    ("rls_decay", "chunk"): lambda T, C, K, V, n=1: (n * _la(T, C, K, K, "scalar")["chunk"]
                                                     + _la(T, C, K, V, "scalar")["chunk"]),
    ("softmax_attention", "fused"): lambda T, C, K, V: T * T * (K + V),
    ("softmax_attention", "recurrent"): lambda T, C, K, V: T * T * (K + V),
}


def _local_linear(T, K, V, pairs):
    """The naive form: the moments with v k^T, and M1^T solved with Dv right-hand sides."""
    return pairs * (2 * K * K + 2 * K * V + 4 * K + 2 * V) + T * (K**3 / 3 + 2 * K * K * V)


def _local_linear_blocked(T, K, V, pairs):
    """The blocked form with ridge > 0: pass 1 streams the moments without v k^T (2 K^2 + 4 K
    + 2 V per pair), an LU and one solve per query, pass 2 reads the output (4 K + 2 V)."""
    return pairs * (2 * K * K + 8 * K + 4 * V) + T * (2 / 3 * K**3 + 2 * K * K)


def _local_linear_backward(T, K, V, pairs):
    """`_BlockedFn.backward`: the pass for Cov_dv g (4 K + 2 V per pair) and the gradient pass
    (20 K + 4 V), one solve per query."""
    return pairs * (24 * K + 6 * V) + T * 2 * K * K


FLOPS[("local_linear_attention", "blocked")] = \
    lambda T, C, K, V: _local_linear_blocked(T, K, V, T * T / 2)
FLOPS[("local_linear_attention", "naive")] = lambda T, C, K, V: _local_linear(T, K, V, T * T)
# the spec forms each query's G and R over the keys it sees (T^2 / 2 pairs, G in full) and
# solves with Dv right-hand sides: the naive form's count on the causal pairs
FLOPS[("local_linear_attention", "recurrent")] = lambda T, C, K, V: _local_linear(T, K, V,
                                                                                T * T / 2)
FLOPS[("local_linear_attention_recompute", "blocked")] = \
    FLOPS[("local_linear_attention", "blocked")]
# Forward+backward FLOPs where they are not 3x the forward.
FWD_BWD: dict[tuple[str, str], Callable[[int, int, int, int], float]] = {
    ("local_linear_attention", "blocked"):
        lambda T, C, K, V: (_local_linear_blocked(T, K, V, T * T / 2)
                            + _local_linear_backward(T, K, V, T * T / 2)),
    ("local_linear_attention_recompute", "blocked"):  # the forward twice
        lambda T, C, K, V: (2 * _local_linear_blocked(T, K, V, T * T / 2)
                            + _local_linear_backward(T, K, V, T * T / 2)),
}


def flops(op: str, form: str, T: int, d: int, heads: int, iterations: int | None = None
          ) -> float:
    """Forward FLOPs of one call with B = 1, `heads` heads, Dk = Dv = d (and the measured
    iteration count of an iterative form)."""
    extra = {} if iterations is None else {"n": iterations}
    return heads * FLOPS[(op, form)](T, min(CHUNK, T), d, d, **extra)

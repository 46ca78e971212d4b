"""Decoding steps of the ops whose step is the op itself on one token.

The op contract asks for a `*_step` per family (DESIGN.md). For the families below one token is
already the exact recurrence, so the step is a call of the op on a length-1 sequence with the
carried state, and nothing is written twice:

  kernel_regression_step            the KV cache grows by (k_t, v_t[, beta_t]); q_t solves
                                    the kernel system over all of it (Eq. 43, 45-47);
  local_linear_attention_step       the KV cache grows; q_t fits its local linear regression
                                    (Eq. 52-53; the op's recurrent form, the spec);
  local_polynomial_attention_step   the KV cache grows; q_t fits its local polynomial (Eq. 49);
  ttt_step                          one inner SGD step on (k_t, v_t), then q_t reads the model:
                                    TTT's mini-batch of one, exact online SGD (the recurrence
                                    its form="recurrent" runs with mini_batch=1);
  titans_step                       one momentum step with forgetting (Titans Eq. 13-14) at
                                    the current memory, then q_t reads it: the chunk_size = 1
                                    function, i.e. titans(..., form="recurrent").

Each takes q_t, k_t [B, H, Dk], v_t [B, H, Dv], the per-token parameters of the token ([B, H]
tensors, or floats where the op takes floats), and `state` as the op's initial_state (None
starts empty, or from the op's params); it returns (o_t [B, H, Dv], the new state). Bad input
is named by the step's own argument names (q_t, beta_t, state, ...).
"""

from __future__ import annotations

import torch

from ttr.ops.common import check_like, check_step_qkv
from ttr.ops.kernel import kernel_regression
from ttr.ops.local_linear import local_linear_attention
from ttr.ops.local_poly import local_polynomial_attention
from ttr.ops.nonlinear import ttt
from ttr.ops.titans import titans


def kernel_regression_step(q_t, k_t, v_t, beta_t=None, state=None, *, kernel="exp", degree=None,
                           ridge=None, solver="exact"):
    """`kernel_regression` for one token: beta_t None or [B, H] (the pair's sample weight);
    state None or the cache (K, V) / (K, V, beta) of `kernel_regression`'s initial_state."""
    return _one_token(kernel_regression, q_t, k_t, v_t, {"beta": beta_t}, state,
                      kernel=kernel, degree=degree, ridge=ridge, solver=solver,
                      form="recurrent")


def local_linear_attention_step(q_t, k_t, v_t, state=None, *, bandwidth=None, ridge=0.0):
    """`local_linear_attention` for one token (its recurrent form); state None or the cache
    (K [B, Tc, H, Dk], V [B, Tc, H, Dv]); returns (o_t [B, H, Dv], the cache with Tc + 1)."""
    return _one_token(local_linear_attention, q_t, k_t, v_t, {}, state, bandwidth=bandwidth,
                      ridge=ridge, form="recurrent")


def local_polynomial_attention_step(q_t, k_t, v_t, state=None, *, degree, bandwidth=None,
                                    ridge=0.0):
    """`local_polynomial_attention` for one token; state None or the cache (K, V)."""
    return _one_token(local_polynomial_attention, q_t, k_t, v_t, {}, state, degree=degree,
                      bandwidth=bandwidth, ridge=ridge)


def ttt_step(q_t, k_t, v_t, eta_t, params, state=None, *, model="linear"):
    """`ttt` for one token: eta_t [B, H] the step size; params as `ttt`'s (the initial fast
    weights and the LN affine); state None (start from params) or the fast weights."""
    if eta_t is None:  # as `ttt` says, but named as the step's argument
        raise ValueError("eta_t: TTT needs step sizes of shape [B, H], got None")
    return _one_token(ttt, q_t, k_t, v_t, {"eta": eta_t}, state, positional=("eta",),
                      params=params, model=model, mini_batch=1, form="recurrent")


def titans_step(q_t, k_t, v_t, lr_t, momentum_t, decay_t, params, state=None):
    """`titans` for one token: lr_t (theta), momentum_t (eta), decay_t (alpha) floats or [B, H]
    tensors in [0, 1]; state None (start from params, zero momentum) or the weights and
    momentum buffers {"W1".., "S1"..}."""
    gates = {"lr": lr_t, "momentum": momentum_t, "decay": decay_t}
    return _one_token(titans, q_t, k_t, v_t, gates, state,
                      positional=("lr", "momentum", "decay"), params=params, chunk_size=1,
                      form="recurrent")


def _one_token(op, q_t, k_t, v_t, per_token: dict, state, positional=(), **kw):
    """op(q_t, k_t, v_t as length-1 sequences, the per-token parameters [B, H] -> [B, 1, H],
    initial_state=state, output_final_state=True) -> (o_t [B, H, Dv], final state)."""
    B, H, _, _ = check_step_qkv(q_t, k_t, v_t)
    args = {}
    for name, x in per_token.items():
        if isinstance(x, torch.Tensor):
            check_like(f"{name}_t", x, q_t, (B, H), "[B, H]")
            x = x[:, None]  # [B, 1, H]
        args[name] = x
    head = [args.pop(name) for name in positional]
    try:
        o, s = op(q_t[:, None], k_t[:, None], v_t[:, None], *head, **args, **kw,
                  initial_state=state, output_final_state=True)
    except (TypeError, ValueError) as e:  # the op names its arguments; say the step's names
        msg = str(e)
        renames = {"initial_state": "state", **{n: f"{n}_t" for n in per_token}}
        for theirs, ours in renames.items():
            if msg.startswith((f"{theirs}:", f"{theirs}[")):
                raise type(e)(ours + msg[len(theirs):]) from e
        raise
    return o[:, 0], s

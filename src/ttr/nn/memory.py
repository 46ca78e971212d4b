"""How a Mixer calls its memory: one entry per op family, with the three things the layer needs
beyond the op itself.

    run(mixer, q, k, v, inputs, state, output_state, form) -> (o [B, T, H, Dv], state)
        the causal memory: y_t = m_t(q_t), m_t fitted to the pairs up to t (Eq. 8-9).
    read(mixer, q, k, v, inputs) -> o
        the non-causal memory: every query reads the regressor fitted to the whole sequence,
        y_t = m_T(q_t) (the framework covers it, Section 3; encoders need it). For parametric
        memories that is the final state read at every query; for nonparametric ones attention
        without the causal mask. None where it is not defined.
    floats(mixer, T) -> int
        the recurrent state per sequence in floats (zoology's "state size"); for a KV cache it
        grows with T.
    step_form: the op form used for one-token decoding (the recurrent spec, O(1) per token for
        parametric memories).

q and k arrive after the feature map (Dk = the feature dimension), v with the normalizer
column when the layer normalizes (Eq. 13).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from ttr import ops
from ttr.ops.rls import solve_spd
from ttr.recipe import FunctionClass, run


@dataclass(frozen=True)
class Memory:
    run: Callable
    read: Callable | None
    floats: Callable
    step_form: str | None = "recurrent"


MEMORIES: dict[str, Memory] = {}


def memory(name: str, **kw):
    def register(fn):
        MEMORIES[name] = Memory(run=fn, **kw)
        return fn
    return register


def _heads(m) -> tuple[int, int, int]:
    return m.config.n_heads, m.dk_features, m.dv_memory


# -- recipes: the ops ttr.recipe.run dispatches to ---------------------------------------------

def _read_recipe(m, q, k, v, inputs):
    name = m.recipe.op
    if name in ("softmax_attention", "local_linear_attention", "kernel_regression"):
        o, _ = _run_recipe(m, q, k, v, inputs, None, False, None, causal=False)
        return o
    _, s = _run_recipe(m, q, k, v, inputs, None, True, None)  # m_T: the whole sequence
    if name == "rls":
        Hkk, Hkv = s  # [B, H, Dk, Dk], [B, H, Dk, Dv]
        eye = torch.eye(Hkk.shape[-1], dtype=Hkk.dtype, device=Hkk.device)
        x = solve_spd(Hkk + m.recipe.optimizer.ridge * eye, q.transpose(1, 2).mT.to(Hkk.dtype))
        return (Hkv.mT @ x).mT.transpose(1, 2).to(q.dtype)  # [B, T, H, Dv]
    S = s[0] if name == "momentum_delta_rule" else s  # (S, velocity) for momentum
    return torch.einsum("bthk,bhkv->bthv", q, S.to(q.dtype))


def _recipe_floats(m, T):
    H, Dk, Dv = _heads(m)
    return {"linear_attention": H * Dk * Dv, "delta_rule": H * Dk * Dv,
            "delta_product": H * Dk * Dv, "momentum_delta_rule": 2 * H * Dk * Dv,
            "rls": H * (Dk * Dk + Dk * Dv)}.get(m.recipe.op, T * H * (Dk + Dv))


@memory("recipe", read=_read_recipe, floats=_recipe_floats)
def _run_recipe(m, q, k, v, inputs, state, output_state, form, causal=True):
    # The layer has already applied the feature map, so the op sees a plain linear class.
    recipe = m.recipe
    if recipe.function_class.kind == "features":
        recipe = replace(recipe, function_class=FunctionClass.linear())
    kw = {} if causal else {"causal": False}
    return run(recipe, q, k, v, g=inputs.get("g"), beta=inputs.get("beta"),
               initial_state=state, output_final_state=output_state, form=form, **kw)


# -- DeltaProduct: n_h distinct keys/values per token -------------------------------------------

def _read_state(m, q, k, v, inputs):
    _, s = m.memory.run(m, q, k, v, inputs, None, True, None)
    return torch.einsum("bthk,bhkv->bthv", q, s.to(q.dtype))


@memory("delta_product", read=_read_state,
        floats=lambda m, T: m.config.n_heads * m.dk_features * m.dv_memory)
def _run_delta_product(m, q, k, v, inputs, state, output_state, form):
    kw = {} if form is None else {"form": form}
    return ops.delta_product(q, k, v, inputs["beta"], inputs.get("g"), initial_state=state,
                             output_final_state=output_state, **kw)


# -- mLSTM: exponential input gate, normalizer and max-stabilizer -----------------------------

def _read_mlstm(m, q, k, v, inputs):
    _, (C, n, mx) = _run_mlstm(m, q, k, v, inputs, None, True, None)
    qs = q.to(C.dtype)  # h = C^T q / max(|n^T q|, exp(-m)), the stabilized Eq. 21 at t = T
    num = torch.einsum("bthk,bhkv->bthv", qs, C)
    den = torch.einsum("bthk,bhk->bth", qs, n).abs()
    return (num / torch.maximum(den, torch.exp(-mx)[:, None]).unsqueeze(-1)).to(q.dtype)


@memory("mlstm", read=_read_mlstm,
        floats=lambda m, T: m.config.n_heads * (m.dk_features * m.dv_memory + m.dk_features + 1))
def _run_mlstm(m, q, k, v, inputs, state, output_state, form):
    kw = {} if form is None else {"form": form}
    k = k * k.shape[-1] ** -0.5  # xLSTM scales keys by 1/sqrt(Dk)
    return ops.mlstm(q, k, v, inputs["i"], inputs["f"], initial_state=state,
                     output_final_state=output_state, **kw)


# -- RWKV-6: per-dimension decay and a bonus for the current token ----------------------------

@memory("rwkv6", read=None, floats=lambda m, T: m.config.n_heads * m.dk_features * m.dv_memory)
def _run_rwkv6(m, q, k, v, inputs, state, output_state, form):
    kw = {} if form is None else {"form": form}
    return ops.rwkv6(q, k, v, inputs["g"], inputs["u"], initial_state=state,
                     output_final_state=output_state, **kw)


# -- dot-product softmax attention (Eq. 1), the transformer's -----------------------------------

def _kv_floats(m, T):
    return T * m.config.n_heads * (m.dk_features + m.dv_memory)


def _read_softmax(m, q, k, v, inputs):
    return ops.softmax_attention(q, k, v, causal=False)[0]


@memory("softmax", read=_read_softmax, floats=_kv_floats)
def _run_softmax(m, q, k, v, inputs, state, output_state, form):
    kw = {} if form is None else {"form": form}
    return ops.softmax_attention(q, k, v, initial_state=state, output_final_state=output_state,
                                 **kw)

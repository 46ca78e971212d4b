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
        the recurrent state per sequence in floats (zoology's "state size") after T tokens; for
        a KV cache it grows with T (`grows(mixer)` says so).
    step_form(mixer) -> str: the op form used for one-token decoding (the recurrent spec, O(1)
        per token for parametric memories).

q and k arrive after the feature map (Dk = the feature dimension), v with the normalizer
column when the layer normalizes (Eq. 13).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ttr import ops
from ttr.ops.rls import solve_spd
from ttr.recipe import FunctionClass, run


@dataclass(frozen=True)
class Memory:
    run: Callable
    read: Callable | None
    floats: Callable
    step_form: Callable = lambda m: "recurrent"
    grows: Callable = lambda m: False


MEMORIES: dict[str, Memory] = {}


def memory(name: str, **kw):
    def register(fn):
        MEMORIES[name] = Memory(run=fn, **kw)
        return fn
    return register


def _heads(m) -> tuple[int, int, int]:
    return m.config.n_heads, m.dk_features, m.dv_memory


# -- recipes: the ops ttr.recipe.run dispatches to ---------------------------------------------

NO_NON_CAUSAL = ("kernel_regression", "local_polynomial_attention")  # not yet


def _read_recipe(m, q, k, v, inputs):
    name = m.recipe.op
    if name in ("softmax_attention", "local_linear_attention"):
        o, _ = _run_recipe(m, q, k, v, inputs, None, False, None, causal=False)
        return o
    _, s = _run_recipe(m, q, k, v, inputs, None, True, None)  # m_T: the whole sequence
    if name == "rls":
        Hkk, Hkv = s  # [B, H, Dk, Dk], [B, H, Dk, Dv]
        eye = torch.eye(Hkk.shape[-1], dtype=Hkk.dtype, device=Hkk.device)
        qs = q.to(Hkk.dtype).transpose(1, 2)  # [B, H, T, Dk]
        x = solve_spd(Hkk.unsqueeze(2) + m.recipe.optimizer.ridge * eye, qs)  # [B, H, T, Dk]
        return (x @ Hkv).transpose(1, 2).to(q.dtype)  # [B, T, H, Dv]
    S = s[0] if name == "momentum_delta_rule" else s  # (S, velocity) for momentum
    return torch.einsum("bthk,bhkv->bthv", q, S.to(q.dtype))


def _recipe_floats(m, T):
    H, Dk, Dv = _heads(m)
    return {"linear_attention": H * Dk * Dv, "delta_rule": H * Dk * Dv,
            "delta_product": H * Dk * Dv, "momentum_delta_rule": 2 * H * Dk * Dv,
            "rls": H * (Dk * Dk + Dk * Dv)}.get(m.recipe.op, T * H * (Dk + Dv))


@memory("recipe", read=_read_recipe, floats=_recipe_floats,
        grows=lambda m: m.recipe.op in ("softmax_attention", "local_linear_attention",
                                        "kernel_regression", "local_polynomial_attention"),
        step_form=lambda m: {"local_linear_attention": "naive",
                             "local_polynomial_attention": None}.get(m.recipe.op, "recurrent"))
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


@memory("softmax", read=_read_softmax, floats=_kv_floats, grows=lambda m: True)
def _run_softmax(m, q, k, v, inputs, state, output_state, form):
    kw = {} if form is None else {"form": form}
    return ops.softmax_attention(q, k, v, initial_state=state, output_final_state=output_state,
                                 **kw)


# -- MLP memories trained at test time: TTT and Titans ----------------------------------------
# Both compute mini-batch gradient descent: inside a block of b tokens every gradient is taken
# at the block's start weights. The ops restart blocks at every call, so the layer keeps its
# own block boundary: the state is the fast weights at the last boundary plus the r < b tokens
# since then ("pending"); the next call runs the op on pending + new tokens from that boundary
# and drops the outputs it already gave. Any split of a sequence, and token-by-token `step`,
# then equals one pass (decoding costs O(b) per token instead of O(1)).

BLOCK_INPUTS = {"ttt": ("eta",), "titans": ("lr", "momentum", "decay")}


def _fast_floats(m, T):
    """Floats of the fast weights (and Titans' momentum buffers) plus the pending tokens."""
    params = m.gates[0].params
    weights = sum(p.numel() for name, p in params.items() if not name.startswith("ln_"))
    per_token = m.config.n_heads * (m.dk_features + m.dv_memory + len(BLOCK_INPUTS[m.memory_name]))
    block = m.gates[0].block
    return weights * (2 if m.memory_name == "titans" else 1) + (T % block) * per_token


def _initial_fast(m, name, params, B):
    """The op's `initial_state=None` made explicit: params broadcast over B (+ zero momentum)."""
    if name == "ttt":
        return {n: p.expand(B, *p.shape).clone() for n, p in params.items()
                if not n.startswith("ln_")}
    ws = {n: p.expand(B, *p.shape).clone() for n, p in params.items()}
    return {**ws, **{"S" + n[1:]: torch.zeros_like(w) for n, w in ws.items()}}


def _call(m, name, q, k, v, inputs, fast, output_state, form):
    kw = {} if form is None else {"form": form}
    per = {n: inputs[n] for n in BLOCK_INPUTS[name]}
    if name == "ttt":
        return ops.ttt(q, k, v, per["eta"], inputs["params"], model=m.gates[0].model,
                       mini_batch=m.gates[0].block, initial_state=fast,
                       output_final_state=output_state, **kw)
    return ops.titans(q, k, v, per["lr"], per["momentum"], per["decay"], inputs["params"],
                      chunk_size=m.gates[0].block, initial_state=fast,
                      output_final_state=output_state, **kw)


def _run_blocks(name, m, q, k, v, inputs, state, output_state, form):
    fast, pend = (None, None) if state is None else (state["fast"], state["pending"])
    r = 0 if pend is None else pend["k"].shape[1]
    seq = {"k": k, "v": v, **{n: inputs[n] for n in BLOCK_INPUTS[name]}}
    if r:  # replay the tokens since the last boundary (their queries are not read again)
        seq = {n: torch.cat([pend[n].to(x.dtype), x], 1) for n, x in seq.items()}
        q = torch.cat([q.new_zeros(q.shape[0], r, *q.shape[2:]), q], 1)
    L = q.shape[1]
    A = L - L % m.gates[0].block  # the last boundary inside this call
    rest = {n: x for n, x in inputs.items() if n not in seq}
    outs = []
    if A:
        o, fast = _call(m, name, q[:, :A], seq["k"][:, :A], seq["v"][:, :A],
                        {**rest, **{n: x[:, :A] for n, x in seq.items()}}, fast, True, form)
        outs.append(o)
    if L > A:
        o, _ = _call(m, name, q[:, A:], seq["k"][:, A:], seq["v"][:, A:],
                     {**rest, **{n: x[:, A:] for n, x in seq.items()}}, fast, False, form)
        outs.append(o)
    o = torch.cat(outs, 1)[:, r:]
    if not output_state:
        return o, None
    if fast is None:
        fast = _initial_fast(m, name, inputs["params"], q.shape[0])
    pending = {n: x[:, A:] for n, x in seq.items()} if L > A else None
    return o, {"fast": fast, "pending": pending}


def _read_fast(name):
    def read(m, q, k, v, inputs):
        _, s = m.memory.run(m, q, k, v, inputs, None, True, None)
        # the whole sequence, the last partial block included: one more call with nothing new
        fast = s["fast"]
        if s["pending"] is not None:
            p = s["pending"]
            _, fast = _call(m, name, q[:, :p["k"].shape[1]], p["k"], p["v"],
                            {**inputs, **{n: p[n] for n in BLOCK_INPUTS[name]}}, fast, True,
                            None)
        if name == "titans":
            from ttr.ops.titans import _memory

            Ws = [fast[f"W{i}"] for i in range(1, len(fast) // 2 + 1)]
            return _memory(Ws, q.transpose(1, 2).to(Ws[0].dtype)).transpose(1, 2).to(q.dtype)
        return _ttt_apply(fast, q, inputs["params"], m.gates[0].model)
    return read


def _ttt_apply(w, q, params, model):
    """f_W(q) = q + LN(g_W(q)) for all queries q [B, T, H, D] with fast weights w [B, H, ...]."""
    from ttr.ops.nonlinear import _ln

    x = q.to(next(iter(w.values())).dtype)
    if model == "linear":
        g = torch.einsum("bthi,bhij->bthj", x, w["W"]) + w["b"][:, None]
    else:
        h = F.gelu(torch.einsum("bthi,bhij->bthj", x, w["W1"]) + w["b1"][:, None],
                   approximate="tanh")
        g = torch.einsum("bthi,bhij->bthj", h, w["W2"]) + w["b2"][:, None]
    return (x + _ln(g, (params["ln_weight"], params["ln_bias"]))).to(q.dtype)


MEMORIES["ttt"] = Memory(lambda *a: _run_blocks("ttt", *a), _read_fast("ttt"), _fast_floats)
MEMORIES["titans"] = Memory(lambda *a: _run_blocks("titans", *a), _read_fast("titans"),
                            _fast_floats, step_form=lambda m: "chunk_recurrent")

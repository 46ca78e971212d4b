"""The sequence-mixing layer built from a recipe: project x to queries, keys and values, let
the recipe's test-time regressor memorize (k_i, v_i) (Eq. 8) and answer q_t (Eq. 9).

    x [B, T, d_model]
      -> q, k, v = W_Q x, W_K x, W_V x, each optionally through a short conv (Eq. 56)
      -> per head: q, k [B, T, H, Dk], v [B, T, H, Dv]; optional unit-norm q, k (QKNorm,
         the preprocessing that makes softmax a local-constant regressor, Eq. 51)
      -> per-token gates the recipe reads (`Recipe.needs()`):
           geometric weights   g = logsigmoid(W_g x)  [B, T, H], or [B, T, H, Dk] per key dim
                               (decay gamma_t = exp(g_t) in (0, 1), Eq. 14-16)
           sgd, constant step  beta = sigmoid(W_b x)  [B, T, H]   (DeltaNet, Eq. 29)
           sgd, Longhorn       delta = softplus(W_b x) [B, T, H]  (Eq. 31)
      -> o = ttr.recipe.run(recipe, q, k, v, g, beta)  [B, T, H, Dv]  (feature maps applied there)
      -> optional RMSNorm per head (output normalization, which restores the self-normalization
         linear attention loses, Eq. 13) -> W_O -> y [B, T, d_model]

The state carried between calls is a `MixerState`: the short-conv caches and the op's state
(S for linear memories, (H_kk, H_kv) for RLS, the KV cache for softmax), so that a forward
pass over a sequence split in two, with the state carried, equals one pass over the whole.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ttr.nn.conv import ShortConv
from ttr.recipe import Recipe, run


def _int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"MixerConfig.{name}: expected an int >= {low}, got {value!r}")


@dataclass(frozen=True)
class MixerConfig:
    """Sizes and switches of a `Mixer`. `d_key`/`d_value` are per head (default
    d_model // n_heads); `conv_q/k/v` are short-conv lengths (0 = no conv); `form` picks the
    op's algorithm (None = the op's default; e.g. "recurrent", "parallel", "chunk")."""

    d_model: int
    n_heads: int = 1
    d_key: int | None = None
    d_value: int | None = None
    conv_q: int = 0
    conv_k: int = 0
    conv_v: int = 0
    qk_norm: bool = False
    output_norm: bool = False
    bias: bool = False
    form: str | None = None

    def __post_init__(self):
        _int("d_model", self.d_model, 1)
        _int("n_heads", self.n_heads, 1)
        for name in ("d_key", "d_value"):
            val = getattr(self, name)
            if val is None:
                if self.d_model % self.n_heads:
                    raise ValueError(f"MixerConfig.{name}: the default d_model // n_heads needs "
                                     f"n_heads to divide d_model, got d_model={self.d_model}, "
                                     f"n_heads={self.n_heads}; set {name} explicitly")
            else:
                _int(name, val, 1)
        for name in ("conv_q", "conv_k", "conv_v"):
            _int(name, getattr(self, name), 0)
        for name in ("qk_norm", "output_norm", "bias"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"MixerConfig.{name}: expected a bool, got "
                                f"{getattr(self, name)!r}")
        if self.form is not None and not isinstance(self.form, str):
            raise TypeError(f"MixerConfig.form: expected None or a str, got {self.form!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MixerConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"MixerConfig: unknown keys {unknown}; expected some of "
                             f"{sorted(known)}")
        return cls(**d)

    @property
    def dk(self) -> int:
        return self.d_key if self.d_key is not None else self.d_model // self.n_heads

    @property
    def dv(self) -> int:
        return self.d_value if self.d_value is not None else self.d_model // self.n_heads


class MixerState(NamedTuple):
    """What a `Mixer` carries from one call to the next; None entries are absent pieces."""

    conv_q: torch.Tensor | None  # [B, conv_q - 1, H * Dk]
    conv_k: torch.Tensor | None  # [B, conv_k - 1, H * Dk]
    conv_v: torch.Tensor | None  # [B, conv_v - 1, H * Dv]
    op: Any  # the op's final state (tensor or tuple of tensors)


class Mixer(nn.Module):
    """A test-time regression layer: `Mixer(recipe, config)(x, state) -> (y, state)`."""

    def __init__(self, recipe: Recipe, config: MixerConfig):
        super().__init__()
        if not isinstance(recipe, Recipe):
            raise TypeError(f"recipe: expected a ttr.Recipe, got {type(recipe).__name__}")
        if not isinstance(config, MixerConfig):
            raise TypeError(f"config: expected a MixerConfig, got {type(config).__name__}")
        if recipe.op is None:
            raise ValueError(f"recipe: no op in ttr.ops computes {recipe} yet")
        self.recipe, self.config = recipe, config
        c, H, Dk, Dv = config, config.n_heads, config.dk, config.dv
        self.q_proj = nn.Linear(c.d_model, H * Dk, bias=c.bias)
        self.k_proj = nn.Linear(c.d_model, H * Dk, bias=c.bias)
        self.v_proj = nn.Linear(c.d_model, H * Dv, bias=c.bias)
        self.q_conv = ShortConv(H * Dk, c.conv_q) if c.conv_q else None
        self.k_conv = ShortConv(H * Dk, c.conv_k) if c.conv_k else None
        self.v_conv = ShortConv(H * Dv, c.conv_v) if c.conv_v else None
        need = recipe.needs()
        per_dim = recipe.weights.granularity == "dim"
        # Gates keep a bias whatever config.bias says: it sets the resting decay / step size.
        self.g_proj = nn.Linear(c.d_model, H * Dk if per_dim else H) if need["g"] else None
        self.b_proj = nn.Linear(c.d_model, H) if need["beta"] else None
        self.out_norm = nn.RMSNorm(Dv) if c.output_norm else None
        self.o_proj = nn.Linear(H * Dv, c.d_model, bias=c.bias)

    def forward(self, x: torch.Tensor, state: MixerState | None = None, *,
                output_state: bool = True):
        """x `[B, T, d_model]` -> (y `[B, T, d_model]`, MixerState or None if not
        `output_state`). `state` continues from a previous call on the same sequences."""
        c = self.config
        if x.ndim != 3 or x.shape[-1] != c.d_model:
            raise ValueError(f"x: expected shape [B, T, d_model={c.d_model}], "
                             f"got {tuple(x.shape)}")
        if state is not None and not isinstance(state, MixerState):
            raise TypeError(f"state: expected a MixerState or None, got {type(state).__name__}")
        B, T, _ = x.shape
        H, Dk, Dv = c.n_heads, c.dk, c.dv
        st = state if state is not None else MixerState(None, None, None, None)
        q, cq = _conv(self.q_conv, self.q_proj(x), st.conv_q)
        k, ck = _conv(self.k_conv, self.k_proj(x), st.conv_k)
        v, cv = _conv(self.v_conv, self.v_proj(x), st.conv_v)
        q, k, v = q.view(B, T, H, Dk), k.view(B, T, H, Dk), v.view(B, T, H, Dv)
        if c.qk_norm:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        g = beta = None
        if self.g_proj is not None:
            g = F.logsigmoid(self.g_proj(x))  # [B, T, H] or [B, T, H * Dk]
            if self.recipe.weights.granularity == "dim":
                g = g.view(B, T, H, Dk)
        if self.b_proj is not None:
            raw = self.b_proj(x)  # [B, T, H]
            longhorn = self.recipe.optimizer.step_size == "longhorn"
            beta = F.softplus(raw) if longhorn else torch.sigmoid(raw)
        o, s = run(self.recipe, q, k, v, g=g, beta=beta, initial_state=st.op,
                   output_final_state=output_state, form=c.form)  # o [B, T, H, Dv]
        if self.out_norm is not None:
            o = self.out_norm(o)
        y = self.o_proj(o.reshape(B, T, H * Dv))  # [B, T, d_model]
        return y, (MixerState(cq, ck, cv, s) if output_state else None)

    def extra_repr(self) -> str:
        return f"recipe={self.recipe}"


def _conv(conv: ShortConv | None, x: torch.Tensor, cache):
    if conv is None:
        return x, None
    return conv(x, cache)

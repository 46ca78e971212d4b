"""The sequence-mixing layer built from a recipe: project x to queries, keys and values, let
the recipe's test-time regressor memorize (k_i, v_i) (Eq. 8) and answer q_t (Eq. 9).

    x [B, T, d_model]
      -> q = W_Q x [B, T, H, Dk];  k, v = W_K x, W_V x with H_kv heads (GQA: each group of
         H / H_kv query heads shares a key/value head), n keys/values per token for
         DeltaProduct; each optionally through a short causal conv (Eq. 56)
      -> optional unit-norm q, k (QKNorm, the preprocessing that makes softmax a
         local-constant regressor, Eq. 51)
      -> gates (ttr.nn.gates): the architecture's per-token weights and step sizes (g, beta,
         ...), e.g. logsigmoid(W_g x) for GLA, Mamba-2's exp(Delta A), DeltaNet's sigmoid beta
      -> feature map phi on q, k (Eq. 3), optional normalizer column of ones on v (Eq. 13)
      -> the memory (ttr.nn.memory): o = m_t(q_t) [B, T, H, Dv]; non-causal: m_T(q_t)
      -> normalizer division, per-head RMS/LayerNorm, output gate act(W_z x), skip D v,
         W_O -> y [B, T, d_model]

Built from a catalogue name with `ttr.catalog.get`, or from any recipe: `Mixer(recipe,
MixerConfig(...))` derives default gates from the recipe (logsigmoid decay, sigmoid or
softplus step). The state carried between calls is a `MixerState`: the conv caches, the op's
state (S for linear memories, (H_kk, H_kv) for RLS, the KV cache for attention) and the
position, so that a pass over a sequence split in two, with the state carried, equals one pass
over the whole, and `step` decodes one token at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ttr.configs import from_dict
from ttr.nn.conv import ShortConv
from ttr.nn.feature_map import FeatureMap
from ttr.nn.gates import SigmoidDecay, StepSize
from ttr.nn.memory import MEMORIES, NO_NON_CAUSAL
from ttr.nn.rope import rotary
from ttr.recipe import Recipe

NORMS = (None, "rms", "layer")
GATES = (None, "silu", "sigmoid")


def _int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"MixerConfig.{name}: expected an int >= {low}, got {value!r}")


@dataclass(frozen=True)
class MixerConfig:
    """Sizes and switches of a `Mixer`.

    d_key/d_value: per head (default d_model // n_heads). n_kv_heads: key/value heads (GQA;
    default n_heads, must divide it). keys_per_token: DeltaProduct's n_h. conv_q/k/v: short-conv
    lengths (0 = none), conv_silu: SiLU after the convs (Mamba-2, DeltaNet). qk_norm: unit-norm
    q, k. feature_map: phi by name (ttr.ops.features; None = the recipe's). normalize: divide by
    z^T phi(q), z = the memory of ones (linear attention's normalizer, Eq. 13). output_norm:
    None, "rms" or "layer" per head. output_gate: None, "silu" or "sigmoid" of a projection of
    x. skip: Mamba-2's D v_t term. form: the op's algorithm (None = its default). causal=False:
    every query reads the memory of the whole sequence. rope: the base of rotary position
    embeddings on q and k (`ttr.nn.rope`, e.g. 10000.0; None = none), applied after the gates
    and before the feature map.
    """

    d_model: int
    n_heads: int = 1
    d_key: int | None = None
    d_value: int | None = None
    n_kv_heads: int | None = None
    keys_per_token: int = 1
    conv_q: int = 0
    conv_k: int = 0
    conv_v: int = 0
    conv_silu: bool = False
    qk_norm: bool = False
    feature_map: str | None = None
    normalize: bool = False
    output_norm: str | None = None
    output_gate: str | None = None
    skip: bool = False
    bias: bool = False
    form: str | None = None
    causal: bool = True
    rope: float | None = None

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
        if self.n_kv_heads is not None:
            _int("n_kv_heads", self.n_kv_heads, 1)
            if self.n_heads % self.n_kv_heads:
                raise ValueError(f"MixerConfig.n_kv_heads: expected a divisor of n_heads="
                                 f"{self.n_heads}, got {self.n_kv_heads}")
        _int("keys_per_token", self.keys_per_token, 1)
        for name in ("conv_q", "conv_k", "conv_v"):
            _int(name, getattr(self, name), 0)
        for name in ("conv_silu", "qk_norm", "normalize", "skip", "bias", "causal"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"MixerConfig.{name}: expected a bool, got "
                                f"{getattr(self, name)!r}")
        for name, allowed in (("output_norm", NORMS), ("output_gate", GATES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"MixerConfig.{name}: expected one of {list(allowed)}, got "
                                 f"{getattr(self, name)!r}")
        if self.rope is not None:
            if isinstance(self.rope, bool) or not isinstance(self.rope, (int, float)) \
                    or not self.rope > 1:
                raise ValueError(f"MixerConfig.rope: expected None or a base > 1 (e.g. 10000.0), "
                                 f"got {self.rope!r}")
            if self.dk % 2:
                raise ValueError(f"MixerConfig.rope: rotary embeddings rotate pairs of key "
                                 f"coordinates; expected an even d_key, got {self.dk}")
        for name in ("feature_map", "form"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise TypeError(f"MixerConfig.{name}: expected None or a str, got "
                                f"{getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MixerConfig:
        return from_dict(cls, d)

    @property
    def dk(self) -> int:
        return self.d_key if self.d_key is not None else self.d_model // self.n_heads

    @property
    def dv(self) -> int:
        return self.d_value if self.d_value is not None else self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads


class MixerState(NamedTuple):
    """What a `Mixer` carries from one call to the next; None entries are absent pieces."""

    conv_q: torch.Tensor | None  # [B, conv_q - 1, H * Dk]
    conv_k: torch.Tensor | None  # [B, conv_k - 1, H_kv * n * Dk]
    conv_v: torch.Tensor | None  # [B, conv_v - 1, H_kv * n * Dv]
    op: Any  # the op's final state (tensor, tuple or dict of tensors)
    position: int = 0  # tokens seen so far (position-dependent feature maps: cosFormer)


def default_gates(recipe: Recipe, config: MixerConfig) -> tuple[nn.Module, ...]:
    """The gates a bare recipe reads: g = logsigmoid(W_g x) per head or per key dimension
    (decay gamma_t = exp(g_t), Eq. 14-16); beta = sigmoid(W_b x) (constant step rule, Eq. 29)
    or delta = softplus(W_b x) (Longhorn, Eq. 31). Gates keep a bias whatever config.bias says:
    it sets the resting decay / step size."""
    need, c = recipe.needs(), config
    gates: list[nn.Module] = []
    if need["g"]:
        per_dim = recipe.weights.granularity == "dim"
        gates.append(SigmoidDecay(c.d_model, c.n_heads, c.dk if per_dim else None))
    if need["beta"]:
        kind = "softplus" if recipe.optimizer.step_size == "longhorn" else "sigmoid"
        gates.append(StepSize(c.d_model, c.n_heads, kind=kind))
    return tuple(gates)


class Mixer(nn.Module):
    """A test-time regression layer: `Mixer(recipe, config)(x, state) -> (y, state)`.

    `gates` (default: from the recipe) and `memory` (a key of ttr.nn.memory.MEMORIES; default
    "recipe": the op `recipe.op` names) let a catalogue entry parameterize the recipe the way
    its own paper does.
    """

    def __init__(self, recipe: Recipe, config: MixerConfig, *,
                 gates: tuple[nn.Module, ...] | None = None, memory: str = "recipe",
                 feature_options: dict | None = None):
        super().__init__()
        if not isinstance(recipe, Recipe):
            raise TypeError(f"recipe: expected a ttr.Recipe, got {type(recipe).__name__}")
        if not isinstance(config, MixerConfig):
            raise TypeError(f"config: expected a MixerConfig, got {type(config).__name__}")
        if memory not in MEMORIES:
            raise ValueError(f"memory: expected one of {sorted(MEMORIES)}, got {memory!r}")
        if memory == "recipe" and recipe.op is None:
            raise ValueError(f"recipe: no op in ttr.ops computes {recipe} yet")
        self.recipe, self.config, self.memory_name = recipe, config, memory
        self.memory = MEMORIES[memory]
        self.supports_non_causal = self.memory.read is not None and not (
            memory == "recipe" and recipe.op in NO_NON_CAUSAL)
        if not config.causal and not self.supports_non_causal:
            raise ValueError(f"MixerConfig.causal: the {memory!r} memory ({recipe.op}) has no "
                             "non-causal form (RWKV-6: its output at t weights the token at t "
                             "itself; kernel and local-polynomial ops: not yet)")
        c, H, Hkv, n, Dk, Dv = (config, config.n_heads, config.kv_heads, config.keys_per_token,
                                config.dk, config.dv)
        gates = default_gates(recipe, c) if gates is None else gates
        keyless = any(getattr(gate, "replaces_key", False) for gate in gates)
        if keyless and c.conv_k:
            raise ValueError(f"MixerConfig.conv_k: this layer's key comes from a gate "
                             f"({type(gates[0]).__name__}), not a projection; expected 0, got "
                             f"{c.conv_k}")
        self.q_proj = nn.Linear(c.d_model, H * Dk, bias=c.bias)
        self.k_proj = None if keyless else nn.Linear(c.d_model, Hkv * n * Dk, bias=c.bias)
        self.v_proj = nn.Linear(c.d_model, Hkv * n * Dv, bias=c.bias)
        self.q_conv = ShortConv(H * Dk, c.conv_q) if c.conv_q else None
        self.k_conv = ShortConv(Hkv * n * Dk, c.conv_k) if c.conv_k else None
        self.v_conv = ShortConv(Hkv * n * Dv, c.conv_v) if c.conv_v else None
        self.gates = nn.ModuleList(gates)
        fmap = c.feature_map or recipe.function_class.feature_map
        self.feature = (FeatureMap(fmap, Dk, **(feature_options or {}))
                        if fmap is not None else None)
        self.dk_features = self.feature.out_dim if self.feature is not None else Dk
        self.dv_memory = Dv + int(c.normalize)  # the memory of ones rides along as a column
        if c.normalize and (memory, recipe.op) != ("recipe", "linear_attention"):
            raise ValueError("MixerConfig.normalize: the normalizer z^T phi(q) (Eq. 13) is "
                             "defined for one-step GD (linear attention) memories, got "
                             f"op {recipe.op if memory == 'recipe' else memory!r}")
        norm = {"rms": nn.RMSNorm, "layer": nn.LayerNorm}.get(c.output_norm)
        self.out_norm = norm(Dv) if norm is not None else None
        self.z_proj = nn.Linear(c.d_model, H * Dv, bias=c.bias) if c.output_gate else None
        self.D = nn.Parameter(torch.ones(H)) if c.skip else None
        self.o_proj = nn.Linear(H * Dv, c.d_model, bias=c.bias)

    # -- the pipeline --------------------------------------------------------------------------

    def memory_inputs(self, x: torch.Tensor, state: MixerState | None = None):
        """Everything up to the memory: (q, k, v, inputs, conv caches, v before the gates).
        Exposed so that tests can run a published recurrence on exactly what the op sees."""
        c = self.config
        if x.ndim != 3 or x.shape[-1] != c.d_model:
            raise ValueError(f"x: expected shape [B, T, d_model={c.d_model}], "
                             f"got {tuple(x.shape)}")
        if state is not None and not isinstance(state, MixerState):
            raise TypeError(f"state: expected a MixerState or None, got {type(state).__name__}")
        st = state if state is not None else MixerState(None, None, None, None)
        B, T, _ = x.shape
        H, Hkv, n, Dk, Dv = c.n_heads, c.kv_heads, c.keys_per_token, c.dk, c.dv
        q, cq = self._conv(self.q_conv, self.q_proj(x), st.conv_q)
        k, ck = None, None
        if self.k_proj is not None:  # None: a gate makes the key (HGRN-2's k = 1 - f)
            k, ck = self._conv(self.k_conv, self.k_proj(x), st.conv_k)
        v, cv = self._conv(self.v_conv, self.v_proj(x), st.conv_v)
        q = q.view(B, T, H, Dk)
        kv_shape = (B, T, Hkv, n) if n > 1 else (B, T, Hkv)
        v = v.view(*kv_shape, Dv)
        k = k.view(*kv_shape, Dk) if k is not None else None
        if Hkv != H:  # GQA: query heads h*r .. h*r + r - 1 read key/value head h
            v = v.repeat_interleave(H // Hkv, dim=2)
            k = k.repeat_interleave(H // Hkv, dim=2) if k is not None else None
        if c.qk_norm:
            q = F.normalize(q, dim=-1)
            k = F.normalize(k, dim=-1) if k is not None else None
        v_in = v
        inputs: dict[str, Any] = {}
        for gate in self.gates:
            q, k, v, inputs = gate(x, q, k, v, inputs)
        if c.rope is not None:  # relative positions for the memory's comparisons of q with k
            q = rotary(q, st.position, c.rope)
            k = rotary(k, st.position, c.rope) if k is not None else None
        if self.feature is not None:
            q, k = self.feature(q, st.position), self.feature(k, st.position)
        if c.normalize:
            v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # [B, T, H, Dv + 1]
        return q, k, v, inputs, (cq, ck, cv), v_in

    def forward(self, x: torch.Tensor, state: MixerState | None = None, *,
                output_state: bool = True, form: str | None = None):
        """x `[B, T, d_model]` -> (y `[B, T, d_model]`, MixerState or None if not
        `output_state`). `state` continues from a previous call on the same sequences; `form`
        overrides config.form for this call."""
        c = self.config
        if not c.causal and state is not None:
            raise ValueError("state: a non-causal Mixer reads the whole sequence at once and "
                             "carries no state; expected None")
        q, k, v, inputs, caches, v_in = self.memory_inputs(x, state)
        form = form or c.form
        if c.causal:
            o, s = self.memory.run(self, q, k, v, inputs, None if state is None else state.op,
                                   output_state, form)  # [B, T, H, Dv(+1)]
        else:
            o, s, output_state = self.memory.read(self, q, k, v, inputs), None, False
        y = self.output(x, o, v_in)
        if not output_state:
            return y, None
        pos = (0 if state is None else state.position) + x.shape[1]
        return y, MixerState(*caches, s, pos)

    def output(self, x: torch.Tensor, o: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The memory's answer o `[B, T, H, Dv(+1)]` -> y `[B, T, d_model]`."""
        c = self.config
        B, T = x.shape[:2]
        if c.normalize:  # Eq. 13: divide by z^T phi(q); eps only guards an all-zero prefix
            o = o[..., :-1] / (o[..., -1:] + 1e-6)
        if self.out_norm is not None:
            o = self.out_norm(o)
        if self.z_proj is not None:
            z = self.z_proj(x).view_as(o)
            o = o * (F.silu(z) if c.output_gate == "silu" else torch.sigmoid(z))
        if self.D is not None:
            o = o + self.D[:, None].to(o.dtype) * v.reshape(o.shape)
        return self.o_proj(o.reshape(B, T, -1))  # [B, T, d_model]

    def _conv(self, conv: ShortConv | None, x: torch.Tensor, cache):
        if conv is None:
            return x, None
        y, cache = conv(x, cache)
        return (F.silu(y) if self.config.conv_silu else y), cache

    # -- decoding and state ------------------------------------------------------------------

    def init_state(self, batch: int) -> MixerState:
        """The state before the first token: empty conv caches and memory (op state None is the
        op's zero state; a KV cache starts empty)."""
        c = self.config
        p = self.q_proj.weight

        def cache(conv):
            return None if conv is None else p.new_zeros(batch, conv.kernel_size - 1,
                                                          conv.channels)

        return MixerState(cache(self.q_conv), cache(self.k_conv), cache(self.v_conv), None, 0) \
            if c.causal else _no_state()

    def step(self, x_t: torch.Tensor, state: MixerState | None = None):
        """One token: x_t `[B, d_model]` -> (y_t `[B, d_model]`, state), with the op's
        step form (O(1) work per token for parametric memories)."""
        if x_t.ndim != 2:
            raise ValueError(f"x_t: expected shape [B, d_model={self.config.d_model}], got "
                             f"{tuple(x_t.shape)}")
        if not self.config.causal:
            _no_state()
        y, state = self(x_t[:, None], state, form=self.memory.step_form(self))
        return y[:, 0], state

    def state_size(self, seq_len: int | None = None) -> int:
        """Floats of recurrent state per sequence after seq_len tokens: the memory plus the conv
        caches, as zoology counts it. A KV cache grows with seq_len (required then); TTT and
        Titans add the up to b - 1 tokens since their last mini-batch boundary (0 if None)."""
        if self.memory.grows(self) and seq_len is None:
            raise ValueError("seq_len: the state of this memory is a KV cache that grows with "
                             "the sequence; expected the sequence length, got None")
        convs = sum((m.kernel_size - 1) * m.channels
                    for m in (self.q_conv, self.k_conv, self.v_conv) if m is not None)
        return convs + self.memory.floats(self, seq_len or 0)

    def extra_repr(self) -> str:
        return f"recipe={self.recipe}, memory={self.memory_name!r}"


def _no_state():
    raise ValueError("causal: a non-causal Mixer reads the whole sequence at once; it has no "
                     "recurrent state and no step()")

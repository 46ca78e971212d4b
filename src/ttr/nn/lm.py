"""A causal language model built from catalogue entries: embedding -> pre-norm blocks
(RMSNorm -> mixer -> residual, RMSNorm -> gated MLP -> residual) -> RMSNorm -> readout.

The per-layer `pattern` names one catalogue entry per layer, so a hybrid (three Gated DeltaNet
layers then one softmax layer) is one config field:

    >>> cfg = LMConfig(vocab_size=256, d_model=128, n_layers=4, n_heads=4,
    ...                pattern=("gated_deltanet",) * 3 + ("softmax_attention",))
    >>> model = LM(cfg)
    >>> logits, states = model(ids)                  # ids [B, T] -> [B, T, V], one state/layer
    >>> logits_t, states = model.step(ids[:, -1], states)   # one token per call (decoding)

Plain nn.Module; the transformers wrapper (ttr.hf) and the training loop (ttr.train) build on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ttr.configs import from_dict
from ttr.nn.mixer import MixerState


def _pos_int(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"LMConfig.{name}: expected an int >= 1, got {v!r}")


@dataclass(frozen=True)
class LMConfig:
    """vocab_size, d_model, n_layers, n_heads; `pattern`: one catalogue name per layer, or one
    name for all; `mixer_overrides`: extra keyword arguments for `ttr.catalog.get` (MixerConfig
    fields or entry options), shared by all layers; mlp_ratio: hidden width of the gated MLP
    (SwiGLU) over d_model; tie_embeddings: readout weight = embedding weight."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int = 1
    pattern: tuple[str, ...] = ("gated_deltanet",)
    mixer_overrides: dict = field(default_factory=dict)
    mlp_ratio: float = 8 / 3
    tie_embeddings: bool = True

    def __post_init__(self):
        from ttr import catalog

        for name in ("vocab_size", "d_model", "n_layers", "n_heads"):
            _pos_int(name, getattr(self, name))
        pattern = (self.pattern,) if isinstance(self.pattern, str) else tuple(self.pattern)
        if len(pattern) not in (1, self.n_layers):
            raise ValueError(f"LMConfig.pattern: expected one name or n_layers={self.n_layers} "
                             f"names, got {len(pattern)}")
        for name in pattern:
            if name not in catalog.CATALOG:
                raise ValueError(f"LMConfig.pattern: {name!r} is not a catalogue entry; "
                                 f"expected one of {catalog.names()}")
        object.__setattr__(self, "pattern", pattern)
        if not isinstance(self.mixer_overrides, dict):
            raise TypeError(f"LMConfig.mixer_overrides: expected a dict, got "
                            f"{type(self.mixer_overrides).__name__}")
        if not (isinstance(self.mlp_ratio, (int, float)) and self.mlp_ratio > 0):
            raise ValueError(f"LMConfig.mlp_ratio: expected a number > 0, got {self.mlp_ratio!r}")
        if not isinstance(self.tie_embeddings, bool):
            raise TypeError(f"LMConfig.tie_embeddings: expected a bool, got "
                            f"{self.tie_embeddings!r}")

    def layer_names(self) -> tuple[str, ...]:
        return self.pattern * self.n_layers if len(self.pattern) == 1 else self.pattern

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LMConfig:
        return from_dict(cls, d)


class GatedMLP(nn.Module):
    """SwiGLU: W_down (silu(W_gate x) * W_up x), hidden = mlp_ratio * d_model rounded to 8."""

    def __init__(self, d_model: int, ratio: float):
        super().__init__()
        hidden = max(8, int(round(ratio * d_model / 8)) * 8)
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, name: str, config: LMConfig):
        super().__init__()
        from ttr import catalog

        self.name = name
        self.mixer_norm = nn.RMSNorm(config.d_model)
        self.mixer = catalog.get(name, d_model=config.d_model, n_heads=config.n_heads,
                                 **config.mixer_overrides)
        self.mlp_norm = nn.RMSNorm(config.d_model)
        self.mlp = GatedMLP(config.d_model, config.mlp_ratio)

    def forward(self, x, state=None, output_state=True, form=None):
        y, state = self.mixer(self.mixer_norm(x), state, output_state=output_state, form=form)
        x = x + y
        return x + self.mlp(self.mlp_norm(x)), state


class LM(nn.Module):
    """`LM(config)(ids, states=None) -> (logits [B, T, V], states)`; `step` decodes a token."""

    def __init__(self, config: LMConfig):
        super().__init__()
        if not isinstance(config, LMConfig):
            raise TypeError(f"config: expected an LMConfig, got {type(config).__name__}")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(n, config) for n in config.layer_names())
        self.norm = nn.RMSNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=0.02)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor, states: list[MixerState] | None = None, *,
                output_states: bool = False, form: str | None = None):
        if ids.ndim != 2 or ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"ids: expected an integer tensor [B, T], got {ids.dtype} "
                             f"{tuple(ids.shape)}")
        if states is not None and len(states) != len(self.blocks):
            raise ValueError(f"states: expected one state per layer ({len(self.blocks)}), got "
                             f"{len(states)}")
        x = self.embed(ids)  # [B, T, d_model]
        new = []
        for i, block in enumerate(self.blocks):
            x, s = block(x, None if states is None else states[i],
                         output_state=output_states or states is not None, form=form)
            new.append(s)
        logits = self.head(self.norm(x))  # [B, T, V]
        return logits, (new if output_states or states is not None else None)

    def init_states(self, batch: int) -> list[MixerState]:
        return [b.mixer.init_state(batch) for b in self.blocks]

    def step(self, ids_t: torch.Tensor, states: list[MixerState]):
        """One token per sequence: ids_t [B] -> (logits [B, V], states), with each mixer's
        recurrent step form (O(1) per token for parametric memories, a KV cache otherwise)."""
        if ids_t.ndim != 1:
            raise ValueError(f"ids_t: expected shape [B], got {tuple(ids_t.shape)}")
        x = self.embed(ids_t)  # [B, d_model]
        new = []
        for block, s in zip(self.blocks, states, strict=True):
            y, s = block.mixer.step(block.mixer_norm(x), s)
            x = x + y
            x = x + block.mlp(block.mlp_norm(x))
            new.append(s)
        return self.head(self.norm(x)), new

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

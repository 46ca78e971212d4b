"""The catalogue's registry: the architectures the paper unifies (Table 1 and Section 4),
each a recipe (weights x function class x optimizer) plus the way its own paper parameterizes
the gates, the feature map and the output.

    >>> mixer = ttr.catalog.get("gated_deltanet", d_model=256, n_heads=4)
    >>> y, state = mixer(x)                                  # x [B, T, 256]
    >>> ttr.catalog.names()                                  # every entry
    >>> print(ttr.catalog.table())                           # the table `ttr list` prints

An entry is registered with `@entry(...)` on a builder `(config, **options) -> Built`: the
recipe, the gates (ttr.nn.gates), the memory (ttr.nn.memory) and the feature-map options.
`get(name, d_model=..., n_heads=..., **overrides)` takes MixerConfig fields and the entry's own
options (e.g. `ridge=` for the mesa layer) as overrides; unknown keys are errors. Each builder's
docstring cites the paper and says where the entry deviates from it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple

from torch import nn

from ttr.nn.mixer import Mixer, MixerConfig
from ttr.recipe import Recipe

FAMILIES = ("linear attention", "geometric decay", "online SGD", "exact second order",
            "nonparametric")


class Built(NamedTuple):
    recipe: Recipe
    gates: tuple[nn.Module, ...] = ()
    memory: str = "recipe"
    feature_options: dict | None = None


@dataclass(frozen=True)
class Entry:
    name: str
    family: str
    citation: str
    build: Callable[..., Built]
    config: dict = field(default_factory=dict)  # MixerConfig defaults of the architecture
    options: dict = field(default_factory=dict)  # the builder's keyword options and defaults

    @property
    def doc(self) -> str:
        return inspect.getdoc(self.build) or ""


CATALOG: dict[str, Entry] = {}


def entry(name: str, family: str, citation: str, **config):
    """Register a builder; its keyword-only parameters are the entry's options."""
    if family not in FAMILIES:
        raise ValueError(f"family: expected one of {list(FAMILIES)}, got {family!r}")

    def register(fn):
        sig = inspect.signature(fn)
        opts = {p.name: p.default for p in sig.parameters.values()
                if p.kind is inspect.Parameter.KEYWORD_ONLY}
        CATALOG[name] = Entry(name, family, citation, fn, config, opts)
        return fn
    return register


def names() -> list[str]:
    """Every entry, family by family (FAMILIES order), in registration order within one."""
    return sorted(CATALOG, key=lambda n: FAMILIES.index(CATALOG[n].family))


def get(name: str, *, d_model: int, n_heads: int = 1, **overrides: Any) -> Mixer:
    """A configured Mixer for a catalogue entry; overrides are MixerConfig fields or options."""
    if name not in CATALOG:
        raise ValueError(f"name: expected a catalogue entry, one of {names()}, got {name!r}")
    e = CATALOG[name]
    config_keys = {f.name for f in fields(MixerConfig)}
    unknown = sorted(set(overrides) - config_keys - set(e.options))
    if unknown:
        raise ValueError(f"{name}: unknown overrides {unknown}; expected MixerConfig fields "
                         f"{sorted(config_keys)} or the entry's options {sorted(e.options)}")
    cfg = {**e.config, **{k: v for k, v in overrides.items() if k in config_keys}}
    config = MixerConfig(d_model=d_model, n_heads=n_heads, **cfg)
    opts = {**e.options, **{k: v for k, v in overrides.items() if k in e.options}}
    built = e.build(config, **opts)
    return Mixer(built.recipe, config, gates=built.gates, memory=built.memory,
                 feature_options=built.feature_options)


def describe(name: str, d_model: int = 256, n_heads: int = 4, seq_len: int = 2048) -> dict:
    """One row of the catalogue table: the recipe's three choices, op, state size, citation."""
    e = CATALOG[name]
    m = get(name, d_model=d_model, n_heads=n_heads)
    r = m.recipe
    w = r.weights.kind + (" per-dim" if r.weights.granularity == "dim" else "")
    f = r.function_class
    fc = {"features": f"features ({m.config.feature_map or f.feature_map})",
          "kernel": f"kernel ({f.kernel})",
          "local_polynomial": f"local polynomial p={f.degree}"}.get(f.kind, f.kind)
    if f.kind == "mlp":
        model = getattr(m.gates[0], "model", "mlp")  # TTT-Linear: x + LN(x W + b)
        fc = "MLP" if model == "mlp" else "linear + LN, residual"
    if m.feature is not None and f.kind == "linear":
        fc = f"features ({m.feature.name})"
    o = r.optimizer
    opt = {"exact": f"exact (ridge {o.ridge:g})", "gd": f"{o.steps} GD step from 0",
           "sgd": f"online SGD ({o.step_size}" + (f", {o.steps} steps" if o.steps > 1 else "")
           + (f", wd {o.weight_decay:g}" if o.weight_decay else "")
           + (f", momentum {o.momentum:g}" if o.momentum else "") + ")"}[o.kind]
    grows = m.memory.grows(m)
    size = f"{m.state_size(seq_len if grows else None):,}" + (f" (T={seq_len})" if grows else "")
    op = r.op if m.memory_name == "recipe" else m.memory_name
    return {"name": name, "family": e.family, "weights": w, "function class": fc,
            "optimizer": opt, "op": op, "state size": size, "citation": e.citation}


def table(d_model: int = 256, n_heads: int = 4, seq_len: int = 2048,
          family: str | None = None) -> str:
    """The catalogue as a Markdown table (state sizes at the given sizes), one family or all."""
    rows = [describe(n, d_model, n_heads, seq_len) for n in names()
            if family is None or CATALOG[n].family == family]
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


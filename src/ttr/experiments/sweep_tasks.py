"""The two kinds of run a sweep is made of (`ttr.sweep.TASKS`): train and evaluate one model on
MQAR, and score one memory on the online regression task of Section 5.

MQARRun trains one model at one grid point with one learning rate (the sweep is the grid; the
report takes the best learning rate per point, as zoology does). The layer comes from
  source="catalog"  a catalogue entry, built as its paper parameterizes it (`ttr.catalog.get`);
  source="recipe"   a bare recipe of `ttr.experiments.mqar.LAYERS` (the paper's Fig. 3 layers).
The model is the embedding, n_layers pre-norm blocks (mixer, then a gated MLP if `mlp`), a final
RMSNorm and the readout. The paper's Section 6 model is one block without MLP whose keys pass
through a length-2 short conv (Eq. 56-58); a catalogue entry without its own key conv gets that
conv (`key_conv`; 0 = none), so that every entry can form the cue -> response association the
task needs. Zoology's models are 2 blocks with MLPs, and they get the conv too: without it, at
this budget, the zoology table measured having a conv rather than the design choices (session
10: the 12 entries with their own conv reached 84-100% at d_model 64, 18 of the 21 without one
stayed at 12-16%, softmax attention at 12.3% as swept, 15.6% with RoPE, 12.9% with 5x the
steps and 100% with the conv).

RegressionRun scores one memory without learned parameters on `ttr.tasks.online_regression`:
  source="paper"    a method of Fig. 2 (`ttr.experiments.online_regression.METHODS`);
  source="catalog"  a catalogue entry frozen as Section 5 fixes the paper's layers: the
                    projections are the identity (q_t = k_{t+1}, k_t, v_t straight from the
                    data; no short convs, output norm, output gate or skip), every
                    data-dependent gate has its input weights zeroed, so decays, step sizes and
                    temperatures sit at their initial (resting) values, and learned feature maps
                    and inner-model initializations stay at their initialization. What is left
                    is the entry's recipe with constant hyperparameters.
Variants of the data: "switch" (Eq. 55, the paper's), "stationary" (the fast regime throughout:
AR coefficient 0.9 for all t, from its stationary law) and "noisy" (the switch, with the memory's
values observed through Normal(0, VALUE_NOISE^2 / d) noise per coordinate; the score is against
the clean target). The loss per step is |v_{t+1} - y_t / |y_t||^2: the targets are unit vectors
and layers are followed by an output norm, so the direction is what a layer is scored on; the
unnormalized loss is reported beside it ("raw").
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ttr.configs import from_dict
from ttr.ops.common import NumericalError
from ttr.sweep import Checkpoint

MQAR_VARIANTS = ("zoology", "paper")
REGRESSION_VARIANTS = ("switch", "stationary", "noisy")
VALUE_NOISE = 0.5


def _int(cls: str, name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{cls}.{name}: expected an int >= {low}, got {value!r}")


def _choice(cls: str, name: str, value, options) -> None:
    if value not in options:
        raise ValueError(f"{cls}.{name}: expected one of {list(options)}, got {value!r}")


def _layer_names(source: str) -> list[str]:
    if source == "catalog":
        from ttr import catalog

        return catalog.names()
    if source == "recipe":
        from ttr.experiments.mqar import LAYERS

        return sorted(LAYERS)
    from ttr.experiments.online_regression import METHODS

    return [m for m, fn in METHODS.items() if fn is not None]


# -- MQAR ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MQARRun:
    layer: str
    source: str = "catalog"
    variant: str = "zoology"
    d_model: int = 64
    n_heads: int = 1
    n_layers: int = 2
    mlp: bool = True
    key_conv: int = 2  # the key conv of entries without one, in every variant (0 = none)
    num_pairs: int = 8
    seq_len: int = 64
    vocab_size: int = 64  # zoology variant only; the paper's vocabulary is the 2P tokens
    lr: float = 3e-3
    steps: int = 300
    batch_size: int = 32
    warmup: float = 0.1
    weight_decay: float = 0.1
    n_test: int = 256
    seed: int = 0
    # the 'rls' recipe layer's ridge (Eq. 11's lambda); None: 1.0, as in fig3. None-valued
    # fields are left out of a run's id (`ttr.sweep.plan`), so this field kept the ids of the
    # runs recorded before it
    ridge: float | None = None

    def __post_init__(self):
        c = "MQARRun"
        _choice(c, "source", self.source, ("catalog", "recipe"))
        _choice(c, "layer", self.layer, _layer_names(self.source))
        _choice(c, "variant", self.variant, MQAR_VARIANTS)
        for name, low in (("d_model", 1), ("n_heads", 1), ("n_layers", 1), ("key_conv", 0),
                          ("num_pairs", 1), ("seq_len", 2), ("vocab_size", 4), ("steps", 1),
                          ("batch_size", 1), ("n_test", 1), ("seed", 0)):
            _int(c, name, getattr(self, name), low)
        if not isinstance(self.mlp, bool):
            raise ValueError(f"{c}.mlp: expected a bool, got {self.mlp!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"{c}.n_heads: expected a divisor of d_model={self.d_model}, got "
                             f"{self.n_heads}")
        if self.seq_len % 2:
            raise ValueError(f"{c}.seq_len: expected an even length, got {self.seq_len}")
        need = 4 * self.num_pairs if self.variant == "zoology" else 2 * self.num_pairs
        if self.seq_len < need:
            raise ValueError(f"{c}.seq_len: the {self.variant} variant needs T >= "
                             f"{need // self.num_pairs} P = {need}, got {self.seq_len}")
        if self.variant == "zoology" and self.vocab_size < 2 * (self.num_pairs + 1):
            raise ValueError(f"{c}.vocab_size: expected >= 2 (P + 1) = "
                             f"{2 * (self.num_pairs + 1)}, got {self.vocab_size}")
        if self.source == "recipe" and (self.n_layers, self.mlp, self.n_heads) != (1, False, 1):
            raise ValueError(f"{c}.source: the 'recipe' layers are the paper's one-layer, "
                             f"one-head model without MLP; got n_layers={self.n_layers}, "
                             f"mlp={self.mlp}, n_heads={self.n_heads}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"{c}.lr: expected a number > 0, got {self.lr!r}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"{c}.warmup: expected a fraction in [0, 1), got {self.warmup!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"{c}.weight_decay: expected >= 0, got {self.weight_decay!r}")
        if self.ridge is not None:
            if isinstance(self.ridge, bool) or not isinstance(self.ridge, (int, float)) \
                    or not self.ridge > 0:
                raise ValueError(f"{c}.ridge: expected a number > 0 or None, got {self.ridge!r}")
            if (self.source, self.layer) != ("recipe", "rls"):
                raise ValueError(f"{c}.ridge: only the 'rls' recipe layer has a ridge to set; "
                                 f"got ridge={self.ridge!r} with source={self.source!r}, "
                                 f"layer={self.layer!r}")

    @classmethod
    def from_dict(cls, d: dict) -> MQARRun:
        return from_dict(cls, d)

    def label(self) -> str:
        ridge = "" if self.ridge is None else f"-ridge{self.ridge:g}"
        return (f"mqar-{self.layer}-{self.variant}-d{self.d_model}-P{self.num_pairs}"
                f"-T{self.seq_len}-lr{self.lr:g}{ridge}")

    @property
    def vocab(self) -> int:
        return 2 * self.num_pairs if self.variant == "paper" else self.vocab_size

    @property
    def seed_key(self) -> tuple:
        """What a run's seeds derive from: the layers at one data point share their data."""
        return (self.seed, self.variant, self.num_pairs, self.seq_len, self.vocab)

    def test_data(self):
        """The n_test held-out sequences, seeded by the config alone (the ones a result scores)."""
        from ttr.experiments.mqar import _seed

        return self.data(self.n_test, self.seq_len,
                         torch.Generator().manual_seed(_seed(*self.seed_key, "test")))

    def data(self, n: int, seq_len: int, generator: torch.Generator):
        from ttr.tasks.mqar import paper_mqar, zoology_mqar

        if self.variant == "paper":
            return paper_mqar(n, seq_len, self.num_pairs, generator)
        return zoology_mqar(n, seq_len, self.num_pairs, self.vocab_size, generator)


class GatedMLP(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.up = nn.Linear(d, 4 * d, bias=False)  # two halves: value and gate, 2d each
        self.down = nn.Linear(2 * d, d, bias=False)

    def forward(self, x):
        a, b = self.up(x).chunk(2, dim=-1)
        return self.down(a * F.silu(b))


class CatalogMQARModel(nn.Module):
    """Embedding -> n_layers x (x + mixer(norm x) [, x + mlp(norm x)]) -> norm -> readout."""

    def __init__(self, run: MQARRun):
        super().__init__()
        from ttr import catalog

        d = run.d_model
        self.embed = nn.Embedding(run.vocab, d)
        over = {}
        probe = catalog.get(run.layer, d_model=d, n_heads=run.n_heads)
        if run.key_conv and not probe.config.conv_k and probe.k_proj is not None:
            over["conv_k"] = run.key_conv  # the Section 6 construction (Eq. 56-58)
        self.mixers = nn.ModuleList(
            catalog.get(run.layer, d_model=d, n_heads=run.n_heads, **over)
            for _ in range(run.n_layers))
        self.mlps = nn.ModuleList(GatedMLP(d) for _ in range(run.n_layers)) if run.mlp else None
        self.norms = nn.ModuleList(nn.RMSNorm(d) for _ in range(run.n_layers * (1 + run.mlp)))
        self.norm = nn.RMSNorm(d)
        self.head = nn.Linear(d, run.vocab, bias=False)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(ids)  # [B, T, D]
        norms = iter(self.norms)
        for i, mixer in enumerate(self.mixers):
            x = x + mixer(next(norms)(x), output_state=False)[0]
            if self.mlps is not None:
                x = x + self.mlps[i](next(norms)(x))
        h = self.norm(x)
        return self.head(h if mask is None else h[mask])

    def state_floats(self, seq_len: int) -> int:
        return sum(m.state_size(seq_len) for m in self.mixers)


def run_mqar(run: MQARRun, progress: Callable[[int, int], None],
             checkpoint: Checkpoint | None = None,
             trained: Callable[[nn.Module], None] | None = None) -> dict:
    """Train with AdamW (linear warmup, cosine decay; weight decay on matrices) on fresh
    sequences every step; evaluate on n_test held-out sequences. Seeded by the config alone.
    `trained`, if given, receives the trained model before it is scored (for a probe that
    measures more than the result records, as docs/results/sweeps/fig3-full/probe_recency.py).
    With a `checkpoint` (`ttr.sweep.Checkpoint`) the training state -- the step, the model, the
    optimizer, the data generator and the losses so far -- is saved whenever it is due and a
    saved state is continued from, which gives the same run as an uninterrupted one (with the
    same torch thread count; reductions over another split may round differently).
    A run whose loss or weights become non-finite, or whose layer meets a numerically singular
    system (`NumericalError`), stops there and scores accuracy 0, with the step and the reason
    recorded (`diverged_at_step`, `diverged_reason`): at the top of a learning-rate sweep that
    happens."""
    from ttr.experiments.mqar import (
        MQARModel,
        _schedule,
        _seed,
        accuracy_by_load,
        adamw,
        evaluate,
        layer_recipe,
        train_step,
    )

    key = run.seed_key
    torch.manual_seed(_seed(*key, "init", run.layer, run.d_model))
    if run.source == "recipe":
        model = MQARModel(layer_recipe(run.layer, 1.0 if run.ridge is None else run.ridge),
                          run.vocab, run.d_model,
                          form="chunk" if run.layer == "rls" else None)
        state = model.mixer.state_size(run.seq_len)
    else:
        model = CatalogMQARModel(run)
        state = model.state_floats(run.seq_len)
    opt = adamw(model, run.lr, run.weight_decay)
    gen = torch.Generator().manual_seed(_seed(*key, "train"))
    first, losses = 0, []
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        gen.set_state(saved["gen"])
        first, losses = saved["step"], saved["losses"]
        progress(first, run.steps)
    start = time.perf_counter() - (checkpoint.before if checkpoint is not None else 0.0)
    model.train()
    diverged = None  # the step at which training blew up (a result, not a crash)
    for step in range(first, run.steps):
        for group in opt.param_groups:
            group["lr"] = run.lr * _schedule(step, run.steps, run.warmup)
        try:
            loss = train_step(model, opt, *run.data(run.batch_size, run.seq_len, gen))
        except NumericalError as e:  # non-finite activations, a numerically singular Gram
            loss, reason = math.nan, str(e)
        else:
            reason = None if math.isfinite(loss) else "the loss is not finite"
        if reason is not None:
            diverged = step + 1
            progress(run.steps, run.steps)
            break
        losses.append(loss)
        progress(step + 1, run.steps)
        if checkpoint is not None and step + 1 < run.steps and checkpoint.due():
            checkpoint.save({"step": step + 1, "model": model.state_dict(),
                             "opt": opt.state_dict(), "gen": gen.get_state(),
                             "losses": losses})
    seconds = time.perf_counter() - start
    if trained is not None:
        trained(model)
    test = run.test_data()
    tail = losses[-10:]
    loads = {}  # recall by memory load: the paper variant draws its pairs with replacement
    if diverged:
        accuracy = 0.0
    elif run.variant == "paper":
        # one pass over the test set: the split's totals are `evaluate`'s counts (tested)
        split = loads["accuracy_by_load"] = accuracy_by_load(model, *test, run.num_pairs)
        accuracy = sum(split["correct"]) / max(sum(split["queries"]), 1)
    else:
        accuracy = evaluate(model, *test)
    return {"accuracy": accuracy, **loads,
            "final_loss": None if diverged else sum(tail) / len(tail),
            "diverged_at_step": diverged, "diverged_reason": reason if diverged else None,
            "state_floats": state,
            "params": sum(p.numel() for p in model.parameters()),
            "train_seconds": round(seconds, 2), "chance": 1 / (run.vocab // 2)}


# -- online regression --------------------------------------------------------------------------

@dataclass(frozen=True)
class RegressionRun:
    method: str
    source: str = "catalog"
    variant: str = "switch"
    T: int = 256
    d: int = 64
    seeds: int = 32
    seed: int = 0
    rho: float = 0.5

    def __post_init__(self):
        c = "RegressionRun"
        _choice(c, "source", self.source, ("catalog", "paper"))
        _choice(c, "method", self.method, _layer_names(self.source))
        _choice(c, "variant", self.variant, REGRESSION_VARIANTS)
        for name, low in (("T", 4), ("d", 2), ("seeds", 1), ("seed", 0)):
            _int(c, name, getattr(self, name), low)
        low = -1.0 / (self.d - 1)
        if isinstance(self.rho, bool) or not isinstance(self.rho, (int, float)) \
                or not low < self.rho < 1:
            raise ValueError(f"{c}.rho: expected a value in ({low:.4g}, 1), got {self.rho!r}")

    @classmethod
    def from_dict(cls, d: dict) -> RegressionRun:
        return from_dict(cls, d)

    def label(self) -> str:
        return f"regression-{self.source}-{self.method}-{self.variant}-T{self.T}-d{self.d}"


def regression_data(run: RegressionRun):
    """(q, k, v observed, clean target), each `[N, T, 1, d]` float64, for the run's variant."""
    from ttr.tasks.online_regression import COEFS, switching_ar

    gen = torch.Generator().manual_seed(run.seed)
    coefs = (COEFS[0], COEFS[0]) if run.variant == "stationary" else COEFS
    data = switching_ar(run.seeds, run.T, run.d, generator=gen, rho=run.rho, coefs=coefs)
    v = data.v
    if run.variant == "noisy":
        v = v + VALUE_NOISE / math.sqrt(run.d) * torch.randn(v.shape, generator=gen,
                                                             dtype=v.dtype)
    return data.q, data.k, v, data.target


def frozen_entry(name: str, d: int) -> nn.Module:
    """A catalogue entry as a parameter-free memory on inputs x_t = [k_t; v_t; q_t] (3d):
    identity projections, gates at their resting values (module doc)."""
    from ttr import catalog

    torch.manual_seed(0)  # random feature maps and inner-model inits: one fixed draw
    m = catalog.get(name, d_model=3 * d, n_heads=1, d_key=d, d_value=d, conv_q=0, conv_k=0,
                    conv_v=0, output_norm=None, output_gate=None, skip=False, bias=False)
    eye, zero = torch.eye(d), torch.zeros(d, d)
    with torch.no_grad():
        n = m.config.keys_per_token
        m.q_proj.weight.copy_(torch.cat([zero, zero, eye], 1))
        if m.k_proj is not None:  # DeltaProduct: every one of its n keys is k_t
            m.k_proj.weight.copy_(torch.cat([eye, zero, zero], 1).repeat(n, 1))
        m.v_proj.weight.copy_(torch.cat([zero, eye, zero], 1).repeat(n, 1))
        for module in m.gates.modules():
            if isinstance(module, nn.Linear) and module.in_features == 3 * d:
                module.weight.zero_()
    return m.double().eval()


def _catalog_method(name: str, d: int):
    m = frozen_entry(name, d)

    def method(q, k, v):  # [N, T, 1, d] each
        x = torch.cat([k, v, q], dim=-1)[:, :, 0]  # [N, T, 3d]
        qm, km, vm, inputs, _, _ = m.memory_inputs(x)
        o, _ = m.memory.run(m, qm, km, vm, inputs, None, False, None)  # [N, T, 1, d(+1)]
        if m.config.normalize:  # Eq. 13
            o = o[..., :-1] / (o[..., -1:] + 1e-6)
        return o
    return method


def run_regression(run: RegressionRun, progress: Callable[[int, int], None]) -> dict:
    from ttr.experiments.online_regression import CHUNK, METHODS

    q, k, v, target = regression_data(run)
    method = METHODS[run.method] if run.source == "paper" else _catalog_method(run.method, run.d)
    outs = []
    with torch.no_grad():
        for i in range(0, run.seeds, CHUNK):
            outs.append(method(q[i:i + CHUNK], k[i:i + CHUNK], v[i:i + CHUNK]))
            progress(min(i + CHUNK, run.seeds), run.seeds)
    y = torch.cat(outs).double()  # [N, T, 1, d]
    unit = y / y.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    result = {}
    for key, pred in (("", unit), ("raw_", y)):
        loss = (target - pred).square().sum(-1)[..., 0]  # [N, T]
        # |a - b|^2 <= 4 for unit vectors: a larger normalized loss means the memory's numbers
        # overflowed (a diverging recursion); it counts as diverged (inf, stored as None)
        ok = torch.isfinite(loss) & ((loss <= 4 + 1e-6) if key == "" else True)
        loss = torch.where(ok, loss, torch.full_like(loss, math.inf))
        n = loss.shape[0]
        result[key + "loss_mean"] = loss.mean(0).tolist()
        result[key + "loss_stderr"] = (loss.std(0) / math.sqrt(n)).tolist() if n > 1 else \
            [0.0] * run.T
        quarter = run.T // 4
        for part, sl in (("first_quarter", slice(0, quarter)), ("rest", slice(quarter, None)),
                         ("all", slice(None))):
            per_seq = loss[:, sl].mean(1)
            result[f"{key}{part}"] = per_seq.mean().item()
            result[f"{key}{part}_stderr"] = (per_seq.std() / math.sqrt(n)).item() if n > 1 \
                else 0.0
    return {k: _finite_or_none(v) for k, v in result.items()}  # strict JSON: no Infinity


def _finite_or_none(x):
    if isinstance(x, list):
        return [_finite_or_none(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x

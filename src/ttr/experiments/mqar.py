"""Paper Section 6, Fig. 3: one test-time regression layer with one short conv solves MQAR.

The construction (Eq. 56-58): keys from a length-2 short conv, k_t = w_0 W_K x_t + w_1 W_K
x_{t-1}; queries and values from the token itself. With w = (0, 1) the memory regresses each
token on the previous one, so querying with a cue returns its response. Linear attention
(Recipe(uniform, linear, gd), Eq. 12) stores the pairs as a sum of outer products and recalls
perfectly only while the P cue keys can be (nearly) orthogonal in D_k = d_model dims; RLS
(Recipe(uniform, linear, exact(ridge)), Eq. 11) inverts the key covariance and keeps recalling
when P > d_model. Memory capacity, not the sequence length T, limits recall.

Model: token embedding (d_model = D_k = 64) -> one `Mixer` (1 head, conv_k = 2, no conv on q and
v) -> residual + final RMSNorm -> linear readout. No MLP, as in the paper. Training follows
zoology (Arora et al. 2023): AdamW, linear warm-up then cosine decay, cross-entropy on the target
positions, a learning-rate sweep, and per (layer, P, T) the best test accuracy over the sweep.

    rows = run(MQARConfig.quick(), Path("results/mqar"))   # writes mqar.csv and mqar.png
"""

from __future__ import annotations

import csv
import hashlib
import math
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ttr.nn import Mixer, MixerConfig
from ttr.recipe import FunctionClass, Optimizer, Recipe, Weights
from ttr.tasks.mqar import IGNORE, paper_mqar, paper_mqar_loads, zoology_mqar

VARIANTS = ("paper", "zoology")


# The layers this experiment can train, by name (a table, not import strings).
LAYERS = {
    "linear_attention": lambda ridge: Recipe(Weights.uniform(), FunctionClass.linear(),
                                             Optimizer.gd()),
    "rls": lambda ridge: Recipe(Weights.uniform(), FunctionClass.linear(),
                                Optimizer.exact(ridge=ridge)),
    "delta_rule": lambda ridge: Recipe(Weights.uniform(), FunctionClass.linear(),
                                       Optimizer.sgd()),
    "softmax": lambda ridge: Recipe(Weights.local(), FunctionClass.local_polynomial(0),
                                    Optimizer.exact()),
    # p = 1 (Eq. 52-54); its ridge is on the slope, as the catalogue's local_linear entry
    "local_linear": lambda ridge: Recipe(Weights.local(), FunctionClass.local_polynomial(1),
                                         Optimizer.exact(ridge=0.1)),
}


def layer_recipe(name: str, ridge: float) -> Recipe:
    if name not in LAYERS:
        raise ValueError(f"layers: unknown layer {name!r}; expected some of {sorted(LAYERS)}")
    return LAYERS[name](ridge)


LABELS = {"linear_attention": "linear attention", "rls": "RLS (exact least squares)",
          "delta_rule": "delta rule (online SGD)", "softmax": "softmax attention",
          "local_linear": "local linear attention (p=1)"}


@dataclass(frozen=True)
class MQARConfig:
    """One MQAR sweep. `train_seq_len=None` trains one model per (layer, P, T, lr) at T, as the
    paper and zoology do; an int trains once per (layer, P, lr) at that length and evaluates at
    every T in `seq_lens`. `vocab_size` and `power_a` apply to the zoology variant (the paper
    variant's vocabulary is its 2P cue and response tokens). `n_train=None` draws fresh
    sequences every step; an int draws the batches from a fixed training set of that size.
    `forms` picks an op form per layer (missing = the op's default)."""

    variant: str = "paper"
    layers: tuple[str, ...] = ("linear_attention", "rls")
    num_pairs: tuple[int, ...] = (64, 128)
    seq_lens: tuple[int, ...] = (128, 256, 512, 1024)
    train_seq_len: int | None = 256
    d_model: int = 64
    ridge: float = 1.0
    output_norm: bool = False
    vocab_size: int = 8192
    power_a: float = 0.01
    lrs: tuple[float, ...] = (1e-2,)
    steps: int = 1000
    batch_size: int = 32
    warmup: float = 0.1
    weight_decay: float = 0.1
    n_train: int | None = None
    n_test: int = 500
    seed: int = 0
    forms: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        for name in ("layers", "num_pairs", "seq_lens", "lrs"):
            val = getattr(self, name)
            if isinstance(val, (str, int, float)) or not len(val):
                raise ValueError(f"MQARConfig.{name}: expected a non-empty list, got {val!r}")
            object.__setattr__(self, name, tuple(val))
        if self.variant not in VARIANTS:
            raise ValueError(f"MQARConfig.variant: expected one of {list(VARIANTS)}, "
                             f"got {self.variant!r}")
        for name in self.layers:
            layer_recipe(name, 1.0)
        for name in ("d_model", "steps", "batch_size", "n_test", "vocab_size"):
            _positive_int(name, getattr(self, name))
        for p in self.num_pairs:
            _positive_int("num_pairs", p)
        for name in ("train_seq_len", "n_train"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        for t in self.seq_lens + ((self.train_seq_len,) if self.train_seq_len else ()):
            _positive_int("seq_lens", t)
            if t % 2:
                raise ValueError(f"MQARConfig.seq_lens: expected even lengths, got {t}")
            if self.variant == "zoology" and t < 4 * max(self.num_pairs):
                raise ValueError(f"MQARConfig.seq_lens: the zoology variant needs T >= 4 P = "
                                 f"{4 * max(self.num_pairs)}, got {t}")
        if self.variant == "zoology" and self.vocab_size < 2 * (max(self.num_pairs) + 1):
            raise ValueError(f"MQARConfig.vocab_size: expected >= 2 (P + 1), got "
                             f"{self.vocab_size}")
        for lr in self.lrs:
            if not (isinstance(lr, (int, float)) and lr > 0):
                raise ValueError(f"MQARConfig.lrs: expected positive numbers, got {lr!r}")
        if not (isinstance(self.ridge, (int, float)) and self.ridge > 0):
            raise ValueError(f"MQARConfig.ridge: expected > 0, got {self.ridge!r}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"MQARConfig.warmup: expected a fraction in [0, 1), "
                             f"got {self.warmup!r}")
        if self.weight_decay < 0:
            raise ValueError(f"MQARConfig.weight_decay: expected >= 0, got {self.weight_decay}")
        unknown = set(self.forms) - set(LAYERS)
        if unknown:  # forms may name layers outside this sweep (a narrowed copy keeps them)
            raise ValueError(f"MQARConfig.forms: unknown layers {sorted(unknown)}; expected "
                             f"some of {sorted(LAYERS)}")

    @classmethod
    def from_dict(cls, d: dict) -> MQARConfig:
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"MQARConfig: unknown keys {unknown}")
        return cls(**d)

    @classmethod
    def quick(cls, variant: str = "paper") -> MQARConfig:
        """Paper variant: P in {64, 128}, one model per (layer, P) trained at T = 256 (1000
        steps of 32 sequences, lr 1e-2) and evaluated at T in {128, ..., 1024} on 500 held-out
        sequences each. RLS uses its chunkwise form (~2x the cost of linear attention per step;
        the per-token batched solve of the parallel form is ~20x). About 4 minutes on an idle
        2-core CPU (measured: 28 s per linear-attention model, 76 s per RLS model).

        Zoology variant: T must be >= 4P, so it trains at T = 512 (16 sequences a step) and
        evaluates at T in {512, 1024}, with a 512-token vocabulary. Its supervision is sparser
        (P targets per sequence): in this budget we measured RLS at P = 64 learning (~100%)
        but linear attention, and RLS at P = 128, still at chance; it needs `full()`."""
        if variant == "zoology":
            return cls(variant=variant, seq_lens=(512, 1024), train_seq_len=512,
                       batch_size=16, vocab_size=512, forms={"rls": "chunk"})
        return cls(variant=variant, forms={"rls": "chunk"})

    @classmethod
    def full(cls, variant: str = "paper") -> MQARConfig:
        """The paper's protocol: one model per (layer, P, T), T in {64, ..., 1024}, 2000 steps
        of 64 sequences and a 4-value lr sweep; best lr per (layer, P, T). Expected wall time
        on a 2-core CPU ~7-8 hours (measured fwd+bwd ~4 us per token for linear attention and
        ~9 us for chunkwise RLS: 2 P x 4 lr x 2000 steps x 64 x 1984 tokens); minutes on a GPU.
        The zoology variant uses T in {512, 1024, 2048} (T >= 4P) and zoology's 8192-token
        vocabulary (not run here: ~2x the paper variant's cost)."""
        common = dict(variant=variant, train_seq_len=None, lrs=(1e-3, 3e-3, 1e-2, 3e-2),
                      steps=2000, batch_size=64, n_test=1000, forms={"rls": "chunk"})
        if variant == "zoology":
            return cls(seq_lens=(512, 1024, 2048), **common)
        return cls(seq_lens=(64, 128, 256, 512, 1024), **common)

    def vocab(self, num_pairs: int) -> int:
        return 2 * num_pairs if self.variant == "paper" else self.vocab_size

    def data(self, n: int, seq_len: int, num_pairs: int, generator: torch.Generator):
        if self.variant == "paper":
            return paper_mqar(n, seq_len, num_pairs, generator)
        return zoology_mqar(n, seq_len, num_pairs, self.vocab_size, generator, self.power_a)


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"MQARConfig.{name}: expected an int >= 1, got {value!r}")


def _seed(*parts) -> int:
    """A stable 63-bit seed per named stream, so every run is reproducible on its own."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big") >> 1


class MQARModel(nn.Module):
    """Embedding -> Mixer (keys through a length-2 short conv) -> residual, RMSNorm -> readout."""

    def __init__(self, recipe: Recipe, vocab_size: int, d_model: int, *,
                 output_norm: bool = False, form: str | None = None):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        # The delta rule's step (I - beta k k^T) is a contraction only while beta ||k||^2 <= 2:
        # with raw keys the recurrence overflowed at T = 1024 from the first step for some
        # initializations (loss NaN at any learning rate). Its keys and queries are L2-normalized,
        # as DeltaNet's are (Yang et al. 2024, "Parallelizing linear transformers with the delta
        # rule over sequence length").
        self.mixer = Mixer(recipe, MixerConfig(d_model=d_model, n_heads=1, d_key=d_model,
                                               d_value=d_model, conv_k=2,
                                               qk_norm=recipe.op == "delta_rule",
                                               output_norm="rms" if output_norm else None,
                                               form=form))
        self.norm = nn.RMSNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """ids `[B, T]` -> logits `[B, T, V]`, or `[n, V]` at the `mask`ed positions only
        (the loss needs nothing else, and the readout dominates the cost for large V)."""
        x = self.embed(ids)  # [B, T, D]
        y, _ = self.mixer(x, output_state=False)
        h = self.norm(x + y)  # [B, T, D]
        return self.head(h if mask is None else h[mask])


def _schedule(step: int, steps: int, warmup: float) -> float:
    n_warm = int(warmup * steps)
    if step < n_warm:
        return (step + 1) / n_warm
    return 0.5 * (1 + math.cos(math.pi * (step - n_warm) / max(1, steps - n_warm)))


def adamw(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW as zoology trains MQAR: weight decay on matrices only, betas (0.9, 0.98)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))


def train_step(model: nn.Module, opt: torch.optim.Optimizer, inputs: torch.Tensor,
               targets: torch.Tensor) -> float:
    """One step on the target positions (cross-entropy, gradient norm clipped at 1)."""
    mask = targets != IGNORE  # [B, T]
    loss = F.cross_entropy(model(inputs, mask), targets[mask])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item()


def train(model: MQARModel, config: MQARConfig, num_pairs: int, seq_len: int, lr: float,
          bar=None) -> float:
    """Train in place; returns the final training loss (mean of the last 10 steps)."""
    opt = adamw(model, lr, config.weight_decay)
    gen = torch.Generator().manual_seed(_seed(config.seed, "train", num_pairs, seq_len))
    pool = None
    if config.n_train is not None:
        pool = config.data(config.n_train, seq_len, num_pairs, gen)
    losses = []
    model.train()
    for step in range(config.steps):
        for group in opt.param_groups:
            group["lr"] = lr * _schedule(step, config.steps, config.warmup)
        if pool is None:
            inputs, targets = config.data(config.batch_size, seq_len, num_pairs, gen)
        else:
            idx = torch.randint(0, config.n_train, (config.batch_size,), generator=gen)
            inputs, targets = pool[0][idx], pool[1][idx]
        losses.append(train_step(model, opt, inputs, targets))
        if bar is not None:
            bar.update(1)
            if step % 20 == 0 or step == config.steps - 1:
                bar.set_postfix_str(f"loss {losses[-1]:.3f}", refresh=False)
    return sum(losses[-10:]) / len(losses[-10:])


@torch.no_grad()
def evaluate(model: MQARModel, inputs: torch.Tensor, targets: torch.Tensor,
             tokens_per_batch: int = 1 << 15) -> float:
    """Accuracy over all target positions of the held-out sequences (as zoology counts it)."""
    model.eval()
    n, T = inputs.shape
    bs = max(1, tokens_per_batch // T)
    correct = total = 0
    for a in range(0, n, bs):
        x, y = inputs[a:a + bs], targets[a:a + bs]
        mask = y != IGNORE
        correct += int((model(x, mask).argmax(-1) == y[mask]).sum())
        total += int(mask.sum())
    return correct / max(total, 1)


def cue_hits(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
             tokens_per_batch: int = 1 << 15) -> torch.Tensor:
    """A paper-variant model's answer at each cue position: [n, T/2] bool, True where the
    query there is answered (its target is not IGNORE) and the model's argmax is its value.
    Only the answered positions go through the readout, `tokens_per_batch` tokens at a time.
    `accuracy_by_load` splits these by memory load; the fig3 probes by load and by recency."""
    model.eval()
    n, T = inputs.shape
    cues = targets[:, 0::2]  # [n, T/2], the answers at the cue positions
    answered = cues != IGNORE
    right = torch.zeros_like(answered)
    bs = max(1, tokens_per_batch // T)
    with torch.no_grad():
        for a in range(0, n, bs):
            mask = torch.zeros(inputs[a:a + bs].shape, dtype=torch.bool)  # [b, T]
            mask[:, 0::2] = answered[a:a + bs]
            # model(x, mask) scores the masked positions in row-major order: [b, T/2]'s order
            right[a:a + bs][answered[a:a + bs]] = (
                model(inputs[a:a + bs], mask).argmax(-1) == cues[a:a + bs][answered[a:a + bs]])
    return right


def accuracy_by_load(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                     num_pairs: int, width: int = 8, tokens_per_batch: int = 1 << 15) -> dict:
    """A paper-variant model's recall split by memory load: bucket i counts the answered
    queries whose memory holds i * width .. (i + 1) * width - 1 distinct cue pairs
    (`paper_mqar_loads`). Returns {"width", "queries": [n_i], "correct": [c_i]}, P // width + 1
    buckets (a load is 1..P); their totals are `evaluate`'s. Past d_model = D_k pairs a linear
    memory can no longer keep them apart (Section 6), so this shows where each layer's
    capacity ends, which accuracy against T at fixed P mixes with the load's growth."""
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width: expected an int >= 1, got {width!r}")
    answered = targets[:, 0::2] != IGNORE  # [n, T/2]
    right = cue_hits(model, inputs, targets, tokens_per_batch)
    bucket = paper_mqar_loads(inputs, num_pairs) // width  # [n, T/2]
    size = num_pairs // width + 1
    return {"width": width,
            "queries": torch.bincount(bucket[answered], minlength=size).tolist(),
            "correct": torch.bincount(bucket[right], minlength=size).tolist()}


def run(config: MQARConfig, out_dir: Path, progress: bool = True) -> list[dict]:
    """Train and evaluate the sweep; write out_dir/mqar.csv and out_dir/mqar.png; return rows."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_lens = (config.seq_lens if config.train_seq_len is None
                  else (config.train_seq_len,))
    jobs = [(layer, P, T_train, lr) for layer in config.layers for P in config.num_pairs
            for T_train in train_lens for lr in config.lrs]
    tests = {}  # (P, T) -> held-out (inputs, targets), shared by every layer and lr
    for P in config.num_pairs:
        for T in config.seq_lens:
            gen = torch.Generator().manual_seed(_seed(config.seed, "test", P, T))
            tests[P, T] = config.data(config.n_test, T, P, gen)
    rows = []
    bar = tqdm(total=len(jobs) * config.steps, desc=f"MQAR ({config.variant})",
               disable=not progress, dynamic_ncols=True)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        for layer, P, T_train, lr in jobs:
            bar.set_description_str(f"MQAR {layer} P={P} T={T_train} lr={lr:g}")
            torch.manual_seed(_seed(config.seed, "init", layer, P, T_train))
            model = MQARModel(layer_recipe(layer, config.ridge), config.vocab(P),
                              config.d_model, output_norm=config.output_norm,
                              form=config.forms.get(layer))
            start = time.perf_counter()
            train(model, config, P, T_train, lr, bar)
            seconds = time.perf_counter() - start
            for T in config.seq_lens if config.train_seq_len is not None else (T_train,):
                rows.append(dict(variant=config.variant, layer=layer, num_pairs=P, seq_len=T,
                                 train_seq_len=T_train, lr=lr,
                                 accuracy=evaluate(model, *tests[P, T]), best=False,
                                 train_seconds=round(seconds, 2)))
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        bar.close()
    best = {}
    for i, r in enumerate(rows):  # ties keep the first lr of the sweep
        key = (r["layer"], r["num_pairs"], r["seq_len"])
        if key not in best or r["accuracy"] > rows[best[key]]["accuracy"]:
            best[key] = i
    for i in best.values():
        rows[i]["best"] = True
    with open(out_dir / "mqar.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, out_dir / "mqar.png")
    return rows


def plot(rows: list[dict], path: Path) -> None:
    """Accuracy vs T (best lr), one panel per P, one line per layer."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    best = [r for r in rows if r["best"] in (True, "True")]
    pairs = sorted({int(r["num_pairs"]) for r in best})
    layers = list(dict.fromkeys(r["layer"] for r in best))
    fig = Figure(figsize=(4.2 * len(pairs), 3.6), layout="constrained")
    axes = fig.subplots(1, len(pairs), squeeze=False)[0]
    for ax, P in zip(axes, pairs, strict=True):
        for layer in layers:
            pts = sorted((int(r["seq_len"]), float(r["accuracy"])) for r in best
                         if r["layer"] == layer and int(r["num_pairs"]) == P)
            ax.plot([t for t, _ in pts], [a for _, a in pts], marker="o",
                    label=LABELS.get(layer, layer))
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({int(r["seq_len"]) for r in best}))
        ax.xaxis.set_major_formatter("{x:.0f}")
        ax.minorticks_off()
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("sequence length T")
        ax.set_title(f"P = {P} cue-response pairs")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("recall accuracy (best lr)")
    axes[-1].legend(loc="lower left")
    variant = best[0]["variant"] if best else "?"
    trained = {str(r["train_seq_len"]) for r in best}
    how = (f"trained at T = {trained.pop()}" if len(trained) == 1 and
           len({r["seq_len"] for r in best}) > 1 else "trained at each T")
    fig.suptitle(f"MQAR ({variant} variant), one layer + short conv, d_model = D_k ({how})")
    fig.savefig(path, dpi=120)

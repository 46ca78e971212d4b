"""Online regression without learnable parameters (paper Section 5, Fig. 2).

Every method is one forward pass of a sequence layer over the dataset of
`ttr.tasks.online_regression` (Eq. 55): the layer memorizes (k_i, v_i), i <= t, and answers
q_t = k_{t+1}; the loss at step t is |v_{t+1} - y_t|^2, averaged over independent sequences
("seeds"). The methods, each a function (q, k, v) -> y on `[N, T, 1, d]` tensors:

  linear_attention  one GD step from zero (Eq. 2, 24) followed by output normalization
                    (footnote 2, Qin et al. 2022). TransNormer's normalization is an RMS/layer
                    norm, y -> sqrt(d) y / |y| up to a gain; the targets are unit vectors, so we
                    use y / |y|, the same direction at the target's scale.
  rls               unweighted ridge least squares (Eq. 11) via `ttr.ops.rls`. The ridge only
                    makes the first d steps (fewer pairs than dimensions) well posed, so it is
                    tiny *relative to the key scale*: keys and queries of each sequence are
                    divided by s = |k_1| / sqrt(d) (the scale known at step 1) and lambda =
                    RIDGE_REL = 1e-3, i.e. lambda = 1e-3 s^2 in the original units. RLS is
                    scale-equivariant given lambda ~ s^2, so the result does not depend on units.
  softmax           the local-constant regressor, Gaussian Nadaraya-Watson (Eq. 50) with
                    s(k, q) = exp(-|k - q|^2 / B). B is the median heuristic, fixed in advance and
                    never tuned on the loss: the median of |k_i - k_j|^2 over all pairs i < j of
                    the sequence's memory keys k_1..k_T (one B per sequence, the same at every
                    step; it is a scale statistic of the keys, the targets never enter it).
  local_linear      local linear regression, p = 1 (Eq. 52-54), `ttr.ops.local_linear_attention`
                    with the same median-heuristic bandwidth as softmax and a ridge of
                    RIDGE_REL on the slope M1 in the rescaled units (the p = 1 normal equations
                    are singular while fewer than d keys carry weight).
  kernel_regression exact kernel ridge regression (Eq. 43) with the Gaussian kernel
                    exp(-|k - k'|^2 / B) at softmax's median bandwidth B and ridge RIDGE_REL.
  unnormalized_softmax  one GD step of the same kernel regression from zero (Eq. 45-47, the
                    "crude approximation" k(K, K) ~ I): sum_i k(k_i, q) v_i, unnormalized.
  naive             the one-step forecaster y_t = v_t = q_t / |q_t|, "tomorrow = today" (the
                    paper's "v_{t-1} given k_t" in its shifted indexing).

Outputs in `out_dir`: online_regression.csv (method, t, loss_mean, loss_stderr per step),
online_regression_summary.csv (per method: mean loss for t <= T/4 and t > T/4, +- standard
error over sequences) and online_regression.png (loss vs t, log scale, switch marked).
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ttr import ops
from ttr.tasks.online_regression import switching_ar

CHUNK = 32  # sequences per forward pass; methods treat sequences independently
OFF_CHART = 10.0  # a method whose mean loss exceeds this at some step is left off the plot
RIDGE_REL = 1e-3  # RLS ridge in units of the squared per-coordinate scale of k_1 (doc above)

Method = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _linear_attention(q, k, v):
    o, _ = ops.linear_attention(q, k, v)  # [N, T, 1, d], sum_i v_i k_i^T q_t
    return o / o.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(o.dtype).tiny)


def _rls(q, k, v):
    s = k[:, :1].norm(dim=-1, keepdim=True) / math.sqrt(k.shape[-1])  # [N, 1, 1, 1]
    o, _ = ops.rls(q / s, k / s, v, ridge=RIDGE_REL)
    return o


def median_bandwidth(k: torch.Tensor) -> torch.Tensor:
    """Median heuristic: median of |k_i - k_j|^2 over pairs i < j, per sequence. `[N]`."""
    x = k[:, :, 0]  # [N, T, d]
    d2 = torch.cdist(x, x).square()  # [N, T, T]
    i, j = torch.triu_indices(x.shape[1], x.shape[1], offset=1)
    if i.numel() == 0:  # a single key: any bandwidth gives the same (one-point) average
        return torch.ones(x.shape[0], dtype=x.dtype)
    return d2[:, i, j].median(dim=1).values


def _softmax(q, k, v):
    # exp(-|k - q|^2 / B) = exp(-|k/sqrt(B) - q/sqrt(B)|^2): one bandwidth per sequence by
    # rescaling, so the op sees bandwidth 1.
    r = median_bandwidth(k).sqrt()[:, None, None, None]  # [N, 1, 1, 1]
    o, _ = ops.softmax_attention(q / r, k / r, v, bandwidth=1.0)
    return o


def _local_linear(q, k, v):
    r = median_bandwidth(k).sqrt()[:, None, None, None]  # [N, 1, 1, 1], as for softmax
    o, _ = ops.local_linear_attention(q / r, k / r, v, bandwidth=1.0, ridge=RIDGE_REL)
    return o


def _kernel(solver):
    def method(q, k, v):
        # The Gaussian kernel exp(-|k - k'|^2 / B) with the median bandwidth B, as softmax:
        # the op's "rbf" kernel divides by 2 Dk, so rescale by sqrt(B / (2 Dk)).
        r = (median_bandwidth(k) / (2 * k.shape[-1])).sqrt()[:, None, None, None]
        ridge = RIDGE_REL if solver == "exact" else None
        o, _ = ops.kernel_regression(q / r, k / r, v, kernel="rbf", ridge=ridge, solver=solver)
        return o
    return method


def _naive(q, k, v):
    return q / q.norm(dim=-1, keepdim=True)  # = v_t


# name -> (q, k, v) -> y, or None for a method not implemented yet. Adding one is one line.
METHODS: dict[str, Method | None] = {
    "linear_attention": _linear_attention,
    "rls": _rls,
    "softmax": _softmax,
    "local_linear": _local_linear,
    "kernel_regression": _kernel("exact"),
    "unnormalized_softmax": _kernel("gd"),
    "naive": _naive,
}
LABELS = {
    "linear_attention": "linear attention (output-normalized)",
    "rls": "RLS (unweighted)",
    "softmax": "softmax attention (p=0)",
    "local_linear": "local_linear (p=1)",
    "kernel_regression": "kernel ridge regression (Gaussian)",
    "unnormalized_softmax": "unnormalized softmax (1 GD step)",
    "naive": "naive forecaster",
}


@dataclass(frozen=True)
class OnlineRegressionConfig:
    """One run of Fig. 2. `seeds` independent sequences are drawn from one generator seeded
    with `seed`; `rho` is the off-diagonal of Sigma (see `ttr.tasks.online_regression`)."""

    T: int = 256
    d: int = 64
    seeds: int = 32
    seed: int = 0
    rho: float = 0.5
    dtype: str = "float64"
    methods: tuple[str, ...] = field(default_factory=lambda: tuple(METHODS))

    def __post_init__(self):
        for name, low in (("T", 4), ("d", 2), ("seeds", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"OnlineRegressionConfig.{name}: expected an int >= {low}, "
                                 f"got {value!r}")
        low = -1.0 / (self.d - 1)
        if isinstance(self.rho, bool) or not isinstance(self.rho, (int, float)) \
                or not low < self.rho < 1:
            raise ValueError(f"OnlineRegressionConfig.rho: expected a value in ({low:.4g}, 1), "
                             f"got {self.rho!r}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"OnlineRegressionConfig.dtype: expected 'float32' or 'float64', "
                             f"got {self.dtype!r}")
        if isinstance(self.methods, str) or not isinstance(self.methods, (tuple, list)):
            raise TypeError(f"OnlineRegressionConfig.methods: expected a tuple of names, got "
                            f"{self.methods!r}")
        object.__setattr__(self, "methods", tuple(self.methods))
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods or len(set(self.methods)) != len(self.methods):
            raise ValueError(f"OnlineRegressionConfig.methods: expected distinct names from "
                             f"{list(METHODS)}, got {list(self.methods)}")

    @classmethod
    def quick(cls) -> OnlineRegressionConfig:
        """The paper's T and d over 32 sequences: a few seconds on a laptop CPU."""
        return cls(seeds=32)

    @classmethod
    def full(cls) -> OnlineRegressionConfig:
        """The paper's T and d over 512 sequences: standard errors ~4x smaller."""
        return cls(seeds=512)


def run(config: OnlineRegressionConfig, out_dir: Path, progress: bool = True) -> dict:
    """Run every method of `config` in one forward pass each; write the CSVs and the plot.

    Returns {"config", "per_step", "summary", "not_implemented", "files", "seconds"}; the
    row lists are the CSV rows as dicts.
    """
    if not isinstance(config, OnlineRegressionConfig):
        raise TypeError(f"config: expected an OnlineRegressionConfig, got "
                        f"{type(config).__name__}")
    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = switching_ar(config.seeds, config.T, config.d,
                        generator=torch.Generator().manual_seed(config.seed), rho=config.rho,
                        dtype=getattr(torch, config.dtype))
    losses: dict[str, torch.Tensor] = {}  # name -> [N, T], |v_{t+1} - y_t|^2
    missing = []
    for name in tqdm(config.methods, desc="online regression", disable=not progress):
        method = METHODS[name]
        if method is None:
            missing.append(name)
            continue
        with torch.no_grad():  # in chunks of sequences, to bound the memory of any form
            y = torch.cat([method(data.q[i:i + CHUNK], data.k[i:i + CHUNK], data.v[i:i + CHUNK])
                           for i in range(0, config.seeds, CHUNK)])  # [N, T, 1, d]
        losses[name] = (data.target - y).square().sum(-1)[..., 0].double()

    per_step = [
        {"method": name, "t": t + 1, "loss_mean": m, "loss_stderr": s}
        for name, loss in losses.items()
        for t, (m, s) in enumerate(_mean_stderr(loss).T.tolist())  # over seeds, per t
    ]
    quarter = config.T // 4  # steps t = 1..T/4 are the fast regime
    summary = []
    for name in config.methods:
        row = {"method": name, "label": LABELS.get(name, name)}
        if name in losses:
            loss = losses[name]
            row["status"] = "ok"
            for key, part in (("loss_first_quarter", loss[:, :quarter]),
                              ("loss_last_three_quarters", loss[:, quarter:]),
                              ("loss_all", loss)):
                m, s = _mean_stderr(part.mean(1))  # per-seed period mean, then over seeds
                row[key], row[key + "_stderr"] = m.item(), s.item()
        else:
            row["status"] = "not yet implemented"
            for key in SUMMARY_COLUMNS[3:]:
                row[key] = ""
        summary.append(row)

    files = {
        "per_step": out_dir / "online_regression.csv",
        "summary": out_dir / "online_regression_summary.csv",
        "plot": out_dir / "online_regression.png",
    }
    _write_csv(files["per_step"], ["method", "t", "loss_mean", "loss_stderr"], per_step)
    _write_csv(files["summary"], SUMMARY_COLUMNS, summary)
    plot(per_step, config, files["plot"], missing)
    return {"config": asdict(config), "per_step": per_step, "summary": summary,
            "not_implemented": missing, "files": files,
            "seconds": time.perf_counter() - start}


SUMMARY_COLUMNS = ["method", "label", "status",
                   "loss_first_quarter", "loss_first_quarter_stderr",
                   "loss_last_three_quarters", "loss_last_three_quarters_stderr",
                   "loss_all", "loss_all_stderr"]


def _mean_stderr(x: torch.Tensor) -> torch.Tensor:
    """Mean and standard error over the first dimension (the seeds): `[2, ...]`."""
    n = x.shape[0]
    se = x.std(0) / math.sqrt(n) if n > 1 else torch.zeros_like(x[0])
    return torch.stack([x.mean(0), se])


def _write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)


def plot(per_step: list[dict], config: OnlineRegressionConfig, path: Path,
         missing: list[str] = ()) -> None:
    """Loss vs step, one line (+- 1 standard error band) per method, log y, switch at T/4."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    off_chart = []  # unnormalized outputs (Eq. 47) whose loss would squash the other lines
    for name in config.methods:
        rows = [r for r in per_step if r["method"] == name]
        if rows and max(r["loss_mean"] for r in rows) > OFF_CHART:
            off_chart.append(f"{LABELS.get(name, name)} (mean loss "
                             f"{sum(r['loss_mean'] for r in rows) / len(rows):.3g})")
            continue
        if not rows:
            continue
        t = [r["t"] for r in rows]
        m = [r["loss_mean"] for r in rows]
        lo = [max(r["loss_mean"] - r["loss_stderr"], 1e-12) for r in rows]
        hi = [r["loss_mean"] + r["loss_stderr"] for r in rows]
        (line,) = ax.plot(t, m, lw=1.4, label=LABELS.get(name, name))
        ax.fill_between(t, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
    ax.axvline(config.T / 4, color="0.3", ls="--", lw=1, label="regime switch (t = T/4)")
    ax.set_yscale("log")
    ax.set_xlim(1, config.T)
    ax.set_xlabel("step t")
    ax.set_ylabel(r"one-step loss $\|v_{t+1} - y_t\|^2$")
    title = (f"Online regression on a switching AR process (Eq. 55)\n"
             f"T={config.T}, d={config.d}, mean of {config.seeds} sequences, "
             f"band = ±1 s.e.")
    ax.set_title(title, fontsize=10)
    notes = ([f"not yet implemented: {', '.join(LABELS.get(n, n) for n in missing)}"]
             if missing else []) + ([f"off the chart: {', '.join(off_chart)}"]
                                    if off_chart else [])
    if notes:
        ax.text(0.99, 0.01, "\n".join(notes), transform=ax.transAxes, ha="right",
                va="bottom", fontsize=8, color="0.4")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.savefig(path, dpi=150)

"""Paper Fig. 3 (Section 6) at full scale: one layer with a length-2 key conv, d_model = D_k =
64, paper variant; P in {64, 128}, one model per T in {128, 256, 512, 1024} (T >= 2P) and lr
in {1e-3, 3e-3, 1e-2, 3e-2}, 2000 steps of 64 sequences, 1000 test sequences; layers linear
attention, RLS, delta rule (L2-normalized keys and queries, as DeltaNet's), softmax attention
and local linear attention (p = 1). 140 runs. quick: P = 64, T = 256, lr 1e-2, 500 steps of 32.

Cost, measured as CPU seconds per training step at P = 128, T = 1024 (session 14, one thread,
the 2-core Xeon, `ttr.runtime.tune_allocator()` on; CPU time, as the wall time read 1.5-1.7x
more beside a running sweep): linear attention 0.32, delta rule 0.57, RLS 0.63, softmax
attention 0.64 (1.17 before SDPA got equal head widths and took its flash kernel; session 13
read 1.8 s of wall time), local linear attention 6.6 (its O(T^2 D^2) per-query second moments:
64 sequences x 1024^2 pairs x 64^2 per step; session 13 read 13.9 s of wall time before that
session's and session 14's changes to the op; session 16's changes, 5.4-6.0 s; session 20,
steps 4-30 of a fresh process, 5.5-5.8). Local linear attention's recorded runs (seconds /
steps, the test set's scoring included, beside a second worker, runs/*.json): 0.41-0.48 s a
step at T = 128, 1.12-1.13 at T = 256 in a quiet window (1.34-1.74 with other work on the
machine), 2.52-2.62 at T = 512 (2.2-2.6 on the progress bar, which counts training only).
At T = 1024 its first two runs trained at 7.06 and 6.63 s a step of wall time beside each
other over session 23 (progress bar; 30-minute windows 6.0-7.9 s, the slowest with a CI run
beside them; 14-28% above session 20's 5.5-5.8 CPU s), and 6.08 and 6.27 over their last
~40 minutes in session 24; the next two 6.37 and 6.43 over their last 722 and 767 steps in
session 25; at P = 128, 6.82 and 7.14 over their last 1123 and 1198 steps in session 26, the
last two 6.28 and 6.24 over their first 1360 and 1369 steps in session 27. So a T = 1024 run
took 0.27-0.69 hours of a worker for the first four layers and 3.49-3.92 for local linear
attention's (recorded). The recorded runs took 23.8 worker-hours for the first four layers (28
runs each, the cost growing with T) and 18.8 for local linear attention's 20 runs up to T =
512; its eight T = 1024 runs 29.4 (14.5 for the four at P = 64; 3.76, 3.92, 3.60 and 3.65 for
lr 1e-3, 3e-3, 1e-2 and 3e-2 at P = 128): 72.0 worker-hours of wall time in all, two
workers side by side. The runs go cheapest first (the set of runs, and so their ids, does
not depend on the order): a partial sweep holds the whole figure for the four fast layers
before local linear attention's long runs.
"""

import math

from ttr.experiments.mqar import LAYERS

NAME = "fig3"

CAVEATS = [
    "memory load: the paper variant draws its pairs with replacement, so an answered query's "
    "memory holds fewer than P distinct pairs (`ttr.tasks.mqar.paper_mqar_load`): at P = 64 "
    "29.4 / 43.1 / 53.9 / 59.5 at T = 128 / 256 / 512 / 1024, below d_model = 64 at every T; "
    "at P = 128 58.6 / 86.1 / 107.7 at T = 256 / 512 / 1024. Accuracy against T at P = 128 "
    "therefore measures a load that grows with T, from below d_model at T = 256.",
    "RLS below linear attention at P = 128, T = 512 (92.3% against 94.6%) is not its ridge "
    "(0.01 / 0.1 / 1: 92.4 / 91.9 / 92.3%) nor the training length (4000 steps: RLS 93.1%, "
    "linear attention 95.4%): the `fig3_rls` ablation, docs/results/sweeps/fig3_rls. Nor "
    "float32 (scored in float64: the same accuracy). Split by the load of each answered "
    "query, RLS recalls 99.99-100% below a load of 64 = d_model (linear attention 99.45-"
    "99.96%) and falls faster past it: 86.5% against 91.4% at loads 96-111 "
    "(docs/results/sweeps/fig3_rls/probe-*.md).",
    "Past d_model the delta rule's lead is recency: at P = 128, T = 512 and a load of 96 or "
    "more it recalls 99.8% of the cues last seen 1-15 pairs before (linear attention 94.4-"
    "95.5%, RLS 92.0-93.2%) and 86.7% of those last seen 128-255 pairs before (84.1%, 74.0%); "
    "online SGD overwrites old pairs, uniform weights keep every pair alike "
    "(docs/results/sweeps/fig3-full/probe_recency.md).",
]


def runs(quick: bool) -> list[dict]:
    one = dict(task="mqar", source="recipe", variant="paper", d_model=64, n_heads=1,
               n_layers=1, mlp=False)
    if quick:
        return [dict(one, layer=layer, num_pairs=64, seq_len=256, lr=1e-2, steps=500)
                for layer in LAYERS]
    out = [dict(one, layer=layer, num_pairs=p, seq_len=t, lr=lr, steps=2000, batch_size=64,
                n_test=1000)
           for layer in LAYERS for p in (64, 128) for t in (128, 256, 512, 1024)
           for lr in (1e-3, 3e-3, 1e-2, 3e-2) if t >= 2 * p]
    # local linear attention last, each layer by increasing T (its cost grows as T^2)
    return sorted(out, key=lambda r: (r["layer"] == "local_linear", r["seq_len"]))


# Seconds per training step at T = 128 and T = 1024 on the 2-core Xeon with a second worker
# beside it: the medians of the recorded runs (runs/*.json, seconds / steps), and for local
# linear attention its first T = 128 runs (0.42) and ~7.0 s for its first T = 1024 runs
# (7.06 and 6.63 over session 23; through them the power law gives 1.07 s at T = 256 and
# 2.74 at T = 512, where its recorded runs took 1.12-1.13 and 2.52-2.62)
STEP_SECONDS = {"linear_attention": (0.054, 0.661), "rls": (0.132, 0.711),
                "delta_rule": (0.121, 0.842), "softmax": (0.059, 0.87),
                "local_linear": (0.42, 7.0)}


def cost(config: dict) -> float:
    """A run's estimated seconds (`ttr.sweep` weighs the sweep's ETA by it): its steps times
    the step time, a power law in T through the two measured points. Counting runs, the ETA
    took local linear attention's T = 1024 runs, ~4 hours each, for the average run."""
    at_128, at_1024 = STEP_SECONDS[config["layer"]]
    power = math.log(at_1024 / at_128) / math.log(8)
    return config["steps"] * at_128 * (config["seq_len"] / 128) ** power

"""Past d_model, is it recency that keeps the delta rule ahead? At fig3's P = 128, T = 512 the
sweep's accuracy-by-load split (leaderboard.md) has, at loads 112-127, the delta rule at 93.7%,
linear attention at 89.4% and RLS at 82.1%. The delta rule (online SGD on the squared loss,
Eq. 14) overwrites what a new key overlaps; linear attention and RLS weigh every stored pair
alike (uniform weights). If recency is the reason, the delta rule's lead lives in the queries
whose pair was written recently.

Retrains the best run of each layer at that point (lr 1e-2 for all three; the same config,
so the same model as the sweep's: the recorded accuracy is checked), then splits the accuracy
on the sweep's own 1000 test sequences by the gap to the query cue's previous occurrence (in
pairs: 1 = the pair just before), for all answered queries and for those at a load of 96 or
more (past d_model = 64 by half).

    PYTHONPATH=src python docs/results/sweeps/fig3-full/probe_recency.py \
        > docs/results/sweeps/fig3-full/probe_recency.md

One thread; ~25 minutes of training on the 2-core Xeon.
"""

import json
from pathlib import Path

import torch

import ttr
from ttr.experiments.mqar import cue_hits
from ttr.experiments.sweep_tasks import MQARRun, run_mqar
from ttr.tasks.mqar import IGNORE, paper_mqar_gaps, paper_mqar_loads

ttr.tune_allocator()
torch.set_num_threads(1)
RUNS = Path(__file__).parent / "runs"
GAPS = [(1, 8), (8, 16), (16, 32), (32, 64), (64, 128), (128, 256)]  # [lo, hi) in pairs


scores = {}
for layer in ("delta_rule", "linear_attention", "rls"):
    path = next(RUNS.glob(f"mqar-{layer}-paper-d64-P128-T512-lr0.01-*.json"))
    record = json.loads(path.read_text())
    run = MQARRun.from_dict(record["config"])
    models = []
    result = run_mqar(run, lambda *a: None, trained=models.append)
    assert result["accuracy"] == record["result"]["accuracy"], (layer, result["accuracy"])
    inputs, targets = run.test_data()  # the same for the three layers
    scores[layer] = cue_hits(models[0], inputs, targets)  # [n, T/2]
answered = targets[:, 0::2] != IGNORE
gap, load = paper_mqar_gaps(inputs, run.num_pairs), paper_mqar_loads(inputs, run.num_pairs)

layers = list(scores)
print("# Recall by recency at fig3's P = 128, T = 512 (d_model = 64; best lr 1e-2 each)\n")
print("Retrained runs, each scoring its recorded accuracy exactly: "
      + ", ".join(f"{n} {scores[n][answered].float().mean().item():.2%}" for n in layers)
      + ". Gap: pairs since the query cue's previous occurrence (1 = the pair just before).\n")
for title, where in (("all answered queries", answered),
                     ("queries at a load of 96 or more", answered & (load >= 96))):
    print(f"## {title}\n")
    print("| gap (pairs) | queries | " + " | ".join(layers) + " |")
    print("|---|---|" + "---|" * len(layers))
    for lo, hi in GAPS:
        sel = where & (gap >= lo) & (gap < hi)
        if int(sel.sum()):
            print(f"| {lo}-{hi - 1} | {int(sel.sum())} | "
                  + " | ".join(f"{scores[n][sel].float().mean().item():.2%}" for n in layers)
                  + " |")
    print(f"| all | {int(where.sum())} | "
          + " | ".join(f"{scores[n][where].float().mean().item():.2%}" for n in layers) + " |\n")

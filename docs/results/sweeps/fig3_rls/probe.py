"""Where fig3's RLS loses recall at P = 128, T = 512: train a run of fig3 (LAYER: rls, ridge 1,
or linear_attention; lr 1e-2, 2000 steps; the same config, so the same model as
docs/results/sweeps/fig3-full), then

1. score its 1000 test sequences as trained (float32, chunk form), in float64, and with the
   parallel form (one exact batched solve per position): do float32 numerics cost recall?
2. split the accuracy on 500 fresh sequences by the memory load of each answered query, the
   distinct cue pairs before it (`paper_mqar_loads`; `paper_mqar_load` is its mean): does recall
   fall where the load passes d_model = 64, as a linear memory's capacity says?

    PYTHONPATH=src python docs/results/sweeps/fig3_rls/probe.py LAYER \
        > docs/results/sweeps/fig3_rls/probe-LAYER.md

One thread, ~10 minutes of training on the 2-core Xeon.
"""

import copy
import dataclasses
import sys

import torch

import ttr
from ttr.experiments.mqar import cue_hits, evaluate
from ttr.experiments.sweep_tasks import MQARRun, run_mqar
from ttr.tasks.mqar import IGNORE, paper_mqar, paper_mqar_loads

ttr.tune_allocator()
torch.set_num_threads(1)
RUN = MQARRun.from_dict(dict(source="recipe", variant="paper", d_model=64, n_heads=1,
                             n_layers=1, mlp=False, layer=sys.argv[1], num_pairs=128, seq_len=512,
                             lr=1e-2, steps=2000, batch_size=64, n_test=1000))
BUCKETS = [(0, 32), (32, 64), (64, 80), (80, 96), (96, 112), (112, 129)]
AS_TRAINED = "float32, chunk (as trained)"

scores, trained = {}, []
result = run_mqar(RUN, lambda *a: None, trained=trained.append)
model = trained[0]
test = RUN.test_data()  # the 1000 sequences the result scores
for name, dtype, form in (("float64, chunk", torch.float64, None),
                          ("float32, parallel", torch.float32, "parallel"),
                          ("float64, parallel", torch.float64, "parallel")):
    m = copy.deepcopy(model).to(dtype)
    if form:
        m.mixer.config = dataclasses.replace(m.mixer.config, form=form)
    scores[name] = evaluate(m, *test)
scores[AS_TRAINED] = evaluate(model, *test)
assert scores[AS_TRAINED] == result["accuracy"], "the probe scores another model than the run's"
print(f"# {RUN.layer} at P = 128, T = 512 (fig3's run, lr 1e-2): recorded accuracy "
      f"{result['accuracy']:.4%}\n")
print("| scored as | accuracy |\n|---|---|")
for name in sorted(scores, key=lambda n: n != AS_TRAINED):
    print(f"| {name} | {scores[name]:.4%} |")

inputs, targets = paper_mqar(500, RUN.seq_len, RUN.num_pairs, torch.Generator().manual_seed(123))
right = cue_hits(model, inputs, targets)  # [n, T/2] at the cues
answered = targets[:, 0::2] != IGNORE
load = paper_mqar_loads(inputs, RUN.num_pairs)  # [n, T/2]
print(f"\nAccuracy by memory load (500 fresh sequences; d_model = {RUN.d_model}):\n")
print("| distinct cue pairs before the query | queries | accuracy |\n|---|---|---|")
for lo, hi in BUCKETS:
    sel = answered & (load >= lo) & (load < hi)
    print(f"| {lo}-{hi - 1} | {int(sel.sum())} | {right[sel].float().mean().item():.2%} |")
print(f"| all | {int(answered.sum())} | {right[answered].float().mean().item():.2%} |")

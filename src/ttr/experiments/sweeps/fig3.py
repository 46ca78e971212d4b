"""Paper Fig. 3 (Section 6) at full scale: one layer with a length-2 key conv, d_model = D_k =
64, paper variant; P in {64, 128}, one model per T in {128, 256, 512, 1024} (T >= 2P) and lr
in {1e-3, 3e-3, 1e-2, 3e-2}, 2000 steps of 64 sequences, 1000 test sequences; layers linear
attention, RLS, delta rule (L2-normalized keys and queries, as DeltaNet's), softmax attention
and local linear attention (p = 1). 140 runs. quick: P = 64, T = 256, lr 1e-2, 500 steps of 32.

Cost, measured (session 13, one thread per run, the 2-core Xeon with a second job on the other
core), seconds per training step at P = 128, T = 1024: linear attention 0.53, delta rule 0.85,
RLS 0.94, softmax attention 1.8, local linear attention 13.9 before this session's changes to
its forward (its O(T^2 D^2) per-query second moments: 64 sequences x 1024^2 pairs x 64^2 per
step; the op's forward + backward at that size went 11.2 -> 7.4 s, uncontended, and in
session 14 by another ~25%: 13.2 -> 9.8 s on one thread beside a sweep). So a T = 1024
run takes 0.3-1 hour for the first four layers and ~4-5 hours for local linear attention; in
all about 30 core-hours for the first four layers and ~50 for local linear attention, ~35 of
them its eight T = 1024 runs. The runs go cheapest first (the set of runs, and so their ids,
does not depend on the order): a partial sweep holds the whole figure for the four fast layers
before local linear attention's long runs.
"""

from ttr.experiments.mqar import LAYERS

NAME = "fig3"


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

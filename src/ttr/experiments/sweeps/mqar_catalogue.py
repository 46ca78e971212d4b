"""Every catalogue entry on MQAR, both data variants, over d_model x (pairs, T) x lr.

zoology variant (Arora et al. 2023): 2 pre-norm blocks (mixer + gated MLP), 2 heads, keys and
values from a 128-token vocabulary (64 for the quick point), T >= 4P; entries without their own
key conv get the paper's length-2 key conv, as in the paper variant (see CAVEATS).
paper variant (Section 6): one block, one head, no MLP, the entry's own short convs (a length-2
key conv added where it has none), the 2P-token vocabulary.

The zoology points are below capacity (P << d_model) and test whether a layer learns the
association at all; the paper points put P at d_model or above it, where Section 6 says the
optimizer matters (linear attention's outer-product memory saturates, RLS's does not). P
counts the pairs the task can draw, not those a query's memory holds: drawn with replacement,
14.8 distinct cue pairs precede an answered query on average at P = 32, T = 64, and 29.4 at
P = 64, T = 128 (`ttr.tasks.mqar.paper_mqar_load`; see CAVEATS).

quick: one grid point per variant -- zoology d_model 64, P = 8, T = 64; paper d_model 32,
P = 32, T = 64 -- with 300 steps of 32 sequences and lr in {3e-3, 1e-2}: 33 entries x 2
variants x 2 lrs = 132 runs; measured 48 minutes on 2 cores while two language-model
trainings shared them, and 24 min 22 s on 2 otherwise idle cores of an AVX2 AMD EPYC
(session 12, `-j 2 --threads 1`), results in docs/results/sweeps/mqar_catalogue-quick.
full: d_model in {32, 64, 128} x lr in {1e-3, 3e-3, 1e-2} x 600 steps; zoology (P, T) in
{(8, 64), (16, 128)}, paper (P, T) in {(32, 64), (64, 128)}: 1188 runs, one thread each, two
workers on 2 cores. Compute, measured (per-run seconds summed over the finished sweep, sessions
8-15, on three kinds of CPU: the Intel Xeon and the AMD EPYCs of sessions 8, 11 and 12, whose
fp32 matmuls are ~3x slower; the seconds include minutes paused by SIGSTOP during benchmarks):
  - d_model 32: zoology 2.1 core-hours (median 28 s a run), paper 1.4 (median 15 s);
  - d_model 64: zoology 6.9 (median 74 s), paper 2.1 (median 23 s); the entries' median runs
    range from 14 s (softmax attention) to 400 s (titans);
  - d_model 128: zoology 14.4 (mostly on the EPYCs; mesanet up to 3347 s a run), paper 6.0
    (the Xeon; titans a median 1154 s a run, most entries 14-76 s);
  - in all 33.0 core-hours, ~17 hours on 2 cores. The slowest entries are titans, ttt_mlp,
    mesanet and local_linear (their one-thread steps at d_model 128, T = 128: 0.5-2.3 s
    against 76-310 ms for most).
It resumes, so it runs in pieces, in the order below; the finished runs are in
docs/results/sweeps/mqar_catalogue-full.
"""

from ttr import catalog

NAME = "mqar_catalogue"

# Shown at the top of the leaderboard (`ttr report`).
CAVEATS = [
    "zoology variant: every entry without its own short key conv gets the paper's length-2 "
    "key conv (Eq. 56-58), as in the paper variant (not hgrn2, whose keys are its forget "
    "gates: it has no key projection to convolve). Before session 10 the zoology runs were "
    "made without it and measured having a conv more than the design choices (at d_model 64 "
    "the 12 entries with their own conv reached 84-100%, 18 of the 21 without one 12-16%; "
    "softmax attention 12.3% as swept, 15.6% with RoPE, 12.9% with 5x the steps, 100% with "
    "the conv); those runs were deleted and rerun with the conv.",
    "paper variant, one head: Mamba-2's decay initialization (A ~ U[1, 16], Delta log-uniform "
    "on [1e-3, 1e-1]) draws one timescale per head, so a one-head layer lives with one draw. "
    "gated_deltanet at d_model 64, P = 64, T = 128 drew A = 11.1, Delta = 0.092: a decay of "
    "0.36 per step, which forgets within a few tokens; it never learned there (loss ln 64 at "
    "every learning rate), while at P = 32 it drew a decay of 0.984 per step and reached 100%. "
    "Entries with MambaDecay (gated_deltanet, mamba2) rank by their draw at such points.",
    "paper variant, memory load: its pairs are drawn with replacement, so an answered query's "
    "memory holds on average fewer distinct cue pairs than P: 14.8 at P = 32 (T = 64), 29.4 "
    "at P = 64 (T = 128), below d_model at every point, d_model 32 included. Above d_model are the "
    "vocabulary (2P tokens) and the stored keys once the response -> next-cue transitions, as "
    "many again, are counted; a key map can learn to silence those.",
    "the training budget (600 steps of 32 sequences; 300 in the quick configuration) is far "
    "below zoology's own, so entries that need longer training rank lower than they would "
    "there.",
]


def runs(quick: bool) -> list[dict]:
    if quick:
        grids = {"zoology": [(64, 8, 64)], "paper": [(32, 32, 64)]}
        lrs, steps, vocab = (3e-3, 1e-2), 300, 64
    else:
        grids = {v: [(d, p, t) for d in (32, 64, 128) for p, t in pts]
                 for v, pts in (("zoology", ((8, 64), (16, 128))),
                                ("paper", ((32, 64), (64, 128))))}
        lrs, steps, vocab = (1e-3, 3e-3, 1e-2), 600, 128
    out = []
    for variant, grid in grids.items():
        model = (dict(n_layers=2, mlp=True, n_heads=2, vocab_size=vocab) if variant == "zoology"
                 else dict(n_layers=1, mlp=False, n_heads=1))
        for name in catalog.names():
            for d, p, t in grid:
                for lr in lrs:
                    out.append(dict(task="mqar", layer=name, variant=variant, d_model=d,
                                    num_pairs=p, seq_len=t, lr=lr, steps=steps, **model))
    # Run order (not the set of runs, so finished runs keep their ids): the full sweep takes
    # many sessions, so d_model 64 of both variants comes first, then 128, then 32 -- a partial
    # sweep then holds whole design-space slices instead of one variant's first entries.
    first = {64: 0, 128: 1, 32: 2}
    return sorted(out, key=lambda r: first.get(r["d_model"], 3))

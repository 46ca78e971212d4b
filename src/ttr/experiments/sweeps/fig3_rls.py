"""An ablation of fig3 at its one surprise: at P = 128 > d_model = 64 and T = 512, RLS (exact
ridge least squares, Eq. 11, ridge 1) recalled 92.3% at its best learning rate, below linear
attention's 94.6%, where the paper's Fig. 3 has RLS solving MQAR at every T.

Two candidate causes, each varied alone at fig3's point and best learning rate (1e-2 for both
layers), everything else as fig3 (`ttr.experiments.sweeps.fig3`):
- the ridge: 0.01 and 0.1 beside fig3's 1 (the ridge is a prior on the memory M, not decayed:
  Eq. 11 adds ridge ||M||^2 to a sum over the T / 2 pairs; the keys' scale is learned, so the
  model can shrink its effect, but only against the weight decay);
- the training length: 4000 steps beside fig3's 2000, for RLS and linear attention alike (if
  both gain, the gap is one of training, not of the layer).
The ridge = 1, 2000-step runs repeat fig3's (ridge 1 is fig3's default; the result must be
the same to the last digit, a check of the sweep's determinism). 6 runs: 1.08 core-hours
(session 17, one worker beside the two of the fig3 sweep on the 2-core Xeon).
quick: the same at P = 8, T = 32, d_model = 8, 200 steps.
"""

NAME = "fig3_rls"


def runs(quick: bool) -> list[dict]:
    one = dict(task="mqar", source="recipe", variant="paper", d_model=64, n_heads=1,
               n_layers=1, mlp=False, num_pairs=128, seq_len=512, lr=1e-2, batch_size=64,
               n_test=1000)
    if quick:
        one.update(d_model=8, num_pairs=8, seq_len=32, batch_size=32, n_test=64)
    steps = 200 if quick else 2000
    return [dict(one, layer="linear_attention", steps=steps),
            dict(one, layer="linear_attention", steps=2 * steps),
            *(dict(one, layer="rls", ridge=r, steps=steps) for r in (1.0, 0.1, 0.01)),
            dict(one, layer="rls", ridge=1.0, steps=2 * steps)]

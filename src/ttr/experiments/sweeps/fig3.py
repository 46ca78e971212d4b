"""Paper Fig. 3 (Section 6) at full scale: one layer with a length-2 key conv, d_model = D_k =
64, paper variant; P in {64, 128}, one model per T in {128, 256, 512, 1024} (T >= 2P) and lr
in {1e-3, 3e-3, 1e-2, 3e-2}, 2000 steps of 64 sequences, 1000 test sequences; layers linear
attention, RLS, delta rule, softmax attention and local linear attention (p = 1).
The paper's protocol; ~10 hours on 2 cores (measured ~4 us per token fwd+bwd for linear
attention, ~9 us for chunked RLS; local linear attention is several times slower), minutes on
a GPU. quick: P = 64, T = 256, lr 1e-2, 500 steps of 32."""

from ttr.experiments.mqar import LAYERS

NAME = "fig3"


def runs(quick: bool) -> list[dict]:
    one = dict(task="mqar", source="recipe", variant="paper", d_model=64, n_heads=1,
               n_layers=1, mlp=False)
    if quick:
        return [dict(one, layer=layer, num_pairs=64, seq_len=256, lr=1e-2, steps=500)
                for layer in LAYERS]
    return [dict(one, layer=layer, num_pairs=p, seq_len=t, lr=lr, steps=2000, batch_size=64,
                 n_test=1000)
            for layer in LAYERS for p in (64, 128) for t in (128, 256, 512, 1024)
            for lr in (1e-3, 3e-3, 1e-2, 3e-2) if t >= 2 * p]

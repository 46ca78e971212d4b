"""Paper Fig. 2 (Section 5) at full scale: linear attention, RLS, softmax attention (p = 0),
local linear attention (p = 1), kernel ridge regression and unnormalized softmax (Eq. 43, 47)
and the naive forecaster on the switching AR process, T = 256, d = 64, 512 sequences (quick:
32), one run per method."""

from ttr.experiments.online_regression import METHODS

NAME = "fig2"


def runs(quick: bool) -> list[dict]:
    return [dict(task="online_regression", source="paper", method=m, variant="switch",
                 seeds=32 if quick else 512)
            for m, fn in METHODS.items() if fn is not None]

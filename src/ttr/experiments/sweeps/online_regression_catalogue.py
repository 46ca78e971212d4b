"""Every catalogue entry, frozen (identity projections, gates at their resting values; see
`ttr.experiments.sweep_tasks`), and the paper's Fig. 2 methods on the Section 5 task, in three
variants: the paper's switching AR process, a stationary one and one with noisy values.

quick: 32 sequences per run; full: 512 (standard errors 4x smaller). 38 methods x 3 variants =
114 runs; a few minutes either way.
"""

from ttr import catalog
from ttr.experiments.online_regression import METHODS
from ttr.experiments.sweep_tasks import REGRESSION_VARIANTS

NAME = "online_regression_catalogue"


def runs(quick: bool) -> list[dict]:
    seeds = 32 if quick else 512
    methods = [("paper", m) for m, fn in METHODS.items() if fn is not None]
    methods += [("catalog", name) for name in catalog.names()]
    return [dict(task="online_regression", source=source, method=method, variant=variant,
                 seeds=seeds)
            for variant in REGRESSION_VARIANTS for source, method in methods]

"""The experiments `ttr sweep NAME` runs: each module defines `runs(quick) -> list[dict]` (one
dict per run: "task" plus that task's config fields, `ttr.experiments.sweep_tasks`).
A registry by name, not import strings; a user's own experiment is a .py file with the same
`runs` function, passed to `ttr sweep` by path."""

from ttr.experiments.sweeps import (
    fig2,
    fig3,
    fig3_rls,
    mqar_catalogue,
    online_regression_catalogue,
)

EXPERIMENTS = {"mqar_catalogue": mqar_catalogue,
               "online_regression_catalogue": online_regression_catalogue,
               "fig2": fig2, "fig3": fig3, "fig3_rls": fig3_rls}

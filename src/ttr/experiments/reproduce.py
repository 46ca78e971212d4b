"""`ttr reproduce`: the paper's two experiments, then `report.md`, all in one directory.

    online regression (Section 5, Fig. 2)  -> online_regression{.csv,_summary.csv,.png}
    MQAR              (Section 6, Fig. 3)  -> mqar.csv, mqar.png
    report                                  -> report.md (plots, tables, claims vs measurement)

Quick mode (the default) uses `OnlineRegressionConfig.quick()` and `MQARConfig.quick()`;
`full=True` the `.full()` configurations (more sequences, the paper's MQAR protocol). `variant`
picks the MQAR preset and `seed` replaces the seed of both configurations, so one seed fixes
the whole run.
"""

from __future__ import annotations

import dataclasses
import shlex
import time
from pathlib import Path

from ttr.experiments import mqar, online_regression
from ttr.experiments.report import write_report


def command_line(out_dir: Path, full: bool, seed: int, variant: str) -> str:
    """The `ttr` command that reproduces these arguments."""
    args = ["ttr", "reproduce", "--out", str(out_dir), "--seed", str(seed),
            "--variant", variant] + (["--full"] if full else [])
    return shlex.join(args)


def reproduce(out_dir: Path, full: bool = False, seed: int = 0, variant: str = "paper",
              progress: bool = True) -> Path:
    """Run both experiments into `out_dir` and write the report; returns its path."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
    if variant not in mqar.VARIANTS:
        raise ValueError(f"variant: expected one of {list(mqar.VARIANTS)}, got {variant!r}")
    out_dir = Path(out_dir)
    mode = "full" if full else "quick"
    # Build both configurations first, so that a bad seed or variant fails before any work.
    online_cfg = getattr(online_regression.OnlineRegressionConfig, mode)()
    online_cfg = dataclasses.replace(online_cfg, seed=seed)
    mqar_cfg = dataclasses.replace(getattr(mqar.MQARConfig, mode)(variant), seed=seed)

    start = time.perf_counter()
    online = online_regression.run(online_cfg, out_dir, progress=progress)
    t_online = time.perf_counter() - start
    rows = mqar.run(mqar_cfg, out_dir, progress=progress)
    t_mqar = time.perf_counter() - start - t_online
    seconds = {"total": time.perf_counter() - start, "online regression": t_online,
               "MQAR": t_mqar}
    report = write_report(out_dir, command=command_line(out_dir, full, seed, variant),
                          mode=mode, seed=seed, variant=variant, seconds=seconds,
                          online=online, mqar_rows=rows, mqar_config=mqar_cfg)
    files = sorted(p.name for p in out_dir.iterdir() if p.is_file())
    print(f"ttr: results in {out_dir}/ ({', '.join(files)}); open {report}")
    return report

"""`ttr report RESULTS_DIR`: the leaderboard of a sweep (`ttr.sweep`), as Markdown, CSV and PNG.

Written into RESULTS_DIR:
  leaderboard.md         the command, run count and compute time; per MQAR variant a table with
                         one row per layer -- its three design choices (weights, function
                         class, optimizer), recurrent state size and best-lr accuracy at every
                         grid point; per online-regression variant the mean loss per phase;
                         and a design-axis table per part: for each value of each axis, the
                         layers that take it and their mean and best score, which is where one
                         reads which choice moves recall; for MQAR also per grid point (where
                         the choices matter: below or above capacity).
  mqar.csv, regression.csv   the same numbers, one row per (layer, grid point).
  mqar_vs_T.png          accuracy vs T, one panel per (variant, P) (only if T varies per P)
  mqar_vs_d.png          accuracy vs d_model, one panel per (variant, P, T) (if d varies)
  mqar_vs_state.png      accuracy vs recurrent state size (zoology's recall-vs-memory plot)
  regression_<variant>.png  loss vs t, one line per layer, families by colour.

MQAR scores are the best test accuracy over the learning rates of a grid point, as zoology
reports them. In a partial sweep a point some of whose learning rates are still to run is
marked, and the layers' means (and the axis table built on them) are taken over the points
every layer has finished, so that a layer missing the harder points does not rank higher.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import textwrap
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

from ttr.experiments.report import markdown_table
from ttr.sweep import finished

AXES = ("weights", "function class", "optimizer")
# The paper's Fig. 2 / Fig. 3 layers that are bare recipes rather than catalogue entries.
RECIPE_CHOICES = {
    "linear_attention": ("uniform", "linear", "1 GD step from 0", "linear attention"),
    "rls": ("uniform", "linear", "exact", "exact second order"),
    "delta_rule": ("uniform", "linear", "online SGD", "online SGD"),
    "softmax": ("local", "local polynomial p=0", "exact", "nonparametric"),
    "local_linear": ("local", "local polynomial p=1", "exact", "nonparametric"),
    "kernel_regression": ("uniform", "kernel", "exact", "nonparametric"),
    "unnormalized_softmax": ("uniform", "kernel", "1 GD step from 0", "nonparametric"),
    "naive": ("-", "-", "-", "baseline"),
}
FAMILY_COLORS = {"linear attention": "tab:blue", "geometric decay": "tab:orange",
                 "online SGD": "tab:green", "exact second order": "tab:red",
                 "nonparametric": "tab:purple", "baseline": "tab:gray"}


def choices(layer: str, source: str) -> dict:
    """The layer's design choices, coarsened to the axis values (no hyperparameters)."""
    if source == "catalog":
        from ttr import catalog

        row = catalog.describe(layer)
        coarse = {a: row[a].split(" (")[0] for a in AXES}
        return {**coarse, "family": row["family"]}
    w, f, o, family = RECIPE_CHOICES[layer]
    return {"weights": w, "function class": f, "optimizer": o, "family": family}


def _name(record: dict) -> str:
    c = record["config"]
    layer = c.get("layer") or c.get("method")
    return layer if c["source"] == "catalog" else f"{layer} ({c['source']})"


def _mqar_key(record: dict) -> tuple:
    c = record["config"]
    return (_name(record), c["variant"], c["d_model"], c["num_pairs"], c["seq_len"])


def mqar_rows(records: list[dict], planned: list[dict] | None = None) -> list[dict]:
    """One row per (layer, variant, d_model, P, T): the best accuracy over learning rates.

    planned: the sweep's MQAR run records-to-be ({"config": ...}), if known; a row is then
    `complete` when every run planned at its point has finished (else its best is over the
    learning rates finished so far). Without a plan every row counts as complete."""
    best: dict[tuple, dict] = {}
    done: dict[tuple, int] = defaultdict(int)
    for r in records:
        c, res = r["config"], r["result"]
        key = _mqar_key(r)
        done[key] += 1
        if key not in best or res["accuracy"] > best[key]["accuracy"]:
            best[key] = dict(layer=key[0], source=c["source"], variant=key[1], d_model=key[2],
                             num_pairs=key[3], seq_len=key[4], accuracy=res["accuracy"],
                             lr=c["lr"], state_floats=res["state_floats"],
                             params=res["params"], chance=res["chance"],
                             **choices(c["layer"], c["source"]))
    want: dict[tuple, int] = defaultdict(int)
    for r in planned or ():
        want[_mqar_key(r)] += 1
    for key, row in best.items():
        row["complete"] = planned is None or done[key] >= want[key]
    return sorted(best.values(), key=lambda x: (x["variant"], x["layer"], x["d_model"],
                                                x["num_pairs"], x["seq_len"]))


def regression_rows(records: list[dict]) -> list[dict]:
    rows = []
    for r in records:
        c, res = r["config"], r["result"]
        rows.append(dict(layer=_name(r), source=c["source"], variant=c["variant"],
                         seeds=c["seeds"], **{k: res[k] for k in (
                             "first_quarter", "first_quarter_stderr", "rest", "rest_stderr",
                             "all", "all_stderr", "raw_first_quarter", "raw_rest")},
                         curve=res["loss_mean"], raw_curve=res["raw_loss_mean"],
                         **choices(c["method"], c["source"])))
    return sorted(rows, key=lambda x: (x["variant"], _sort_loss(x["all"])))


def _sort_loss(x):
    return float("inf") if x is None else x


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _loss(x, se=None) -> str:
    if x is None:
        return "diverged"
    return f"{x:.3f}" if se is None else f"{x:.3f} ± {se:.3f}"


def _axis_table(rows: list[dict], score: str, higher_better: bool, fmt) -> str:
    """Per axis value: how many layers take it, their mean and best score, the best layer."""
    out = []
    for axis in AXES:
        groups = defaultdict(list)
        for r in rows:
            if r[score] is not None and r["family"] != "baseline":
                groups[r[axis]].append(r)
        for value, rs in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            vals = [r[score] for r in rs]
            best = (max if higher_better else min)(rs, key=lambda r: r[score])
            out.append([axis, value, len(rs), fmt(statistics.mean(vals)),
                        fmt(statistics.median(vals)), f"{best['layer']} ({fmt(best[score])})"])
    return markdown_table(["axis", "choice", "layers", "mean", "median", "best layer"], out)


def _mqar_section(rows: list[dict]) -> list[str]:
    lines = []
    for variant in sorted({r["variant"] for r in rows}):
        vr = [r for r in rows if r["variant"] == variant]
        points = sorted({(r["d_model"], r["num_pairs"], r["seq_len"]) for r in vr})
        per_layer = defaultdict(dict)
        for r in vr:
            per_layer[r["layer"]][r["d_model"], r["num_pairs"], r["seq_len"]] = r
        # a layer's mean is over the grid points that every layer has finished, so that no
        # layer's mean leaves out the harder points the others are scored on
        common = [p for p in points
                  if all(p in pts and pts[p]["complete"] for pts in per_layer.values())]
        scored = common or points
        mean = {layer: statistics.mean(pts[p]["accuracy"] for p in scored if p in pts)
                for layer, pts in per_layer.items() if any(p in pts for p in scored)}
        table = []
        for layer in sorted(per_layer, key=lambda n: -mean.get(n, -1.0)):
            pts = per_layer[layer]
            first = next(iter(pts.values()))
            state = pts[points[0]]["state_floats"] if points[0] in pts else first["state_floats"]
            table.append([layer, first["family"], *(first[a] for a in AXES), f"{state:,}",
                          *(_cell(pts.get(p)) for p in points),
                          _pct(mean[layer]) if layer in mean else "-"])
        chance = vr[0]["chance"]
        if len(common) == len(points):
            over = "the grid points"
        elif common:
            over = (f"the {len(common)} of {len(points)} grid points that every layer has "
                    f"finished ({', '.join(_point(p) for p in common)})")
        else:
            over = ("each layer's own grid points (no point has finished for every layer yet, "
                    "so these means are not comparable)")
        partial = any(not r["complete"] for r in vr)
        lines += [f"### MQAR, {variant} variant", "",
                  f"Best accuracy over learning rates (chance {_pct(chance)}); state size in "
                  f"floats per sequence at the first grid point; mean over {over}; layers by "
                  "mean accuracy." + (" `*`: not every learning rate of that point has "
                                      "finished yet." if partial else ""), "",
                  markdown_table(["layer", "family", *AXES, "state",
                                  *(_point(p) for p in points), "mean"], table), "",
                  f"Design axes ({variant}): the layers' means above, averaged over the layers "
                  "taking each choice.", "",
                  _axis_table([dict(per_layer[n][next(iter(per_layer[n]))], accuracy=mean[n])
                               for n in mean], "accuracy", True, _pct), "",
                  f"Design axes ({variant}) by grid point: mean accuracy of the layers taking "
                  "each choice that have finished the point (their count in brackets when "
                  "not all of them have).", "",
                  _axis_by_point(per_layer, points), ""]
    return lines


def _point(p: tuple) -> str:
    return f"d={p[0]} P={p[1]} T={p[2]}"


def _cell(row: dict | None) -> str:
    if row is None:
        return "-"
    return _pct(row["accuracy"]) + ("" if row["complete"] else "*")


def _axis_by_point(per_layer: dict, points: list) -> str:
    """Rows: each value of each axis; columns: grid points; cells: the mean best accuracy of
    the (non-baseline) layers with that value whose runs at the point have all finished."""
    out = []
    for axis in AXES:
        groups = defaultdict(list)
        for pts in per_layer.values():
            first = next(iter(pts.values()))
            if first["family"] != "baseline":
                groups[first[axis]].append(pts)
        for value, members in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            cells = []
            for p in points:
                accs = [pts[p]["accuracy"] for pts in members if p in pts and pts[p]["complete"]]
                cells.append("-" if not accs else _pct(statistics.mean(accs))
                             + ("" if len(accs) == len(members) else f" ({len(accs)})"))
            out.append([axis, value, len(members), *cells])
    return markdown_table(["axis", "choice", "layers", *(_point(p) for p in points)], out)


def _regression_section(rows: list[dict]) -> list[str]:
    lines = []
    for variant in sorted({r["variant"] for r in rows}):
        vr = [r for r in rows if r["variant"] == variant]
        table = [[r["layer"], r["family"], *(r[a] for a in AXES),
                  _loss(r["first_quarter"], r["first_quarter_stderr"]),
                  _loss(r["rest"], r["rest_stderr"]), _loss(r["all"], r["all_stderr"]),
                  _loss(r["raw_first_quarter"]), _loss(r["raw_rest"])] for r in vr]
        lines += [f"### Online regression, {variant} variant ({vr[0]['seeds']} sequences)", "",
                  "Mean |v_{t+1} - y_t/|y_t||^2 per phase (t <= T/4, t > T/4, all) ± standard "
                  "error over sequences; `raw` is the unnormalized prediction's loss (the "
                  "paper's Fig. 2 scores its methods raw). Lower is better; sorted by the "
                  "whole-sequence loss.", "",
                  markdown_table(["layer", "family", *AXES, "t <= T/4", "t > T/4", "all",
                                  "raw t <= T/4", "raw t > T/4"], table), "",
                  f"Design axes ({variant}): whole-sequence loss.", "",
                  _axis_table(vr, "all", False, _loss), ""]
    return lines


def _write_csv(path: Path, rows: list[dict], drop=("curve", "raw_curve")) -> None:
    cols = [k for k in rows[0] if k not in drop]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def _figure(n_panels: int, width: float = 4.6, height: float = 3.6):
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    cols = min(n_panels, 3)
    rows = -(-n_panels // cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n_panels:]:  # the grid's unused cells: no empty frames
        ax.remove()
    return fig, axes[:n_panels]


# Recall plots name only the layers below this accuracy: at the top dozens of names overlap
# into an unreadable bar, and those layers are in the leaderboard's table anyway.
LABEL_BELOW = 0.97


LABEL_GAP = 0.035  # height of a name, in axes fractions (6 pt text on a ~250 pt high axis)


def _place_labels(ax, labels: list[tuple[str, float, float]]) -> None:
    """Name the points (name, x, y) of one panel without overlapping names. Call it once the
    panel's scales and limits are set. Each name goes right of its point, at the nearest
    height (stepping by LABEL_GAP up, then down) where its box, estimated from its length,
    clears the names placed before it, lowest points first; a moved name gets a thin line to
    its point. Written at the points themselves, the layers that failed together (a dozen near
    chance at one d_model, or at one state size) overprinted into one unreadable block."""
    to_axes = ax.transData + ax.transAxes.inverted()
    box = ax.get_window_extent()
    char = 3.3 * ax.figure.dpi / 72 / max(box.width, 1.0)  # a 6 pt character, axes fraction
    pad = 4 * ax.figure.dpi / 72 / max(box.width, 1.0)  # the name starts 4 pt right
    placed: list[tuple[float, float, float]] = []  # (x0, x1, y) of the names so far

    def free(x0, x1, y):
        return all(x1 <= a or x0 >= b or abs(y - c) >= LABEL_GAP for a, b, c in placed)

    steps = [k for j in range(40) for k in ((j, -j) if j else (0,))]  # 0, 1, -1, 2, -2, ...
    for name, x, y in sorted(labels, key=lambda t: (t[2], t[1])):
        fx, fy = to_axes.transform((x, y))
        x0, x1 = fx + pad, fx + pad + char * len(name)
        ty = next((fy + k * LABEL_GAP for k in steps
                   if 0.0 <= fy + k * LABEL_GAP <= 1.0 and free(x0, x1, fy + k * LABEL_GAP)),
                  fy)
        placed.append((x0, x1, ty))
        moved = abs(ty - fy) > 1e-9
        ax.annotate(name, (x, y), xytext=(x0, ty), textcoords="axes fraction",
                    fontsize=6, alpha=0.8, ha="left", va="center", annotation_clip=False,
                    arrowprops=dict(arrowstyle="-", lw=0.4, alpha=0.5,
                                    shrinkA=0, shrinkB=2) if moved else None)


def _note_unlabelled(ax) -> None:
    """Say which layers carry names, under the axis (inside it the note sat on the names of
    the layers near 0)."""
    ax.set_xlabel(f"{ax.get_xlabel()}   (named: layers below {LABEL_BELOW:.0%})")


def _legend(fig, axes) -> None:
    handles = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, h)
    fig.legend(handles.values(), handles.keys(), loc="outside right upper", fontsize=7)


def plot_mqar(rows: list[dict], out_dir: Path) -> list[Path]:
    from matplotlib.ticker import NullFormatter

    written = []
    panels = sorted({(r["variant"], r["num_pairs"]) for r in rows})
    varies_t = any(len({r["seq_len"] for r in rows if (r["variant"], r["num_pairs"]) == p}) > 1
                   for p in panels)
    if varies_t:  # accuracy vs T per P, at the largest d_model
        fig, axes = _figure(len(panels))
        for ax, (variant, P) in zip(axes, panels, strict=False):
            sel = [r for r in rows if (r["variant"], r["num_pairs"]) == (variant, P)]
            d = max(r["d_model"] for r in sel)
            for layer in sorted({r["layer"] for r in sel}):
                pts = sorted((r["seq_len"], r["accuracy"], r["family"]) for r in sel
                             if r["layer"] == layer and r["d_model"] == d)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=layer)
            ax.set_xscale("log", base=2)
            ax.set(title=f"{variant}, P = {P}, d_model = {d}", xlabel="T",
                   ylabel="accuracy (best lr)", ylim=(-0.02, 1.02))
            ax.grid(alpha=0.3)
        _legend(fig, axes)
        written.append(out_dir / "mqar_vs_T.png")
        fig.savefig(written[-1], dpi=110)
    points = sorted({(r["variant"], r["num_pairs"], r["seq_len"]) for r in rows})
    if any(len({r["d_model"] for r in rows if (r["variant"], r["num_pairs"], r["seq_len"])
                == point}) > 1 for point in points):
        fig, axes = _figure(len(points))
        for ax, point in zip(axes, points, strict=False):
            sel = [r for r in rows if (r["variant"], r["num_pairs"], r["seq_len"]) == point]
            seen = set()  # legend by family; the layers below LABEL_BELOW named at their lowest
            # point (where the line stands apart from the crowd at the top)
            labels = []
            for layer in sorted({r["layer"] for r in sel}):
                pts = sorted((r["d_model"], r["accuracy"]) for r in sel if r["layer"] == layer)
                fam = next(r["family"] for r in sel if r["layer"] == layer)
                ax.plot(*zip(*pts, strict=True), marker="o", alpha=0.8,
                        label=fam if fam not in seen else "_nolegend_",
                        color=FAMILY_COLORS.get(fam))
                seen.add(fam)
                low = min(pts, key=lambda p: p[1])
                if low[1] < LABEL_BELOW:
                    labels.append((layer, *low))
            ax.set_xscale("log", base=2)
            ds = sorted({r["d_model"] for r in sel})
            ax.set_xticks(ds, [str(d) for d in ds])
            ax.set(title="{}, P = {}, T = {}".format(*point), xlabel="d_model",
                   ylabel="accuracy (best lr)", ylim=(-0.02, 1.02))
            ax.grid(alpha=0.3)
            _place_labels(ax, labels)
            _note_unlabelled(ax)
        _legend(fig, axes)
        written.append(out_dir / "mqar_vs_d.png")
        fig.savefig(written[-1], dpi=110)
    fig, axes = _figure(len(points))
    for ax, point in zip(axes, points, strict=False):  # zoology's recall vs memory
        sel = [r for r in rows if (r["variant"], r["num_pairs"], r["seq_len"]) == point]
        for fam in sorted({r["family"] for r in sel}):
            fs = [r for r in sel if r["family"] == fam]
            ax.scatter([r["state_floats"] for r in fs], [r["accuracy"] for r in fs], s=18,
                       label=fam, color=FAMILY_COLORS.get(fam))
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # 2x10^4, 3x10^4, ... ran together
        ax.set(title="{}, P = {}, T = {}".format(*point), xlabel="recurrent state (floats)",
               ylabel="accuracy (best lr)", ylim=(-0.02, 1.05))
        ax.grid(alpha=0.3)
        _place_labels(ax, [(r["layer"], r["state_floats"], r["accuracy"]) for r in sel
                           if r["accuracy"] < LABEL_BELOW])
        _note_unlabelled(ax)
    _legend(fig, axes)
    written.append(out_dir / "mqar_vs_state.png")
    fig.savefig(written[-1], dpi=110)
    return written


def plot_regression(rows: list[dict], out_dir: Path) -> list[Path]:
    """Per variant: the direction-normalized loss (left) and the raw loss as the paper's Fig. 2
    scores it (right; curves above OFF_CHART, the unnormalized outputs, are left out)."""
    from ttr.experiments.online_regression import OFF_CHART

    written = []
    for variant in sorted({r["variant"] for r in rows}):
        vr = [r for r in rows if r["variant"] == variant]
        fig, axes = _figure(2, width=6.5, height=5)
        for ax, key, ylabel in ((axes[0], "curve", "|v_{t+1} - y_t/|y_t||^2"),
                                (axes[1], "raw_curve", "|v_{t+1} - y_t|^2 (raw)")):
            off = []
            for r in vr:
                curve = [x if x is not None and math.isfinite(x) else math.nan
                         for x in r[key]]
                if key == "raw_curve" and not max(curve, default=0) <= OFF_CHART:
                    off.append(r["layer"])
                    continue
                paper = r["source"] == "paper"
                # few lines: a colour each; many: a colour per family
                color = FAMILY_COLORS.get(r["family"]) if len(vr) > 10 else None
                ax.plot(range(1, len(curve) + 1), curve, lw=2.0 if paper else 0.9,
                        ls="-" if paper else "--", color=color, label=r["layer"], alpha=0.9)
            if variant != "stationary":
                ax.axvline(len(vr[0]["curve"]) // 4, color="k", lw=0.8, ls=":")
            if off:  # wrapped by hand: matplotlib's wrap=True let it run into the next panel
                ax.text(0.99, 0.01, textwrap.fill("off the chart: " + ", ".join(off), 60),
                        fontsize=6, transform=ax.transAxes, ha="right", va="bottom")
            ax.set_yscale("log")
            ax.set(xlabel="t", ylabel=f"{ylabel} (mean over sequences)")
            ax.grid(alpha=0.3)
        how = "colour: family; " if len(vr) > 10 else ""
        fig.suptitle(f"online regression, {variant} variant ({how}solid: paper methods; "
                     f"dotted: the switch)")
        _legend(fig, axes)
        written.append(out_dir / f"regression_{variant}.png")
        fig.savefig(written[-1], dpi=110)
    return written


def write(out_dir: Path, command: str = "") -> dict:
    """Read every finished run in out_dir and write the report files; returns their paths."""
    out_dir = Path(out_dir)
    meta_path = out_dir / "sweep.json"
    if not meta_path.exists():
        raise ValueError(f"RESULTS_DIR: {out_dir} has no sweep.json; expected the --out "
                         f"directory of a `ttr sweep` run")
    meta = json.loads(meta_path.read_text())
    records = list(finished(out_dir).values())
    if not records:
        raise ValueError(f"RESULTS_DIR: {out_dir / 'runs'} holds no finished runs yet")
    from ttr.sweep import get_experiment, plan

    try:
        experiment = get_experiment(meta.get("spec", meta["experiment"]))
        planned_runs = plan(experiment, meta["mode"] == "quick")
    except (ValueError, OSError):  # a user's experiment file that has moved or changed
        experiment, planned_runs = None, None
    planned = None if planned_runs is None else len(planned_runs)
    # what the experiment says its numbers do not show (module attribute CAVEATS: list[str])
    caveats = list(getattr(experiment, "CAVEATS", ()))
    mq = mqar_rows([r for r in records if r["task"] == "mqar"],
                   None if planned_runs is None else
                   [{"config": asdict(r.config)} for r in planned_runs if r.task == "mqar"])
    rg = regression_rows([r for r in records if r["task"] == "online_regression"])
    hours = sum(r["seconds"] for r in records) / 3600
    done = f"{len(records)} of {planned}" if planned else f"{len(records)}"
    lines = [f"# Sweep `{meta['experiment']}` ({meta['mode']})", "",
             f"- Sweep command: `{meta.get('command') or 'ttr sweep ' + meta['experiment']}`",
             f"- Report command: `{command or 'ttr report ' + str(out_dir)}`",
             f"- Runs finished: {done}; compute {hours:.2f} h (sum of per-run wall times; "
             f"runs go in parallel)", ""]
    files = {}
    if planned and len(records) < planned:
        lines += [f"**Partial:** {planned - len(records)} runs have not finished; rerun the "
                  "sweep command to finish them (finished runs are skipped).", ""]
    if caveats:
        lines += ["**Caveats** (from the experiment's definition):", ""]
        lines += [f"- {c}" for c in caveats] + [""]
    for name, rows, section, plot in (("mqar", mq, _mqar_section, plot_mqar),
                                      ("regression", rg, _regression_section, plot_regression)):
        if not rows:
            continue
        lines += section(rows)
        _write_csv(out_dir / f"{name}.csv", rows)
        files[f"{name}_csv"] = out_dir / f"{name}.csv"
        for p in plot(rows, out_dir):
            files[p.stem] = p
            lines.append(f"![{p.stem}]({p.name})")
        lines.append("")
    (out_dir / "leaderboard.md").write_text("\n".join(lines))
    files["leaderboard"] = out_dir / "leaderboard.md"
    return files

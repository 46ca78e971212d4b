"""`ttr report RESULTS_DIR`: the leaderboard of a sweep (`ttr.sweep`), as Markdown, CSV and PNG.

Written into RESULTS_DIR:
  leaderboard.md         the command, run count and compute time; per MQAR variant a table with
                         one row per layer -- its three design choices (weights, function
                         class, optimizer), recurrent state size and best-lr accuracy at every
                         grid point; per online-regression variant the mean loss per phase;
                         and a design-axis table per part: for each value of each axis, the
                         layers that take it and their mean and best score, which is where one
                         reads which choice moves recall; for MQAR also per grid point (where
                         the choices matter: below or above capacity), and matched pairs: the
                         layers whose choices differ on one axis only, the accuracy change that
                         goes with that one choice, the other two held fixed. Where runs
                         recorded `accuracy_by_load` (paper variant): per grid point each
                         layer's accuracy by memory load, and for a catalogue (over ten layers)
                         the mean per design choice and load.
  mqar.csv, regression.csv   the same numbers, one row per (layer, grid point).
  mqar_vs_T.png          accuracy vs T, one panel per (variant, P) (only if T varies per P)
  mqar_vs_d.png          accuracy vs d_model, one panel per (variant, P, T) (if d varies)
  mqar_vs_load.png       paper variant: accuracy vs the memory load, the distinct pairs
                         before an answered query (if P or T varies)
  mqar_vs_state.png      accuracy vs recurrent state size (zoology's recall-vs-memory plot)
  mqar_by_load.png       accuracy vs the load of each query within a run, a panel per grid
                         point whose runs recorded the split
  regression_<variant>.png  loss vs t, one line per layer, families by colour.
(the plots: `ttr.experiments.leaderboard_plots`)

MQAR scores are the best test accuracy over the learning rates of a grid point, as zoology
reports them. In a partial sweep a point some of whose learning rates are still to run is
marked, and the layers' means (and the axis table built on them) are taken over the points
every layer has finished, so that a layer missing the harder points does not rank higher.
"""

from __future__ import annotations

import csv
import itertools
import json
import statistics
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

from ttr.experiments.leaderboard_plots import MANY_LAYERS, plot_mqar, plot_regression
from ttr.experiments.report import markdown_table
from ttr.sweep import finished

AXES = ("weights", "function class", "optimizer")
# Each axis's values from the simplest choice to the most capable, the direction in which the
# matched-pair table reads a change (values not listed sort after these, by name).
AXIS_ORDER = {
    "weights": ("uniform", "geometric", "geometric per-dim", "local"),
    "function class": ("linear", "linear + LN, residual", "features", "MLP", "kernel",
                       "local polynomial p=0", "local polynomial p=1"),
    "optimizer": ("1 GD step from 0", "online SGD", "exact"),
}
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


# The config fields that place an MQAR run on the grid, or in its point's learning-rate sweep.
_GRID = ("layer", "source", "variant", "d_model", "num_pairs", "seq_len", "lr")


def _varied(configs: list[dict]) -> list[str]:
    """The fields outside the grid whose value differs between the runs of one layer at one
    grid point: an ablation's (ridge, steps, seed, ...), which the best-over-learning-rates
    must not merge. (Fields that change only from point to point, as a catalogue sweep's
    vocabulary with P, name nothing.) A field that a config lacks (recorded before it existed)
    counts as None, its default."""
    fields = sorted({k for c in configs for k in c} - set(_GRID))
    groups = defaultdict(list)
    for c in configs:
        groups[tuple(json.dumps(c.get(k)) for k in _GRID if k != "lr")].append(c)
    return [k for k in fields
            if any(len({json.dumps(c.get(k)) for c in g}) > 1 for g in groups.values())]


def _mqar_key(record: dict, varied: list[str] = ()) -> tuple:
    """(layer, variant, d_model, P, T); the layer's name carries the varied fields it sets
    (None: not set), so that an ablation's settings are rows of their own and not one
    learning-rate sweep: "rls (recipe) ridge=0.1 steps=2000"."""
    c = record["config"]
    name = " ".join([_name(record)] + [f"{k}={c[k]:g}" if isinstance(c[k], float) else
                                       f"{k}={c[k]}" for k in varied if c.get(k) is not None])
    return (name, c["variant"], c["d_model"], c["num_pairs"], c["seq_len"])


def _planned_configs(planned: list[dict] | None) -> list[dict]:
    return [r["config"] for r in planned or ()]


def best_mqar_runs(records: list[dict], planned: list[dict] | None = None) -> dict[tuple, dict]:
    """(layer, variant, d_model, P, T) -> the record of the point's best run over learning rates
    (the first of equals, in record order): the run each report row shows. `planned` as in
    `mqar_rows` (its configs name the varied fields, and so the points)."""
    return _best_by_key(records, _varied([r["config"] for r in records]
                                         + _planned_configs(planned)))


def _best_by_key(records: list[dict], varied: list[str]) -> dict[tuple, dict]:
    best: dict[tuple, dict] = {}
    for r in records:
        key = _mqar_key(r, varied)
        if key not in best or r["result"]["accuracy"] > best[key]["result"]["accuracy"]:
            best[key] = r
    return best


def mqar_rows(records: list[dict], planned: list[dict] | None = None) -> list[dict]:
    """One row per (layer, variant, d_model, P, T): the best accuracy over learning rates.
    A sweep that also varies other fields (an ablation) gets one row per their values too.

    planned: the sweep's MQAR run records-to-be ({"config": ...}), if known; a row is then
    `complete` when every run planned at its point has finished (else its best is over the
    learning rates finished so far). Without a plan every row counts as complete."""
    varied = _varied([r["config"] for r in records] + _planned_configs(planned))
    done: dict[tuple, int] = defaultdict(int)
    want: dict[tuple, int] = defaultdict(int)
    for r in records:
        done[_mqar_key(r, varied)] += 1
    for r in planned or ():
        want[_mqar_key(r, varied)] += 1
    rows = []
    for key, r in _best_by_key(records, varied).items():
        c, res = r["config"], r["result"]
        rows.append(dict(layer=key[0], source=c["source"], variant=key[1], d_model=key[2],
                         num_pairs=key[3], seq_len=key[4], accuracy=res["accuracy"],
                         lr=c["lr"], state_floats=res["state_floats"], params=res["params"],
                         chance=res["chance"], by_load=res.get("accuracy_by_load"),
                         **choices(c["layer"], c["source"]),
                         complete=planned is None or done[key] >= want[key]))
    return sorted(rows, key=lambda x: (x["variant"], x["layer"], x["d_model"], x["num_pairs"],
                                       x["seq_len"]))


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
        by_p = sorted({(r["num_pairs"], r["chance"]) for r in vr})  # chance depends on P
        chance = (_pct(by_p[0][1]) if len({c for _, c in by_p}) == 1 else
                  ", ".join(f"{_pct(c)} at P = {P}" for P, c in by_p))
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
                  f"Best accuracy over learning rates (chance {chance}); state size in "
                  f"floats per sequence at the first grid point; mean over {over}; layers by "
                  "mean accuracy." + (" `*`: not every learning rate of that point has "
                                      "finished yet." if partial else ""), "",
                  markdown_table(["layer", "family", *AXES, "state",
                                  *(_point(p) for p in points), "mean"], table), "",
                  *_load_lines(variant, points),
                  *_by_load_lines(vr),
                  f"Design axes ({variant}): the layers' means above, averaged over the layers "
                  "taking each choice.", "",
                  _axis_table([dict(per_layer[n][next(iter(per_layer[n]))], accuracy=mean[n])
                               for n in mean], "accuracy", True, _pct), "",
                  f"Design axes ({variant}) by grid point: mean accuracy of the layers taking "
                  "each choice that have finished the point (their count in brackets when "
                  "not all of them have).", "",
                  _axis_by_point(per_layer, points), ""]
        lines += _pairs_lines(
            f"Matched pairs ({variant}): layers whose choices differ on one axis only, the "
            "other two held fixed. Delta = the second layer's best accuracy minus the first's, "
            "in percentage points, averaged over the pairs at each grid point both have "
            "finished; the last column averages over pairs and points. The layers of a pair "
            "still differ in what the axes do not record (feature map, parameterization, state "
            "size).", *_matched_pairs(per_layer, points))
    return lines


def _load_lines(variant: str, points: list) -> list[str]:
    """The paper variant draws its pairs with replacement, so a query's memory holds fewer than
    P pairs: the mean number it holds (`paper_mqar_load`) per grid point, next to d_model."""
    if variant != "paper":
        return []
    from ttr.tasks.mqar import paper_mqar_load

    loads = ", ".join(f"{_point(p)}: {paper_mqar_load(p[2], p[1]):.1f}" for p in points)
    return [f"Memory load (the paper variant draws its pairs with replacement): the distinct "
            f"pairs before an answered query, on average, to set beside d_model. {loads}.", ""]


LOAD_COLUMN = 16  # distinct cue pairs per column of the by-load tables
TABLE_MIN_QUERIES = 20  # fewer in a by-load table column: `-` (the plot asks for more)


def merged_loads(split: dict, width: int) -> tuple[list[int], list[int], int]:
    """A recorded `accuracy_by_load` ({"width", "queries", "correct"}) in buckets of `width`
    (a multiple of the recorded width, else the recorded width): (queries, correct, width)."""
    w = split["width"]
    k = width // w if width % w == 0 else 1

    def merge(xs):
        return [sum(xs[i:i + k]) for i in range(0, len(xs), k)]

    return merge(split["queries"]), merge(split["correct"]), w * k


def _by_load_lines(rows: list[dict]) -> list[str]:
    """Per grid point whose runs recorded it: each layer's best run's accuracy split by the
    load of each answered query, so that where a layer's memory stops keeping the pairs apart
    can be read against d_model (a point's mean accuracy mixes loads below and above it)."""
    points = sorted({(r["d_model"], r["num_pairs"], r["seq_len"]) for r in rows if r["by_load"]})
    if not points:
        return []
    lines = ["Accuracy by memory load: each layer's best run at a grid point, its held-out "
             "queries split by the distinct cue pairs before them (`accuracy_by_load`); `-`: "
             f"fewer than {TABLE_MIN_QUERIES} queries (a column of them only is left out); runs "
             "recorded without the split are left out.", ""]
    for p in points:
        sel = sorted((r for r in rows if (r["d_model"], r["num_pairs"], r["seq_len"]) == p
                      and r["by_load"]), key=lambda r: -r["accuracy"])
        table = []
        for r in sel:  # every run records the same buckets (accuracy_by_load's width 8)
            queries, correct, w = merged_loads(r["by_load"], LOAD_COLUMN)
            table.append([r["layer"], *("-" if n < TABLE_MIN_QUERIES else _pct(c / n)
                                        for n, c in zip(queries, correct, strict=True)),
                          _pct(sum(correct) / sum(queries)), f"{sum(queries):,}"])
        head = [f"{i * w}" if i * w == p[1] else f"{i * w}-{min((i + 1) * w - 1, p[1])}"
                for i in range(len(queries))]
        lines += [f"{_point(p)}:", "",
                  markdown_table(*_drop_empty(["layer", *head, "all", "queries"], table)), ""]
        at_point = [r for r in rows if (r["d_model"], r["num_pairs"], r["seq_len"]) == p]
        if len(at_point) > MANY_LAYERS:  # a catalogue; a few layers read off the table above
            lines += [f"{_point(p)} by design axis: the mean of the layers' accuracies per "
                      "column (a layer at 100% without the split counts as 100% in every "
                      "column; the layer count in brackets).", "",
                      _by_load_axis_table(at_point, head), ""]
    return lines


def _by_load_axis_table(rows: list[dict], head: list[str]) -> str:
    """Per axis value at one grid point: the mean over its layers of each load column's
    accuracy (`-` where no layer has TABLE_MIN_QUERIES queries there), so that what crossing
    d_model costs each choice reads off one row."""
    per_layer = {}  # layer -> accuracy per column (None: too few queries)
    counts = []  # queries per column: the layers of a grid point share its test sequences
    for r in rows:
        if r["by_load"]:
            counts, correct, _ = merged_loads(r["by_load"], LOAD_COLUMN)
            per_layer[r["layer"]] = [c / n if n >= TABLE_MIN_QUERIES else None
                                     for n, c in zip(counts, correct, strict=True)]
    for r in rows:
        if not r["by_load"] and r["accuracy"] == 1:  # every query right: 100% in each column
            per_layer[r["layer"]] = [1.0 if n >= TABLE_MIN_QUERIES else None for n in counts]
    out = []
    for axis in AXES:
        groups = defaultdict(list)
        for r in rows:
            if r["layer"] in per_layer and r["family"] != "baseline":
                groups[r[axis]].append(per_layer[r["layer"]])
        for value in sorted(groups, key=lambda v: _rank(axis, v)):
            cols = zip(*groups[value], strict=True)
            out.append([f"{axis}: {value} ({len(groups[value])})",
                        *(_pct(statistics.mean(xs)) if (xs := [x for x in col if x is not None])
                          else "-" for col in cols)])
    return markdown_table(*_drop_empty(["choice", *head], out))


def _drop_empty(head: list[str], table: list[list]) -> tuple[list[str], list[list]]:
    """The table without its columns of `-` only (loads no query of the point reached)."""
    keep = [j for j in range(len(head)) if any(row[j] != "-" for row in table)]
    return [head[j] for j in keep], [[row[j] for j in keep] for row in table]


def _pairs_lines(intro: str, summary: str, detail: str) -> list[str]:
    """The matched-pairs part of a section: the intro, the summary, every pair folded away."""
    if not summary:
        return []
    return [intro, "", summary, "", "<details><summary>Every pair</summary>", "", detail, "",
            "</details>", ""]


def _rank(axis: str, value: str) -> tuple:
    order = AXIS_ORDER.get(axis, ())
    return (order.index(value), "") if value in order else (len(order), value)


def _pp(x: float) -> str:
    """A difference of accuracies in percentage points, signed ("+0.0" for |x| < 0.05)."""
    return f"{100 * x:+.1f}" if abs(100 * x) >= 0.05 else "+0.0"


def _matched_pairs(per_layer: dict, points: list, score: str = "accuracy", fmt=None,
                   label=None) -> tuple[str, str]:
    """The controlled comparison the axis tables cannot make: every pair of (non-baseline)
    layers whose three choices differ on exactly one axis, ordered along AXIS_ORDER; per_layer
    {layer: {point: row}}, the delta of row[score] (second minus first, `fmt`, default
    percentage points) at each point both have (complete and not None). Returns (a table per
    change of choice: pairs and mean delta per point; a table per pair), or ("", "") when no
    pair exists. `label` names a point in the header (default `_point`)."""
    fmt, label = fmt or _pp, label or _point
    first = {n: next(iter(pts.values())) for n, pts in per_layer.items()}
    layers = sorted(n for n, r in first.items() if r["family"] != "baseline")
    pairs = defaultdict(list)  # (axis, from, to) -> [(layer a, layer b)]
    for a, b in itertools.combinations(layers, 2):
        differ = [ax for ax in AXES if first[a][ax] != first[b][ax]]
        if len(differ) != 1:
            continue
        ax = differ[0]
        if _rank(ax, first[a][ax]) > _rank(ax, first[b][ax]):
            a, b = b, a
        pairs[ax, first[a][ax], first[b][ax]].append((a, b))

    def delta(a, b, p):
        ra, rb = per_layer[a].get(p), per_layer[b].get(p)
        if ra and rb and ra.get("complete", True) and rb.get("complete", True) \
                and ra[score] is not None and rb[score] is not None:
            return rb[score] - ra[score]
        return None

    summary, detail = [], []
    for (ax, old, new), members in sorted(pairs.items(), key=lambda kv: (
            AXES.index(kv[0][0]), _rank(kv[0][0], kv[0][1]), _rank(kv[0][0], kv[0][2]))):
        cells, every = [], []
        for p in points:
            ds = [d for a, b in members if (d := delta(a, b, p)) is not None]
            every += ds
            cells.append("-" if not ds else fmt(statistics.mean(ds))
                         + ("" if len(ds) == len(members) else f" ({len(ds)})"))
        summary.append([ax, f"{old} -> {new}", len(members), *cells,
                        fmt(statistics.mean(every)) if every else "-"])
        for a, b in members:
            ds = [delta(a, b, p) for p in points]
            done = [d for d in ds if d is not None]
            detail.append([ax, f"{a} -> {b}", *("-" if d is None else fmt(d) for d in ds),
                           fmt(statistics.mean(done)) if done else "-"])
    if not summary:
        return "", ""
    cols = [label(p) for p in points]
    return (markdown_table(["axis", "change", "pairs", *cols, "mean"], summary),
            markdown_table(["axis", "pair", *cols, "mean"], detail))


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
    variants = sorted({r["variant"] for r in rows})
    per_layer = defaultdict(dict)
    for r in rows:
        per_layer[r["layer"]][r["variant"]] = r
    lines += _pairs_lines(
        "Matched pairs: layers whose choices differ on one axis only, the other two held fixed. "
        "Delta = the second layer's whole-sequence loss minus the first's (negative: the second "
        "choice predicts better), averaged over the pairs, per variant.",
        *_matched_pairs(per_layer, variants, "all", lambda x: f"{x:+.3f}",
                        lambda v: f"{v} variant"))
    return lines


def _write_csv(path: Path, rows: list[dict], drop=("curve", "raw_curve", "by_load")) -> None:
    cols = [k for k in rows[0] if k not in drop]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def planned_sweep(meta: dict) -> tuple:
    """(the experiment module, its planned runs) of a sweep's sweep.json `meta`; (None, None)
    when its experiment file has moved or changed (a user's)."""
    from ttr.sweep import get_experiment, plan

    try:
        experiment = get_experiment(meta.get("spec", meta["experiment"]))
        return experiment, plan(experiment, meta["mode"] == "quick")
    except (ValueError, OSError):
        return None, None


def mqar_records(records: list[dict]) -> list[dict]:
    return [r for r in records if r["task"] == "mqar"]


def planned_mqar(planned_runs: list | None) -> list[dict] | None:
    """The planned MQAR runs as records-to-be ({"config": ...}), as `mqar_rows` takes them."""
    if planned_runs is None:
        return None
    return [{"config": asdict(r.config)} for r in planned_runs if r.task == "mqar"]


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
    experiment, planned_runs = planned_sweep(meta)
    planned = None if planned_runs is None else len(planned_runs)
    # what the experiment says its numbers do not show (module attribute CAVEATS: list[str])
    caveats = list(getattr(experiment, "CAVEATS", ()))
    mq = mqar_rows(mqar_records(records), planned_mqar(planned_runs))
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

"""The PNG plots of `ttr report` (`ttr.experiments.leaderboard`): MQAR accuracy against T,
d_model and recurrent state size, and the online-regression loss curves. Layers are coloured by
family; the MQAR plots name the layers below LABEL_BELOW, placed so that names do not overprint.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

# Past this many layers a plot colours them by family and names the weak ones: a colour, marker
# and line style per layer stop being told apart (a catalogue has 33).
MANY_LAYERS = 10

FAMILY_COLORS = {"linear attention": "tab:blue", "geometric decay": "tab:orange",
                 "online SGD": "tab:green", "exact second order": "tab:red",
                 "nonparametric": "tab:purple", "baseline": "tab:gray"}


def _figure(n_panels: int, width: float = 4.6, height: float = 3.6):
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    cols = min(n_panels, 3)
    rows = -(-n_panels // cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n_panels:]:  # the grid's unused cells: no empty frames
        ax.remove()
    return fig, axes[:n_panels]


MARKERS, LINESTYLES = "osD^v<>p", ("-", "--", "-.", ":")

# Recall plots name only the layers below this accuracy: at the top dozens of names overlap
# into an unreadable bar, and those layers are in the leaderboard's table anyway.
LABEL_BELOW = 0.97


LABEL_PT = 7.0  # height of a name's line: 6 pt text and a point of space


def _place_labels(ax, labels: list[tuple[str, float, float]]) -> None:
    """Name the points (name, x, y) of one panel without overlapping names. Call it once the
    panel's scales and limits are set. Each name goes right of its point, at the nearest
    height (stepping by a line of LABEL_PT up, then down) where its box, estimated from its
    length, clears the names placed before it, lowest points first; a moved name gets a thin
    line to its point. Written at the points themselves, the layers that failed together (a
    dozen near chance at one d_model, or at one state size) overprinted into one unreadable
    block."""
    to_axes = ax.transData + ax.transAxes.inverted()
    box = ax.get_window_extent()
    char = 3.3 * ax.figure.dpi / 72 / max(box.width, 1.0)  # a 6 pt character, axes fraction
    pad = 4 * ax.figure.dpi / 72 / max(box.width, 1.0)  # the name starts 4 pt right
    # a line in axes fractions, from the axis' height: a fixed fraction (0.035, a line on the
    # 200 pt axes of a 3.6 in panel) gave a taller panel no more lines, and 28 names on one
    # panel ran out of room and overprinted
    gap = LABEL_PT * ax.figure.dpi / 72 / max(box.height, 1.0)
    placed: list[tuple[float, float, float]] = []  # (x0, x1, y) of the names so far

    def free(x0, x1, y):
        return all(x1 <= a or x0 >= b or abs(y - c) >= gap for a, b, c in placed)

    steps = [k for j in range(int(1 / gap) + 2)  # 0, 1, -1, 2, -2, ... over the whole axis
             for k in ((j, -j) if j else (0,))]
    for name, x, y in sorted(labels, key=lambda t: (t[2], t[1])):
        fx, fy = to_axes.transform((x, y))
        x0, x1 = fx + pad, fx + pad + char * len(name)
        ty = next((fy + k * gap for k in steps
                   if 0.0 <= fy + k * gap <= 1.0 and free(x0, x1, fy + k * gap)),
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
        layers = sorted({r["layer"] for r in rows})
        for ax, (variant, P) in zip(axes, panels, strict=False):
            sel = [r for r in rows if (r["variant"], r["num_pairs"]) == (variant, P)]
            d = max(r["d_model"] for r in sel)
            for layer in sorted({r["layer"] for r in sel}):
                mine = [r for r in sel if r["layer"] == layer and r["d_model"] == d]
                pts = sorted((r["seq_len"], r["accuracy"]) for r in mine)
                for r in mine:  # a point whose learning rates have not all run yet
                    if not r.get("complete", True):
                        ax.annotate("*", (r["seq_len"], r["accuracy"]), xytext=(5, -12),
                                    textcoords="offset points", fontsize=9)
                # layers that solve the task all sit on the 100% line: each its own marker,
                # line style and a smaller size than the one before, so that the stacked
                # markers stay visible as rings; colours by layer, the same in every panel
                i = layers.index(layer)
                ax.plot(*zip(*pts, strict=True), label=layer, alpha=0.9, color=f"C{i % 10}",
                        marker=MARKERS[i % len(MARKERS)], markersize=max(3.0, 10.0 - 1.5 * i),
                        markerfacecolor="none", ls=LINESTYLES[i % len(LINESTYLES)])
            ax.set_xscale("log", base=2)
            ts = sorted({r["seq_len"] for r in sel})
            ax.set_xticks(ts, [str(t) for t in ts])
            ax.set(title=f"{variant}, P = {P}, d_model = {d}", xlabel="T",
                   ylabel="accuracy (best lr)", ylim=(-0.02, 1.02))
            ax.grid(alpha=0.3)
        if any(not r.get("complete", True) for r in rows):  # under the panels: in a title it
            # ran under the legend
            fig.supxlabel("* a point whose learning rates have not all run yet", fontsize=8)
        _legend(fig, axes)
        written.append(out_dir / "mqar_vs_T.png")
        fig.savefig(written[-1], dpi=110)
    paper = [r for r in rows if r["variant"] == "paper"]
    if len({(r["num_pairs"], r["seq_len"]) for r in paper}) > 1:
        written.append(_plot_vs_load(paper, out_dir))
    if any(r.get("by_load") for r in paper):
        written.append(_plot_by_load(paper, out_dir))
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


def _plot_vs_load(rows: list[dict], out_dir: Path) -> Path:
    """The paper variant's accuracy against its memory load, the distinct pairs before an
    answered query (`ttr.tasks.mqar.paper_mqar_load`), one panel per d_model, one line per
    layer, a marker per P. The variant draws its pairs with replacement, so T moves the load
    too; on this axis the points of every (P, T) line up, and a linear memory's recall can be
    read against d_model (Section 6: memory capacity, not T, limits recall)."""
    from ttr.tasks.mqar import paper_mqar_load

    ds, ps = sorted({r["d_model"] for r in rows}), sorted({r["num_pairs"] for r in rows})
    layers = sorted({r["layer"] for r in rows})
    # a few layers: a colour and line style each, in the legend; a catalogue's dozens: a colour
    # per family in the legend, and the layers below LABEL_BELOW named at their lowest point
    many = len(layers) > MANY_LAYERS
    # the accuracy axis from the lowest point's tenth down: on [0, 1] the layers' differences
    # near capacity, a few points, were one line
    low = max(0.0, math.floor(10 * (min(r["accuracy"] for r in rows) - 0.02)) / 10)
    fig, axes = _figure(len(ds), width=5.5)
    for ax, d in zip(axes, ds, strict=True):
        sel = [r for r in rows if r["d_model"] == d]
        labels = []
        for layer in sorted({r["layer"] for r in sel}):
            i = layers.index(layer)
            pts = sorted(((paper_mqar_load(r["seq_len"], r["num_pairs"]), r["accuracy"], r)
                          for r in sel if r["layer"] == layer), key=lambda p: p[:2])
            fam = pts[0][2]["family"]
            color = FAMILY_COLORS.get(fam) if many else f"C{i % 10}"
            ax.plot([x for x, _, _ in pts], [y for _, y, _ in pts], color=color, alpha=0.9,
                    ls="-" if many else LINESTYLES[i % len(LINESTYLES)],
                    lw=0.8 if many else 1.5, label=fam if many else layer)
            for x, y, r in pts:
                ax.plot([x], [y], ls="", marker=MARKERS[ps.index(r["num_pairs"]) % len(MARKERS)],
                        markerfacecolor="none", color=color, alpha=0.9)
                if not r.get("complete", True):
                    ax.annotate("*", (x, y), xytext=(5, -12), textcoords="offset points",
                                fontsize=9)
            lowest = min(pts, key=lambda p: p[1])
            if many and lowest[1] < LABEL_BELOW:
                labels.append((layer, *lowest[:2]))
        for j, P in enumerate(ps):  # the markers' key, once in the figure's legend
            ax.plot([], [], ls="", marker=MARKERS[j % len(MARKERS)], markerfacecolor="none",
                    color="k", label=f"P = {P}")
        ax.axvline(d, color="k", lw=0.8, ls=":", label="load = d_model")
        ax.set(title=f"paper, d_model = {d}", ylabel="accuracy (best lr)",
               ylim=(low - 0.01 * (1 - low), 1 + 0.01 * (1 - low)),
               xlabel="load: pairs in memory at a query")
        ax.grid(alpha=0.3)
        if many:
            _place_labels(ax, labels)
            _note_unlabelled(ax)
    if any(not r.get("complete", True) for r in rows):
        fig.supxlabel("* a point whose learning rates have not all run yet", fontsize=8)
    _legend(fig, axes)
    fig.savefig(out_dir / "mqar_vs_load.png", dpi=110)
    return out_dir / "mqar_vs_load.png"


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
                color = FAMILY_COLORS.get(r["family"]) if len(vr) > MANY_LAYERS else None
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
        how = "colour: family; " if len(vr) > MANY_LAYERS else ""
        fig.suptitle(f"online regression, {variant} variant ({how}solid: paper methods; "
                     f"dotted: the switch)")
        _legend(fig, axes)
        written.append(out_dir / f"regression_{variant}.png")
        fig.savefig(written[-1], dpi=110)
    return written


MIN_QUERIES = 200  # a by-load point over fewer queries is noise (a standard error of ~1 point
# at 97%), not a capacity curve


def _plot_by_load(rows: list[dict], out_dir: Path) -> Path:
    """Recall against the load of each query, within one run: a panel per grid point whose
    runs recorded `accuracy_by_load`, a line per layer (its best run), a point per bucket of
    loads with at least MIN_QUERIES queries, at the bucket's middle. The dotted line is
    d_model = D_k, the most pairs a linear memory can keep apart (Section 6). A few layers: a
    colour, marker and line style each; a catalogue's dozens, as in `_plot_vs_load`: a colour
    per family in the legend and the layers below LABEL_BELOW named at their lowest point."""
    points = sorted({(r["d_model"], r["num_pairs"], r["seq_len"]) for r in rows if r["by_load"]})
    layers = sorted({r["layer"] for r in rows})
    many = len({r["layer"] for r in rows if r["by_load"]}) > MANY_LAYERS
    family = {r["layer"]: r["family"] for r in rows}
    curves = {}  # (point, layer) -> [(load at the bucket's middle, accuracy)]
    for r in rows:
        if r["by_load"]:
            split, P = r["by_load"], r["num_pairs"]
            w = split["width"]
            curves[(r["d_model"], P, r["seq_len"]), r["layer"]] = [
                (k * w + (min(w, P + 1 - k * w) - 1) / 2, c / n)
                for k, (n, c) in enumerate(zip(split["queries"], split["correct"], strict=True))
                if n >= MIN_QUERIES]
    # one accuracy range for every panel: a panel of a layer at 99.9% autoscaled to a tenth of
    # a point looked like a collapse
    low = min([y for pts in curves.values() for _, y in pts] + [0.99])
    # a catalogue's names need the height: at 3.6 in, 28 names pushed each other far from
    # their lines
    fig, axes = _figure(len(points), width=6.5 if many else 5.0, height=5.5 if many else 3.6)
    for ax, (d, P, T) in zip(axes, points, strict=True):
        labels, seen = [], set()
        for (point, layer), pts in sorted(curves.items(), key=lambda kv: kv[0][1]):
            if point != (d, P, T) or not pts:
                continue
            if many:
                fam = family[layer]
                ax.plot(*zip(*pts, strict=True), color=FAMILY_COLORS.get(fam), lw=0.8,
                        marker="o", markersize=2.5, alpha=0.8,
                        label=fam if fam not in seen else "_nolegend_")
                seen.add(fam)
                lowest = min(pts, key=lambda p: p[1])
                if lowest[1] < LABEL_BELOW:
                    labels.append((layer, *lowest))
                continue
            i = layers.index(layer)
            ax.plot(*zip(*pts, strict=True), label=layer, color=f"C{i % 10}",
                    marker=MARKERS[i % len(MARKERS)], markersize=4, markerfacecolor="none",
                    ls=LINESTYLES[i % len(LINESTYLES)], alpha=0.9)
        ax.axvline(d, color="k", lw=0.8, ls=":", label="load = d_model")
        ax.set(title=f"paper, d_model = {d}\nP = {P}, T = {T}", ylabel="accuracy (best lr)",
               xlabel="load: distinct pairs before the query",
               ylim=(low - 0.03 * (1 - low), 1 + 0.03 * (1 - low)))
        ax.grid(alpha=0.3)
        if many:
            _place_labels(ax, labels)
            _note_unlabelled(ax)
    _legend(fig, axes)
    fig.savefig(out_dir / "mqar_by_load.png", dpi=110)
    return out_dir / "mqar_by_load.png"

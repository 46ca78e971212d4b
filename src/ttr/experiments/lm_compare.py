"""`ttr compare-runs RUN_DIR... --out DIR`: the language models of several `ttr train` runs side
by side -- a Markdown/CSV table of validation bits per byte and a PNG of the loss curves.

Each RUN_DIR is a `ttr train --out` directory: its log.csv (one row per step, validation every
eval_every steps) and checkpoint.pt (the config; read with weights_only=True, no unpickling of
arbitrary objects). The parameter count is that of the model the config builds (tied
embeddings counted once).
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from ttr.experiments.report import markdown_table


def load_run(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    log, ckpt = run_dir / "log.csv", run_dir / "checkpoint.pt"
    if not log.exists() or not ckpt.exists():
        raise ValueError(f"RUN_DIR: {run_dir} has no log.csv and checkpoint.pt; expected the "
                         f"--out directory of `ttr train`")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    config = state["config"]
    with open(log, newline="") as f:
        rows = list(csv.DictReader(f))
    from ttr.nn.lm import LM, LMConfig

    model = LM(LMConfig.from_dict(config["model"]))
    params = sum(p.numel() for p in model.parameters())
    tokens_per_step = config["batch_size"] * config["seq_len"]
    train = [(int(r["step"]), float(r["train_loss"])) for r in rows]
    val = [(int(r["step"]), float(r["val_bpb"])) for r in rows if r["val_bpb"]]
    last = [loss for _, loss in train[-50:]]
    pattern = "+".join(config["model"]["pattern"])
    overrides = config["model"].get("mixer_overrides") or {}
    if overrides:  # e.g. rope: part of what the layers are
        pattern += " (" + ", ".join(f"{k}={v}" for k, v in sorted(overrides.items())) + ")"
    return dict(name=run_dir.name, pattern=pattern, params=params,
                steps=train[-1][0] if train else 0, planned_steps=config["steps"],
                tokens=(train[-1][0] if train else 0) * tokens_per_step,
                tokens_per_step=tokens_per_step, train=train, val=val,
                final_val_bpb=val[-1][1] if val else None,
                best_val_bpb=min(v for _, v in val) if val else None,
                train_loss=sum(last) / len(last) if last else None,
                wall_time=float(rows[-1]["wall_time"]) if rows else 0.0, config=config)


def write(run_dirs: list[Path], out_dir: Path, command: str = "") -> dict:
    runs = sorted((load_run(d) for d in run_dirs),
                  key=lambda r: r["final_val_bpb"] if r["final_val_bpb"] is not None else 1e9)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cols = ["name", "pattern", "params", "steps", "tokens", "final_val_bpb", "best_val_bpb",
            "train_loss", "wall_time"]
    with open(out_dir / "lm.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(runs)
    table = [[r["name"], r["pattern"], f"{r['params'] / 1e6:.2f} M",
              f"{r['steps']}" + ("" if r["steps"] == r["planned_steps"]
                                  else f" of {r['planned_steps']}"),
              f"{r['tokens'] / 1e6:.2f} M", _f(r["final_val_bpb"]), _f(r["best_val_bpb"]),
              _f(r["train_loss"]), f"{r['wall_time'] / 60:.1f} min",
              f"{r['tokens'] / max(r['wall_time'], 1e-9):,.0f}"] for r in runs]
    c = runs[0]["config"]
    lines = ["# Byte-level language models on the same token budget", "",
             f"- Command: `{command or 'ttr compare-runs ...'}`",
             f"- Training: {c['steps']} steps x {c['batch_size']} sequences x {c['seq_len']} "
             f"bytes, AdamW lr {c['lr']:g} (warmup {c['warmup']}, cosine to lr/10), seed "
             f"{c['seed']}; d_model {c['model']['d_model']}, {c['model']['n_layers']} layers, "
             f"{c['model']['n_heads']} heads; data: "
             f"{c['data'] or 'the Python standard library sources'}.",
             "- Validation: bits per byte on held-out files (last evaluation and best).",
             "- Wall time is each run's own training time, on a CPU shared with the other "
             "runs, so tokens/s compares the layers only roughly.", "",
             markdown_table(["run", "layers", "params", "steps", "tokens", "val bpb",
                             "best val bpb", "train loss (last 50)", "wall time", "tokens/s"],
                            table), "", "![loss curves](lm_curves.png)", ""]
    (out_dir / "lm.md").write_text("\n".join(lines))
    plot(runs, out_dir / "lm_curves.png")
    return {"table": out_dir / "lm.md", "csv": out_dir / "lm.csv",
            "plot": out_dir / "lm_curves.png"}


def _f(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def plot(runs: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), layout="constrained")
    ax_train, ax_val = fig.subplots(1, 2)
    for r in runs:
        steps = [s for s, _ in r["train"]]
        loss = torch.tensor([v for _, v in r["train"]])
        k = min(25, len(loss))  # a running mean over 25 steps shows the trend, not the noise
        smooth = loss.unfold(0, k, 1).mean(1) if k else loss
        tok = r["tokens_per_step"] / 1e6
        ax_train.plot([s * tok for s in steps[k - 1:]], smooth.tolist(), label=r["pattern"])
        ax_val.plot([s * tok for s, _ in r["val"]], [v for _, v in r["val"]], marker="o",
                    label=r["pattern"])
    ax_train.set(xlabel="tokens (M)", ylabel="train loss (nats/byte, 25-step mean)",
                 title="training loss")
    ax_val.set(xlabel="tokens (M)", ylabel="bits per byte", title="validation")
    for ax in (ax_train, ax_val):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(path, dpi=120)

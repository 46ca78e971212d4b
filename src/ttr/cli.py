"""The `ttr` command (console script `ttr = "ttr.cli:main"`).

    ttr reproduce [--out DIR] [--full] [--seed N] [--variant paper|zoology] [--quiet]
    ttr online-regression [--out DIR] [--seeds N] [--T N] [--d N] ...   (paper Section 5)
    ttr mqar [--out DIR] [--layer NAME]... [--pairs P]... [--seq-len T]... (paper Section 6)
    ttr bench [--op NAME]... [--form NAME]... [--T N]... [--dtype fp32|bf16]... [--out FILE]
    ttr list [--d-model N] [--heads N] [--T N] [--family NAME] [--name NAME] [--csv]
    ttr sweep EXPERIMENT [--quick] [--out DIR] [--workers N] [--threads N] [--dry-run]   (resumable)
              [--checkpoint-every SECONDS]
    ttr report RESULTS_DIR                                  (leaderboard.md + plots)
    ttr train [--out DIR] [--resume] [--pattern NAME]... [--steps N] ...
    ttr compare-runs RUN_DIR... [--out DIR]                 (table + curves of train runs)
    ttr bench-generate [--pattern NAMES]... [--new-tokens N] [--out FILE]

`main()` runs the typer app in non-standalone mode so that every user error -- an unknown
option, a bad value, a configuration our dataclasses reject -- ends as one line on stderr,
`ttr: error: <message>`, with exit code 2 for usage errors and 1 for invalid values found by
our own validation; no traceback, no rich box (set TTR_DEBUG=1 to get the traceback).
Experiment code is imported inside the commands, so `ttr --help` stays quick.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from typer._click import exceptions as click_exceptions

from ttr.sweep import SweepFailed  # light: the sweep's heavy parts load inside its command

app = typer.Typer(
    name="ttr",
    help="Test-time regression layers: reproduce the paper's experiments and run them one "
         "at a time. Start with `ttr reproduce` (a few minutes on a laptop CPU); results and "
         "report.md go to ./results.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class Dtype(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"


class Variant(str, Enum):
    paper = "paper"
    zoology = "zoology"


def _opt(*names: str, help: str, metavar: str | None = None):
    return typer.Option(*names, help=help, metavar=metavar)


Out = Annotated[Path, _opt("--out", "-o", metavar="DIR",
                           help="Directory for CSVs, plots and report.")]
Quiet = Annotated[bool, _opt("--quiet", "-q", help="No progress bars.")]
Seed = Annotated[int, _opt("--seed", metavar="INT",
                           help="Seed of every random draw (data and initialization).")]
VariantOpt = Annotated[Variant, _opt(
    "--variant", help="MQAR data: 'paper' (Section 6, a vocabulary of 2P tokens) or 'zoology' "
                      "(Arora et al. 2023).")]
Ints = list[int] | None


@app.command(short_help="Run both paper experiments and write report.md.")
def reproduce(
    out: Out = Path("results"),
    full: Annotated[bool, _opt(
        "--full", help="The paper's full protocol (more sequences; MQAR trained per T with an "
                       "lr sweep). Much slower than the default quick mode.")] = False,
    seed: Seed = 0,
    variant: VariantOpt = Variant.paper,
    quiet: Quiet = False,
) -> None:
    """Run both paper experiments (online regression, Fig. 2; MQAR, Fig. 3) and write
    OUT/report.md with the plots, tables and the paper's claims next to the measurements."""
    from ttr.experiments.reproduce import reproduce as run

    run(out, full=full, seed=seed, variant=variant.value, progress=not quiet)


@app.command("online-regression", short_help="Paper Section 5 / Fig. 2: online regression.")
def online_regression(
    out: Out = Path("results"),
    seeds: Annotated[int | None, _opt(
        "--seeds", metavar="N",
        help="Number of independent sequences [default: 32; 512 with --full].")] = None,
    T: Annotated[int | None, _opt("--T", metavar="N", help="Steps [default: 256].")] = None,
    d: Annotated[int | None, _opt("--d", metavar="N", help="Key dimension [default: 64].")
                 ] = None,
    rho: Annotated[float | None, _opt(
        "--rho", metavar="FLOAT",
        help="Off-diagonal of the innovation covariance Sigma [default: 0.5].")] = None,
    method: Annotated[list[str] | None, _opt(
        "--method", metavar="NAME",
        help="Method to run (repeatable) [default: all]: linear_attention, rls, softmax, "
             "local_linear, naive.")] = None,
    dtype: Annotated[str | None, _opt(
        "--dtype", metavar="DTYPE", help="float64 or float32 [default: float64].")] = None,
    seed: Seed = 0,
    full: Annotated[bool, _opt("--full", help="Start from the full configuration.")] = False,
    quiet: Quiet = False,
) -> None:
    """Online regression on the switching AR process (paper Section 5, Fig. 2): writes
    online_regression.csv, online_regression_summary.csv and online_regression.png."""
    from ttr.experiments import online_regression as exp
    from ttr.experiments.report import online_table

    base = exp.OnlineRegressionConfig.full() if full else exp.OnlineRegressionConfig.quick()
    given = dict(seeds=seeds, T=T, d=d, rho=rho, dtype=dtype, seed=seed,
                 methods=tuple(method) if method else None)
    config = dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})
    result = exp.run(config, out, progress=not quiet)
    typer.echo(online_table(result))
    typer.echo(f"ttr: wrote {', '.join(str(p) for p in result['files'].values())} "
               f"in {result['seconds']:.1f} s")


@app.command(short_help="Paper Section 6 / Fig. 3: MQAR with one layer.")
def mqar(
    out: Out = Path("results"),
    layer: Annotated[list[str] | None, _opt(
        "--layer", metavar="NAME",
        help="Layer to train (repeatable): linear_attention, rls, delta_rule, softmax "
             "[default: linear_attention rls].")] = None,
    pairs: Annotated[Ints, _opt(
        "--pairs", metavar="P",
        help="Number of cue-response pairs (repeatable) [default: 64 128].")] = None,
    seq_len: Annotated[Ints, _opt(
        "--seq-len", metavar="T",
        help="Sequence length to evaluate (repeatable) [default: 128 256 512 1024].")] = None,
    steps: Annotated[int | None, _opt("--steps", metavar="N", help="Training steps per run.")
                     ] = None,
    lr: Annotated[list[float] | None, _opt(
        "--lr", metavar="LR",
        help="Learning rate (repeatable: a sweep; the best is reported).")] = None,
    variant: VariantOpt = Variant.paper,
    seed: Seed = 0,
    full: Annotated[bool, _opt(
        "--full", help="Start from the full protocol (one model per T, lr sweep).")] = False,
    quiet: Quiet = False,
) -> None:
    """Multi-query associative recall with one layer and a short convolution (paper
    Section 6, Fig. 3): writes mqar.csv and mqar.png."""
    from ttr.experiments import mqar as exp
    from ttr.experiments.report import mqar_table

    base = (exp.MQARConfig.full if full else exp.MQARConfig.quick)(variant.value)
    given = dict(layers=layer, num_pairs=pairs, seq_lens=seq_len, steps=steps, lrs=lr)
    config = dataclasses.replace(base, seed=seed,
                                 **{k: tuple(v) if isinstance(v, list) else v
                                    for k, v in given.items() if v is not None})
    rows = exp.run(config, out, progress=not quiet)
    typer.echo(mqar_table(rows))
    typer.echo(f"ttr: wrote {Path(out) / 'mqar.csv'}, {Path(out) / 'mqar.png'}")


@app.command(short_help="Time ops x forms x lengths: speed, memory, FLOP/s.")
def bench(
    op: Annotated[list[str] | None, _opt(
        "--op", metavar="NAME",
        help="Op to time (repeatable) [default: all]: linear_attention, "
             "linear_attention_scalar, linear_attention_per_dim, delta_rule, gated_delta_rule, "
             "delta_product, momentum_delta_rule, rls, softmax_attention, "
             "local_linear_attention.")] = None,
    form: Annotated[list[str] | None, _opt(
        "--form", metavar="NAME",
        help="Form to time (repeatable) [default: all forms of each op]: recurrent, parallel, "
             "chunk, chunk_recurrent, fused, naive, blocked.")] = None,
    T: Annotated[Ints, _opt("--T", metavar="N",
                            help="Sequence length (repeatable) [default: 512 2048 8192].")] = None,
    d: Annotated[int, _opt("--d", metavar="N", help="Head dimension Dk = Dv.")] = 64,
    heads: Annotated[int, _opt("--heads", "--bh", metavar="N",
                               help="Heads, with batch 1 (so B*H = N).")] = 16,
    repeats: Annotated[int, _opt("--repeats", metavar="N",
                                 help="Timed runs per case, after one warm-up.")] = 5,
    dtype: Annotated[list[Dtype] | None, _opt(
        "--dtype", metavar="fp32|bf16",
        help="fp32, or bf16 = fp32 inputs under CPU autocast to bfloat16, with its error vs "
             "fp32 (repeatable) [default: fp32].")] = None,
    compile: Annotated[bool, _opt(
        "--compile", help="Also time torch.compile(fullgraph=True) of the chunk forms.")] = False,
    threads: Annotated[int | None, _opt(
        "--threads", metavar="N", help="torch.set_num_threads [default: torch's].")] = None,
    no_caps: Annotated[bool, _opt(
        "--no-caps", help="Also run the loop and O(T^2)-memory forms at every T (slow; may "
                          "exhaust memory).")] = False,
    peers: Annotated[bool, _opt(
        "--peers", help="Also time flash-linear-attention's pure-PyTorch references when fla "
                        "is installed (pip install -e .[peers]), on the same inputs.")
                     ] = False,
    out: Annotated[Path | None, _opt("--out", "-o", metavar="FILE",
                                     help="Write the Markdown table here.")] = None,
    csv: Annotated[Path | None, _opt("--csv", metavar="FILE", help="Write a CSV here.")] = None,
    quiet: Quiet = False,
) -> None:
    """Benchmark the ops: median [min-max] forward and forward+backward time, peak memory
    (each case in a fresh process), GFLOP/s next to the matmul rate measured in the same run,
    and the speedup of each form over the recurrent one. Prints a Markdown table.
    The default run takes about 10 minutes on 2 cores."""
    from ttr import bench as b

    config = b.BenchConfig(
        ops=tuple(op or ()), forms=tuple(form or ()), Ts=tuple(T) if T else (512, 2048, 8192),
        d=d, heads=heads, repeats=repeats, dtypes=tuple(x.value for x in dtype or [Dtype.fp32]),
        compile=compile, threads=threads, caps=not no_caps, peers=peers)
    result = b.run(config, command=shlex.join(["ttr", *sys.argv[1:]]), progress=not quiet)
    table = b.to_markdown(result)
    typer.echo(table)
    for path, write in ((out, lambda p: p.write_text(table)),
                        (csv, lambda p: b.write_csv(result, p))):
        if path is not None:
            write(path)
            typer.echo(f"ttr: wrote {path}")


@app.command(short_help="Run an experiment's configs in parallel workers, resumably.")
def sweep(
    experiment: Annotated[str, typer.Argument(
        metavar="EXPERIMENT",
        help="mqar_catalogue, online_regression_catalogue, fig2, fig3, fig3_rls, or a .py "
             "file that defines runs(quick) -> list[dict].")],
    out: Annotated[Path | None, _opt("--out", "-o", metavar="DIR",
                                     help="Results directory [default: results/sweeps/"
                                          "EXPERIMENT-quick|full].")] = None,
    quick: Annotated[bool, _opt("--quick", help="The experiment's small configuration.")
                     ] = False,
    workers: Annotated[int | None, _opt("--workers", "-j", metavar="N",
                                        help="Worker processes [default: one per core].")
                       ] = None,
    threads: Annotated[int | None, _opt("--threads", metavar="N",
                                        help="torch threads per worker [default: cores / "
                                             "workers]; lower it to leave cores free.")
                       ] = None,
    checkpoint_every: Annotated[float, _opt(
        "--checkpoint-every", metavar="SECONDS",
        help="Save an MQAR run's training state at most this often, so that a killed sweep "
             "continues it from there; 0: never.")] = 300.0,
    dry_run: Annotated[bool, _opt("--dry-run", help="Validate and list the runs; run none.")
                       ] = False,
    quiet: Quiet = False,
) -> None:
    """Run every config of EXPERIMENT, one seeded run per worker at a time. Each finished run
    is written atomically to DIR/runs/ and skipped when the sweep is run again; a run in flight
    saves its training state to DIR/partial/ every --checkpoint-every seconds and continues
    from it, so a killed sweep loses at most that much of each. Then `ttr report DIR`."""
    from ttr import sweep as s

    if workers is not None and workers < 1:
        raise typer.BadParameter(f"expected >= 1, got {workers}", param_hint="--workers")
    if threads is not None and threads < 1:
        raise typer.BadParameter(f"expected >= 1, got {threads}", param_hint="--threads")
    if not checkpoint_every >= 0:  # also NaN
        raise typer.BadParameter(f"expected seconds >= 0, got {checkpoint_every}",
                                 param_hint="--checkpoint-every")
    exp = s.get_experiment(experiment)
    mode = "quick" if quick else "full"
    out = out or Path("results/sweeps") / f"{Path(experiment).stem}-{mode}"
    if dry_run:
        runs = s.plan(exp, quick)
        done = s.finished(out)
        part = {r.id for r in runs if s.partial_path(out, r).exists()} - set(done)
        for r in runs:
            status = "done" if r.id in done else "part" if r.id in part else "todo"
            typer.echo(f"{status}  {r.file_name}")
        typer.echo(f"ttr sweep: {len(runs)} valid runs, {sum(r.id in done for r in runs)} "
                   f"finished in {out}" + (f", {len(part)} part-way" if part else ""))
        return
    s.run_sweep(exp, out, quick=quick, workers=workers, threads=threads, progress=not quiet,
                checkpoint_every=checkpoint_every,
                command=shlex.join(["ttr", *sys.argv[1:]]), log=typer.echo)


@app.command(short_help="Leaderboard (Markdown, CSV) and plots of a sweep's results.")
def report(
    results_dir: Annotated[Path, typer.Argument(metavar="RESULTS_DIR",
                                                help="The --out directory of `ttr sweep`.")],
) -> None:
    """Write RESULTS_DIR/leaderboard.md with its CSVs and PNG plots from the finished runs
    (a partial sweep gives a partial report, and says so)."""
    from ttr.experiments import leaderboard

    files = leaderboard.write(results_dir, command=shlex.join(["ttr", *sys.argv[1:]]))
    typer.echo(f"ttr report: wrote {', '.join(str(p) for p in files.values())}")


@app.command("compare-runs", short_help="Table and loss curves of several `ttr train` runs.")
def compare_runs(
    run_dirs: Annotated[list[Path], typer.Argument(metavar="RUN_DIR...",
                                                   help="`ttr train --out` directories.")],
    out: Annotated[Path, _opt("--out", "-o", metavar="DIR",
                              help="Where lm.md, lm.csv and lm_curves.png go.")
                   ] = Path("results/lm"),
) -> None:
    """Validation bits per byte, parameters, tokens and wall time of each run, best first,
    as Markdown and CSV, and the training / validation curves as a PNG."""
    from ttr.experiments import lm_compare

    files = lm_compare.write(run_dirs, out, command=shlex.join(["ttr", *sys.argv[1:]]))
    typer.echo(f"ttr compare-runs: wrote {', '.join(str(p) for p in files.values())}")


@app.command("bench-generate", short_help="Tokens/s of cached generation vs recomputation.")
def bench_generate(
    pattern: Annotated[list[str] | None, _opt(
        "--pattern", metavar="NAMES",
        help="Layer pattern, comma-separated catalogue names (repeatable: one model each) "
             "[default: gated_deltanet, mesa, softmax_attention, and a 3:1 hybrid].")] = None,
    new_tokens: Annotated[int, _opt("--new-tokens", metavar="N", help="Tokens to generate.")
                          ] = 1024,
    prompt_len: Annotated[int, _opt("--prompt-len", metavar="N", help="Prompt length.")] = 32,
    d_model: Annotated[int, _opt("--d-model", metavar="N", help="Model width.")] = 192,
    n_layers: Annotated[int, _opt("--n-layers", metavar="N", help="Layers.")] = 4,
    out: Annotated[Path | None, _opt("--out", "-o", metavar="FILE",
                                     help="Also write the table to this Markdown file.")
                   ] = None,
) -> None:
    """Greedy generation of --new-tokens bytes after a random prompt with a randomly initialized
    byte-level TTRForCausalLM, once with generate() and the recurrent cache and once by running
    the full forward for every new token. Needs the `hf` extra."""
    import torch

    from ttr.experiments.report import markdown_table
    from ttr.hf.bench import generation_table

    patterns = [tuple(p.split(",")) for p in pattern] if pattern else [
        ("gated_deltanet",), ("mesa",), ("softmax_attention",),
        ("gated_deltanet", "gated_deltanet", "gated_deltanet", "softmax_attention")]
    rows = generation_table(patterns, d_model=d_model, n_layers=n_layers,
                            prompt_len=prompt_len, new_tokens=new_tokens,
                            progress=lambda r: typer.echo(
                                f"{r['pattern']}: cached {r['cached_tok_s']:.0f} tok/s, "
                                f"recompute {r['recompute_tok_s']:.0f} tok/s", err=True))
    command = shlex.join(["ttr", *sys.argv[1:]])
    table = markdown_table(
        ["layers", "params", "cached tok/s", "recompute tok/s", "speedup"],
        [[r["pattern"], f"{r['params'] / 1e6:.2f} M", f"{r['cached_tok_s']:.0f}",
          f"{r['recompute_tok_s']:.1f}", f"{r['speedup']:.1f}x"] for r in rows])
    text = (f"Generation of {new_tokens} new tokens after a {prompt_len}-token prompt, batch 1, "
            f"greedy; d_model {d_model}, {n_layers} layers; {torch.get_num_threads()} threads."
            f"\n\nCommand: `{command}`\n\n{table}\n")
    typer.echo(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)


@app.command("list", short_help="The catalogue: every named architecture as a recipe.")
def list_(
    d_model: Annotated[int, _opt("--d-model", metavar="N",
                                 help="Model width for the state sizes.")] = 256,
    heads: Annotated[int, _opt("--heads", metavar="N", help="Heads for the state sizes.")] = 4,
    T: Annotated[int, _opt("--T", metavar="N",
                           help="Sequence length for KV-cache state sizes.")] = 2048,
    family: Annotated[str | None, _opt("--family", metavar="NAME",
                                       help="Only this family (e.g. 'online SGD').")] = None,
    name: Annotated[str | None, _opt("--name", metavar="NAME",
                                     help="Show one entry in full: its docstring, options "
                                          "and deviations from the original paper.")] = None,
) -> None:
    """Print the catalogue table: name, family, the three design choices (weights, function
    class, optimizer), the op that computes it, the recurrent state size per sequence (floats,
    at the given sizes) and the citation. Build one with
    `ttr.catalog.get(NAME, d_model=..., n_heads=...)`."""
    from ttr import catalog

    if name is not None:
        if name not in catalog.CATALOG:
            raise ValueError(f"--name: expected a catalogue entry, one of {catalog.names()}, "
                             f"got {name!r}")
        e = catalog.CATALOG[name]
        row = catalog.describe(name, d_model, heads, T)
        typer.echo("\n".join(f"{k}: {v}" for k, v in row.items()))
        typer.echo(f"options: {e.options}\nlayer defaults: {e.config}\n\n{e.doc}")
        return
    if family is not None and family not in catalog.FAMILIES:
        raise ValueError(f"--family: expected one of {list(catalog.FAMILIES)}, got {family!r}")
    typer.echo(catalog.table(d_model, heads, T, family=family))


@app.command(short_help="Train a byte-level LM on text (default: the Python stdlib).")
def train(
    out: Annotated[Path, _opt("--out", "-o", metavar="DIR",
                              help="Directory for log.csv and the checkpoint.")
                   ] = Path("runs/train"),
    resume: Annotated[bool, _opt(
        "--resume", help="Continue from DIR/checkpoint.pt (start afresh if there is none); "
                         "the model and trajectory options must match.")] = False,
    data: Annotated[Path | None, _opt(
        "--data", metavar="PATH",
        help="A text file or a directory of *.txt, *.py, *.md [default: the Python standard "
             "library's .py files].")] = None,
    max_bytes: Annotated[int | None, _opt("--max-bytes", metavar="N",
                                          help="Cap on the corpus size [default: 16 MiB].")
                         ] = None,
    pattern: Annotated[list[str] | None, _opt(
        "--pattern", metavar="NAME",
        help="Catalogue entry per layer (repeatable; one name = all layers) "
             "[default: gated_deltanet].")] = None,
    d_model: Annotated[int | None, _opt("--d-model", metavar="N",
                                        help="Model width [default: 128].")] = None,
    n_layers: Annotated[int | None, _opt("--n-layers", metavar="N",
                                         help="Layers [default: 4].")] = None,
    n_heads: Annotated[int | None, _opt("--n-heads", metavar="N",
                                        help="Heads per mixer [default: 4].")] = None,
    mixer: Annotated[list[str] | None, _opt(
        "--mixer", metavar="KEY=VALUE",
        help="A MixerConfig field or catalogue option for every layer, the value as JSON "
             "(repeatable), e.g. --mixer rope=10000.")] = None,
    steps: Annotated[int | None, _opt("--steps", metavar="N",
                                      help="Optimizer steps [default: 1000].")] = None,
    batch_size: Annotated[int | None, _opt(
        "--batch-size", metavar="N", help="Global batch, split over ranks [default: 16].")
                          ] = None,
    seq_len: Annotated[int | None, _opt("--seq-len", metavar="T",
                                        help="Bytes per sequence [default: 256].")] = None,
    lr: Annotated[float | None, _opt("--lr", metavar="LR",
                                     help="Peak learning rate [default: 3e-3].")] = None,
    warmup: Annotated[int | None, _opt("--warmup", metavar="N",
                                       help="Linear warmup steps [default: 100].")] = None,
    weight_decay: Annotated[float | None, _opt(
        "--weight-decay", metavar="FLOAT", help="AdamW decay of matrices [default: 0.1].")
                            ] = None,
    grad_clip: Annotated[float | None, _opt(
        "--grad-clip", metavar="FLOAT", help="Max gradient norm, 0 = off [default: 1.0].")
                         ] = None,
    eval_every: Annotated[int | None, _opt(
        "--eval-every", metavar="N", help="Validation every N steps [default: 100].")] = None,
    eval_batches: Annotated[int | None, _opt(
        "--eval-batches", metavar="N", help="Validation batches [default: 8].")] = None,
    ckpt_every: Annotated[int | None, _opt(
        "--ckpt-every", metavar="N", help="Checkpoint every N steps [default: 200].")] = None,
    bf16: Annotated[bool, _opt("--bf16", help="Autocast to bfloat16.")] = False,
    seed: Seed = 0,
    quiet: Quiet = False,
) -> None:
    """Train a byte-level causal LM with AdamW and a warmup + cosine schedule; log.csv gets
    the train loss every step and the validation loss and bits per byte every --eval-every.
    SIGINT / SIGTERM checkpoint and exit 0; --resume continues bit-identically on CPU. Under
    `torchrun --nproc_per_node=N -m ttr.train ...` it trains data-parallel."""
    from ttr import train as t

    model = dict(d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                 pattern=tuple(pattern) if pattern else None,
                 mixer_overrides=_key_values("--mixer", mixer) if mixer else None)
    given = dict(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, warmup=warmup,
                 weight_decay=weight_decay, grad_clip=grad_clip, eval_every=eval_every,
                 eval_batches=eval_batches, ckpt_every=ckpt_every, max_bytes=max_bytes)
    config = t.TrainConfig(
        model={k: v for k, v in model.items() if v is not None}, out_dir=str(out), seed=seed,
        bf16=bf16, data=None if data is None else str(data),
        **{k: v for k, v in given.items() if v is not None})
    result = t.run(config, resume=resume, progress=not quiet)
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(f"ttr: step {result['step']}/{config.steps}, train loss "
                   f"{result['train_loss']:.4f}, val bpb {result['val_bpb']:.4f}"
                   f"{' (stopped by signal; checkpointed)' if result['stopped'] else ''}; "
                   f"wrote {out / 'log.csv'}")


def _key_values(option: str, items: list[str]) -> dict:
    """KEY=VALUE strings -> a dict; VALUE is JSON (10000, true, "rms"), else the bare string."""
    import json

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint=option)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _error(message: str, code: int) -> int:
    print(f"ttr: error: {' '.join(str(message).split())}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit code (the console-script wrapper exits with it)."""
    from ttr.runtime import tune_allocator

    tune_allocator()  # every command is tensor-heavy (ttr.runtime: 1.7-2.1x at T = 8192)
    try:
        rv = app(args=argv, prog_name="ttr", standalone_mode=False)
    except click_exceptions.NoArgsIsHelpError as e:  # bare `ttr`: show the help
        print(e.format_message())
        return 0
    except click_exceptions.ClickException as e:  # usage errors (exit_code 2) and the like
        return _error(e.format_message(), e.exit_code)
    except typer.Abort:
        return _error("aborted", 1)
    except (ValueError, OSError, SweepFailed) as e:  # validation, paths, failed sweep runs
        if os.environ.get("TTR_DEBUG"):
            raise
        return _error(str(e), 1)
    return rv if isinstance(rv, int) else 0

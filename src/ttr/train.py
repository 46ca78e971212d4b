"""The training loop: a byte-level causal LM (`ttr.nn.lm`) on text (`ttr.tasks.text`).

Objective: the mean next-byte cross-entropy over the global batch,

    L = -1/(B T) sum_{b, t} log p(x[b, t+1] | x[b, :t+1]),   bits per byte = L / ln 2,

minimized by AdamW (weight decay on matrices only) at lr(s) = lr * min((s+1)/warmup, c(s)),
c(s) = 0.1 + 0.9 * (1 + cos(pi * (s - warmup) / (steps - warmup))) / 2: linear warmup, then a
cosine decay to a tenth of lr (torch's LambdaLR; s counts optimizer steps from 0).

    >>> result = run(TrainConfig(steps=200, out_dir="runs/a"))    # or `ttr train --steps 200`
    >>> result = run(TrainConfig(steps=400, out_dir="runs/a"), resume=True)  # error: steps differ

Files in out_dir: `log.csv` (one row per step; validation columns every eval_every steps),
`checkpoint.pt` + `model-<step>.safetensors`, and `tb/` if TensorBoard is importable.

Crash safety. A checkpoint is two files: the weights (safetensors) under a new name per step,
then `checkpoint.pt` -- optimizer, scheduler, RNG states (torch, python `random`, the data
generator), step, config, CSV byte offset, and the weights' file name and sha256 -- which is the
commit point. Each is written to a temporary file in out_dir, fsynced and os.replace'd, so a
kill at any moment leaves a consistent pair. Both are read without unpickling arbitrary objects
(safetensors; torch.load(weights_only=True) of plain dicts), and everything is validated
(readable, same model and trajectory config, hash, names and shapes) before anything is loaded.
SIGINT / SIGTERM set a flag; the loop finishes the current step, checkpoints and returns
(`ttr train` then exits 0). Resuming truncates log.csv to the checkpoint's offset, so a resumed
run's log and final loss equal the uninterrupted run's, bit for bit, on CPU.

Data parallelism. Under `torchrun --nproc_per_node=N` (RANK / WORLD_SIZE set) each rank builds
the same model, wraps it in DistributedDataParallel (gloo on CPU, nccl on CUDA) and takes its
batch_size // N rows of the global batch; gradients and the logged loss are averaged over
ranks, so training equals one process on the global batch up to summation order. Rank 0
evaluates, logs and checkpoints, between barriers.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import random
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ttr.configs import from_dict
from ttr.nn.lm import LM, LMConfig
from ttr.tasks.text import VOCAB_SIZE, load_text, sample_windows

CSV_COLUMNS = ("step", "train_loss", "val_loss", "val_bpb", "tokens_per_s", "lr", "wall_time")
# Fields that may change between a run and its resumption: they do not touch the trajectory.
FREE_ON_RESUME = ("eval_every", "eval_batches", "ckpt_every", "out_dir")
DEFAULT_MODEL = dict(vocab_size=VOCAB_SIZE, d_model=128, n_layers=4, n_heads=4,
                     pattern=("gated_deltanet",))


@dataclass(frozen=True)
class TrainConfig:
    """model: LMConfig fields as a dict (vocab_size defaults to 256, the bytes); batch_size is
    the global batch (split over ranks); lr is the peak; warmup in steps; grad_clip: max global
    grad norm (0 = off); eval_every / ckpt_every in steps (0 = only at the end); data: a text
    file or directory (None = the Python stdlib); max_bytes caps the corpus; bf16: autocast."""

    model: dict = field(default_factory=lambda: dict(DEFAULT_MODEL))
    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8
    ckpt_every: int = 200
    out_dir: str = "runs/train"
    seed: int = 0
    bf16: bool = False
    data: str | None = None
    max_bytes: int = 2**24

    def __post_init__(self):
        if not isinstance(self.model, dict):
            raise ValueError(f"TrainConfig.model: expected a dict of LMConfig fields, got "
                             f"{type(self.model).__name__}")
        model = {**DEFAULT_MODEL, **self.model}
        if model["vocab_size"] != VOCAB_SIZE:
            raise ValueError(f"TrainConfig.model.vocab_size: byte-level data needs "
                             f"{VOCAB_SIZE}, got {model['vocab_size']!r}")
        model = asdict(LMConfig.from_dict(model))  # validates; pattern becomes a tuple
        object.__setattr__(self, "model", model)
        for name, low in (("steps", 1), ("batch_size", 1), ("seq_len", 1), ("warmup", 0),
                          ("eval_every", 0), ("eval_batches", 1), ("ckpt_every", 0),
                          ("seed", 0), ("max_bytes", 2)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"TrainConfig.{name}: expected an int >= {low}, got {v!r}")
        for name in ("lr", "weight_decay", "grad_clip"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ValueError(f"TrainConfig.{name}: expected a number >= 0, got {v!r}")
        if not isinstance(self.bf16, bool):
            raise ValueError(f"TrainConfig.bf16: expected a bool, got {self.bf16!r}")
        object.__setattr__(self, "out_dir", str(self.out_dir))
        if self.data is not None:
            object.__setattr__(self, "data", str(self.data))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return from_dict(cls, d)


def lr_factor(step: int, warmup: int, steps: int) -> float:
    """lr(step) / lr: linear warmup, then cosine decay to 0.1 (module docstring)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


# -- checkpoints -------------------------------------------------------------------------------

def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """state_dict without aliases (tied embeddings): safetensors refuses shared storage."""
    out, seen = {}, set()
    for k, v in model.state_dict().items():
        if v.data_ptr() not in seen:
            seen.add(v.data_ptr())
            out[k] = v.detach().cpu().contiguous()
    return out


def save_checkpoint(out: Path, model, optimizer, scheduler, data_gen, step: int,
                    config: TrainConfig, csv_pos: int, wall: float) -> Path:
    from safetensors.torch import save

    blob = save(_weights(model))
    weights = f"model-{step:08d}.safetensors"
    _atomic_write(out / weights, blob)
    state = dict(format=1, step=step, config=asdict(config), csv_pos=csv_pos, wall=wall,
                 weights=weights, sha256=hashlib.sha256(blob).hexdigest(),
                 optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                 torch_rng=torch.get_rng_state(), data_rng=data_gen.get_state(),
                 python_rng=list(random.getstate()[1]))
    buf = io.BytesIO()
    torch.save(state, buf)
    path = out / "checkpoint.pt"
    _atomic_write(path, buf.getvalue())
    for old in out.glob("model-*.safetensors"):  # only after the commit point
        if old.name != weights:
            old.unlink()
    return path


def load_checkpoint(out: Path, config: TrainConfig, model: torch.nn.Module) -> dict:
    """Validate checkpoint.pt and its weights against `config` and `model`; return the state
    with the weights under "model". Raises ValueError before anything is loaded."""
    from safetensors.torch import load

    path = out / "checkpoint.pt"
    try:
        state = torch.load(path, weights_only=True)
        assert isinstance(state, dict) and state.get("format") == 1, "not a ttr checkpoint"
    except Exception as e:
        raise ValueError(f"checkpoint {str(path)!r} is corrupt or truncated and cannot be "
                         f"resumed ({type(e).__name__}: {e})") from None
    saved, now = state["config"], asdict(config)
    if saved["model"] != now["model"]:
        raise ValueError(f"checkpoint {str(path)!r} is incompatible: it was trained with model "
                         f"{saved['model']}, the config asks for {now['model']}")
    diff = sorted(k for k in now if k not in FREE_ON_RESUME and saved.get(k) != now[k])
    if diff:
        raise ValueError(f"checkpoint {str(path)!r} is incompatible: "
                         + ", ".join(f"{k}={saved.get(k)!r} there, {now[k]!r} here"
                                     for k in diff))
    wpath = out / state["weights"]
    blob = wpath.read_bytes() if wpath.is_file() else b""
    if hashlib.sha256(blob).hexdigest() != state["sha256"]:
        raise ValueError(f"checkpoint weights {str(wpath)!r} are missing, truncated or do not "
                         f"belong to {str(path)!r} (sha256 mismatch)")
    weights, expected = load(blob), _weights(model)
    bad = sorted(k for k in set(weights) | set(expected) if k not in weights or
                 k not in expected or weights[k].shape != expected[k].shape)
    if bad:
        raise ValueError(f"checkpoint weights {str(wpath)!r} do not fit the model: {bad}")
    return {**state, "model": weights}


# -- the loop ----------------------------------------------------------------------------------

@contextmanager
def _stop_on_signals():
    """Yield a dict whose "stop" becomes True on SIGINT / SIGTERM; old handlers come back."""
    flag = {"stop": False}
    main = threading.current_thread() is threading.main_thread()  # handlers live there only
    handler = lambda signum, frame: flag.update(stop=True)
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM) if main}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _init_distributed() -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


@torch.no_grad()
def evaluate(model, val: torch.Tensor, config: TrainConfig, device) -> float:
    """Mean loss over eval_batches fixed validation batches (same windows at every eval)."""
    gen = torch.Generator().manual_seed(config.seed + 1)
    model.eval()
    total = 0.0
    for _ in range(config.eval_batches):
        x = sample_windows(val, config.batch_size, config.seq_len, gen).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
            logits, _ = model(x[:, :-1])
        total += F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten()).item()
    model.train()
    return total / config.eval_batches


def run(config: TrainConfig, *, resume: bool = False, progress: bool = True,
        callback=None) -> dict:
    """Train per `config`; with resume=True continue from out_dir/checkpoint.pt (starting
    afresh if there is none). callback(step, row) is called after every step on rank 0.
    Returns {"step", "train_loss", "val_loss", "val_bpb", "stopped", "out_dir"}."""
    rank, world, device = _init_distributed()
    if config.batch_size % world:
        raise ValueError(f"batch_size: the global batch {config.batch_size} is not divisible "
                         f"by the {world} ranks")
    out = Path(config.out_dir)
    has_ckpt = (out / "checkpoint.pt").exists()
    if has_ckpt and not resume:
        raise ValueError(f"out_dir: {str(out)!r} already holds a checkpoint; resume it "
                         f"(resume=True, --resume) or choose another directory")
    data = load_text(config.data, max_bytes=config.max_bytes, min_len=config.seq_len + 1)

    torch.manual_seed(config.seed)
    random.seed(config.seed)
    data_gen = torch.Generator().manual_seed(config.seed)
    model = LM(LMConfig.from_dict(config.model)).to(device)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, config.warmup, config.steps))
    step, csv_pos, wall0 = 0, 0, 0.0
    if has_ckpt:
        state = load_checkpoint(out, config, model)  # validates everything, loads nothing
        model.load_state_dict(state["model"], strict=False)  # aliases are filled by their twin
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate((3, tuple(state["python_rng"]), None))
        data_gen.set_state(state["data_rng"])
        step, csv_pos, wall0 = state["step"], state["csv_pos"], state["wall"]
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    per_rank = config.batch_size // world
    rows = slice(rank * per_rank, (rank + 1) * per_rank)

    log = writer = bar = None
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        log = open(out / "log.csv", "r+" if csv_pos else "w", newline="")
        log.truncate(csv_pos)  # rows past the checkpoint are written again, identically
        log.seek(csv_pos)
        if not csv_pos:
            csv.writer(log).writerow(CSV_COLUMNS)
        writer = _tensorboard(out)
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=config.steps, initial=step, desc="train", dynamic_ncols=True)

    result = dict(step=step, train_loss=float("nan"), val_loss=float("nan"),
                  val_bpb=float("nan"), stopped=False, out_dir=str(out))
    t_start = time.perf_counter() - wall0
    try:
        with _stop_on_signals() as flag:
            while step < config.steps:
                t0 = time.perf_counter()
                lr = scheduler.get_last_lr()[0]
                x = sample_windows(data.train, config.batch_size, config.seq_len, data_gen,
                                   rows).to(device)  # [B / world, T + 1]
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
                    logits, _ = net(x[:, :-1])  # [B / world, T, V]
                loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
                loss.backward()
                if config.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                # one collective for the logged loss and the stop flag of every rank
                shared = torch.tensor([loss.item(), float(flag["stop"])], dtype=torch.float64)
                if world > 1:
                    dist.all_reduce(shared)
                train_loss, stop = shared[0].item() / world, shared[1].item() > 0
                result["train_loss"] = train_loss
                ckpt = stop or step == config.steps or (
                    config.ckpt_every and step % config.ckpt_every == 0)
                if rank == 0:
                    row = _log_step(step, train_loss, lr, t0, t_start, config, model, data,
                                    device, log, writer, bar, result)
                    if callback is not None:
                        callback(step, row)
                if ckpt:
                    if world > 1:
                        dist.barrier()
                    if rank == 0:
                        log.flush()
                        os.fsync(log.fileno())
                        save_checkpoint(out, model, optimizer, scheduler, data_gen, step,
                                        config, log.tell(), time.perf_counter() - t_start)
                    if world > 1:
                        dist.barrier()
                if stop:
                    result["stopped"] = True
                    break
    finally:
        for h in (bar, writer, log):
            if h is not None:
                h.close()
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    result["step"] = step
    return result


def _log_step(step, train_loss, lr, t0, t_start, config, model, data, device, log, writer,
              bar, result) -> dict:
    """Rank 0: evaluate if due, then one CSV row, TensorBoard scalars and the progress bar."""
    tokens_per_s = config.batch_size * config.seq_len / (time.perf_counter() - t0)
    val_loss = val_bpb = None
    if step == config.steps or (config.eval_every and step % config.eval_every == 0):
        val_loss = evaluate(model, data.val, config, device)
        val_bpb = val_loss / math.log(2)
        result.update(val_loss=val_loss, val_bpb=val_bpb)
    row = dict(step=step, train_loss=train_loss, val_loss=val_loss, val_bpb=val_bpb,
               tokens_per_s=tokens_per_s, lr=lr, wall_time=time.perf_counter() - t_start)
    csv.writer(log).writerow(["" if row[k] is None else repr(row[k]) for k in CSV_COLUMNS])
    log.flush()
    if writer is not None:
        for k in ("train_loss", "val_loss", "val_bpb", "lr", "tokens_per_s"):
            if row[k] is not None:
                writer.add_scalar(k, row[k], step)
    if bar is not None:
        bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tokens_per_s:.0f}",
                        **({"val_bpb": f"{val_bpb:.3f}"} if val_bpb is not None else {}))
        bar.update(1)
    return row


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter  # optional: needs tensorboard
    except ImportError:
        return None
    return SummaryWriter(str(out / "tb"))


def read_log(path) -> list[dict]:
    """log.csv as a list of rows (floats; None for empty cells)."""
    with open(path, newline="") as f:
        return [{k: (float(v) if v else None) for k, v in r.items()} for r in csv.DictReader(f)]


if __name__ == "__main__":  # `python -m ttr.train ...` == `ttr train ...` (torchrun -m ttr.train)
    import sys

    from ttr.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))

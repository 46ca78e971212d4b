"""`ttr sweep`: run an experiment -- a list of run configs, as zoology's sweep files are -- in
parallel worker processes, resumably.

    >>> summary = run_sweep(get_experiment("mqar_catalogue"), Path("results/mqar_cat"), quick=True)

An experiment is a module (a shipped one from `ttr.experiments.sweeps.EXPERIMENTS`, or any
Python file passed by path) with `runs(quick: bool) -> list[dict]`. Each dict names a task of
`TASKS` under "task" and gives that task's config fields; the task's config dataclass validates
it. Every config is validated before anything runs, and an invalid one is reported by its index
and label, with the dataclass's message naming the field.

Layout of a results directory:

    sweep.json            the experiment, mode and command of the first invocation
    runs/<label>-<id>.json one file per finished run: {"task", "config", "result", "seconds",
                          "finished"}; <id> is a hash of the task and its full config
    partial/<label>-<id>.pt the training state of a run in flight (resumable tasks), removed
                          once its result is written; partial/.gitignore keeps them out of git
                          (to carry a run longer than a sitting to another clone, commit its
                          file with `git add -f`: any file there is a whole save)
    partial/.lock         held (flock) by the sweep running on the directory: a second one is
                          refused

Resumability. A worker writes its result to a temporary file in runs/, fsyncs it and renames it
into place, so a run's file exists only once the run has finished; a restart skips every run
whose file exists (and is readable) and redoes the rest. Each run is seeded by its config alone,
so where and in what order it runs does not change its result. A resumable task (MQAR) also
saves its training state, atomically, at most every `checkpoint_every` seconds (`Checkpoint`),
and a restart continues such a run from its last save: killing the sweep at any moment loses at
most that much of the runs in flight. (fig3's longest runs take hours, longer than one sitting.)

Progress: one bar for the sweep (runs done / total, ETA) and one per worker for the run it is
on (its task reports steps through a callback). The sweep's bar advances as the runs in flight
report their steps. An experiment whose runs differ in cost may define `cost(config: dict) ->
float`, each run's estimated seconds (any unit: only the ratios count); the bar then weighs each
run by it, so that its ETA does not take fig3's last runs, the longest, for the average run.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import multiprocessing as mp
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

from tqdm.auto import tqdm

CHECKPOINT_EVERY = 300.0  # seconds between saves of a run in flight (`Checkpoint`)


class SweepFailed(Exception):
    """Some runs raised; the sweep finished the others. Rerunning retries the failed ones."""


@dataclass(frozen=True)
class Task:
    """A kind of run: `config` is a dataclass with `from_dict` (it validates), `run(config,
    progress)` returns a JSON-able dict, `progress(done, total)` reports steps within the run,
    and `label(config)` names the run for humans (file names, progress bars). A `resumable`
    task's run takes a third argument, its `Checkpoint` (or None), and must give the same
    result whether or not it was resumed."""

    config: type
    run: Callable[..., dict]
    label: Callable[[Any], str]
    resumable: bool = False


def _tasks() -> dict[str, Task]:
    # The registry of tasks, built on first use so that `import ttr.sweep` stays light.
    from ttr.experiments import sweep_tasks as st

    return {"mqar": Task(st.MQARRun, st.run_mqar, st.MQARRun.label, resumable=True),
            "online_regression": Task(st.RegressionRun, st.run_regression,
                                      st.RegressionRun.label)}


class Checkpoint:
    """The saved state of one run in flight: `load()` at the start (None if there is none),
    `save(state)` whenever `due()`; the sweep removes the file once the run's result is
    written. `state` is a dict of tensors, numbers, lists and state dicts (what
    `torch.load(weights_only=True)` reads back). A save is atomic -- a temporary file, fsync,
    rename -- so a kill leaves the previous save or the new one, never a torn file.

    Wall time carries over: `seconds()` adds the earlier segments' time to this one's, and
    `segments` counts the processes the run took (1 if never resumed)."""

    def __init__(self, path: Path, every: float):
        if not every > 0:
            raise ValueError(f"checkpoint_every: expected seconds > 0, got {every!r}")
        self.path, self.every = Path(path), float(every)
        self.before, self.segments = 0.0, 1
        self._start = self._saved = time.monotonic()

    def load(self) -> dict | None:
        import torch

        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, weights_only=True)
            before, segments = state.pop("_seconds"), state.pop("_segments")
        except Exception:  # cannot happen with atomic writes, unless edited: start over
            return None
        self.before, self.segments = before, segments + 1
        return state

    def due(self) -> bool:
        return time.monotonic() - self._saved >= self.every

    def seconds(self) -> float:
        return self.before + (time.monotonic() - self._start)

    def save(self, state: dict) -> None:
        import torch

        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            torch.save({**state, "_seconds": self.seconds(), "_segments": self.segments}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._saved = time.monotonic()


def get_experiment(name_or_path: str) -> ModuleType:
    """A shipped experiment by name, or a Python file defining `runs(quick) -> list[dict]`."""
    from ttr.experiments.sweeps import EXPERIMENTS

    if name_or_path in EXPERIMENTS:
        return EXPERIMENTS[name_or_path]
    path = Path(name_or_path).resolve()
    if path.suffix != ".py" or not path.is_file():
        raise ValueError(f"EXPERIMENT: expected one of {sorted(EXPERIMENTS)} or a .py file "
                         f"defining runs(quick), got {name_or_path!r}")
    spec = importlib.util.spec_from_file_location(f"ttr_sweep_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "runs", None)):
        raise ValueError(f"EXPERIMENT: {path} defines no function runs(quick) -> list[dict]")
    module.NAME = getattr(module, "NAME", path.stem)
    module.SPEC = str(path)  # how `ttr report` finds the experiment again
    return module


@dataclass(frozen=True)
class Run:
    task: str
    config: Any  # the task's validated config dataclass
    label: str
    id: str

    @property
    def file_name(self) -> str:
        return f"{self.label}-{self.id}.json"


def plan(experiment: ModuleType, quick: bool) -> list[Run]:
    """The experiment's runs, every one validated; duplicates (same task and config) are
    errors, since they would share a result file."""
    tasks = _tasks()
    raw = experiment.runs(quick)
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{_name(experiment)}.runs({quick}): expected a non-empty list of "
                         f"dicts, got {type(raw).__name__} of length {len(raw or ())}")
    runs, seen = [], {}
    for i, spec in enumerate(raw):
        where = f"{_name(experiment)} config {i}"
        if not isinstance(spec, dict) or spec.get("task") not in tasks:
            got = spec.get("task") if isinstance(spec, dict) else spec
            raise ValueError(f"{where}: expected a dict with 'task' one of {sorted(tasks)}, "
                             f"got {got!r}")
        fields = {k: v for k, v in spec.items() if k != "task"}
        task = tasks[spec["task"]]
        try:
            config = task.config.from_dict(fields)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{where} ({_short(fields)}): {e}") from None
        # None-valued fields are left out, so that a field added later with default None
        # leaves the ids, and so the result files, of the runs recorded before it valid
        canonical = json.dumps({"task": spec["task"], **{k: v for k, v in asdict(config).items()
                                                         if v is not None}}, sort_keys=True)
        run_id = hashlib.sha256(canonical.encode()).hexdigest()[:10]
        if run_id in seen:
            raise ValueError(f"{where}: the same run as config {seen[run_id]} ({_short(fields)})")
        seen[run_id] = i
        runs.append(Run(spec["task"], config, task.label(config), run_id))
    return runs


def _name(experiment: ModuleType) -> str:
    return getattr(experiment, "NAME", experiment.__name__.rsplit(".", 1)[-1])


def _short(fields: dict) -> str:
    text = ", ".join(f"{k}={v!r}" for k, v in fields.items())
    return text if len(text) < 160 else text[:157] + "..."


def finished(out_dir: Path) -> dict[str, dict]:
    """Run id -> record, for every readable result file in out_dir/runs."""
    records = {}
    for path in sorted((Path(out_dir) / "runs").glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # cannot happen with atomic writes, unless edited by hand: redo the run
        records[path.stem.rsplit("-", 1)[-1]] = record
    return records


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over `path`: a
    reader sees the old file or the whole new one, never a partial write."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# -- workers ------------------------------------------------------------------------------------

_PROGRESS = None  # in a worker: the queue its runs report their steps on (None: no bars)


def _init_worker(threads: int, parent: int, progress_queue) -> None:
    """progress_queue: a plain multiprocessing queue, handed over when the worker starts (a
    Manager's queue could travel with each run, but its server process outlived a killed
    sweep, and with it multiprocessing's resource tracker)."""
    import torch

    global _PROGRESS
    _PROGRESS = progress_queue
    torch.set_num_threads(threads)
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()


def _exit_with(parent: int, every: float = 1.0) -> None:
    """End this worker within `every` seconds of the sweep's own process. A worker outlives a
    `kill` of the sweep's process alone (only a signal to the whole process group reaches it):
    it went on with its run and the runs queued for it, beside the workers of the restarted
    sweep, two runs per core (seen on the fig3 sweep). Its saved state stays for the restart."""
    while os.getppid() == parent:
        time.sleep(every)
    os._exit(1)


def _work(run: Run, out_dir: str, checkpoint_every: float | None) -> tuple[str, float]:
    """In a worker: run one config (from its checkpoint, if a resumable task left one) and
    record it atomically. Returns (run id, seconds)."""
    task = _tasks()[run.task]
    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if _PROGRESS is not None and (now - last[0] > 0.5 or done == total):
            last[0] = now
            _PROGRESS.put((run.id, run.label, done, total))

    start = time.perf_counter()
    if task.resumable:
        ckpt = (Checkpoint(partial_path(Path(out_dir), run), checkpoint_every)
                if checkpoint_every else None)
        result = task.run(run.config, progress, ckpt)
    else:
        ckpt, result = None, task.run(run.config, progress)
    # with a checkpoint, the earlier segments' time too
    seconds = ckpt.seconds() if ckpt else time.perf_counter() - start
    record = {"task": run.task, "config": asdict(run.config), "label": run.label,
              "result": result, "seconds": round(seconds, 3),
              "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if ckpt is not None and ckpt.segments > 1:
        record["segments"] = ckpt.segments  # the processes the run took (it was resumed)
    write_json_atomic(Path(out_dir) / "runs" / run.file_name, record)
    if task.resumable:  # a saved state, even one this run did not read, is done with
        partial_path(Path(out_dir), run).unlink(missing_ok=True)
    return run.id, seconds


def partial_path(out_dir: Path, run: Run) -> Path:
    """Where a resumable run in flight keeps its `Checkpoint`."""
    return out_dir / "partial" / f"{run.label}-{run.id}.pt"


def run_sweep(experiment: ModuleType, out_dir: Path, *, quick: bool = False,
              workers: int | None = None, threads: int | None = None, progress: bool = True,
              command: str = "", checkpoint_every: float | None = CHECKPOINT_EVERY,
              log: Callable[[str], None] = print, start_method: str = "spawn") -> dict:
    """Run every unfinished run of the experiment; returns {"total", "skipped", "ran", "failed",
    "resumed", "seconds"}. Validation happens before any worker starts. A run that raises is
    reported and leaves no result file; the others go on, and at the end SweepFailed lists the
    failed runs (so a rerun retries exactly those). `threads`: torch threads per worker (default
    cores // workers). `checkpoint_every`: seconds between the saves of a resumable run's
    training state (None or 0: no saves, so a killed run starts over). `start_method`:
    multiprocessing's."""
    if checkpoint_every is not None and (isinstance(checkpoint_every, bool)
                                         or not checkpoint_every >= 0):
        raise ValueError(f"checkpoint_every: expected seconds >= 0 or None, got "
                         f"{checkpoint_every!r}")
    runs = plan(experiment, quick)
    costs = estimated_costs(experiment, runs)
    out_dir = Path(out_dir)
    name = _name(experiment)
    meta_path = out_dir / "sweep.json"
    mode = "quick" if quick else "full"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if (meta.get("experiment"), meta.get("mode")) != (name, mode):
            raise ValueError(f"--out: {out_dir} holds the {meta.get('mode')} sweep of "
                             f"{meta.get('experiment')!r}, not the {mode} sweep of {name!r}; "
                             f"expected a fresh directory")
    (out_dir / "partial").mkdir(parents=True, exist_ok=True)
    with _exclusive(out_dir / "partial" / ".lock", out_dir):  # before touching any file
        (out_dir / "runs").mkdir(exist_ok=True)
        (out_dir / "partial" / ".gitignore").write_text("*\n")  # transient: never committed
        for stale in [*(out_dir / "runs").glob(".*.tmp"), *(out_dir / "partial").glob(".*.tmp")]:
            stale.unlink()  # partial writes of killed workers
        if not meta_path.exists():
            write_json_atomic(meta_path, {"experiment": name, "mode": mode, "command": command,
                                          "spec": getattr(experiment, "SPEC", name),
                                          "started": datetime.now(timezone.utc).isoformat(
                                              timespec="seconds")})
        done = finished(out_dir)
        todo = [r for r in runs if r.id not in done]
        resumed = [r for r in todo if checkpoint_every and partial_path(out_dir, r).exists()]
        summary = {"total": len(runs), "skipped": len(runs) - len(todo), "ran": 0, "failed": [],
                   "resumed": len(resumed), "seconds": 0.0}
        if not todo:
            log(f"ttr sweep: all {len(runs)} runs of {name} ({mode}) are already in {out_dir}; "
                f"nothing to do")
            return summary
        if summary["skipped"]:
            log(f"ttr sweep: {summary['skipped']} of {len(runs)} runs already finished; "
                f"running the other {len(todo)}")
        if resumed:
            log(f"ttr sweep: {len(resumed)} of them continue from their saved state "
                f"({', '.join(r.label for r in resumed[:3])}{', ...' if len(resumed) > 3 else ''})")
        workers = workers or os.cpu_count() or 1
        workers = max(1, min(workers, len(todo)))
        threads = threads or max(1, (os.cpu_count() or 1) // workers)
        start = time.perf_counter()
        ctx = mp.get_context(start_method)  # spawn: no fork after torch's thread pools exist
        pq = ctx.Queue() if progress else None
        total_bar = SweepProgress(runs, set(done), costs, f"sweep {name}", enabled=progress)
        bars: dict[str, tuple[tqdm, int]] = {}  # run id -> (its bar, the bar's screen line)
        free = list(range(1, workers + 1))
        try:
            with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                     initargs=(threads, os.getpid(), pq)) as pool:
                pending = {pool.submit(_work, r, str(out_dir), checkpoint_every): r
                           for r in todo}
                while pending:
                    ready, _ = wait(pending, timeout=0.3, return_when=FIRST_COMPLETED)
                    _drain(pq, bars, free, total_bar)
                    for fut in ready:
                        run = pending.pop(fut)
                        try:
                            fut.result()
                            summary["ran"] += 1
                        except Exception as e:  # no result file: a rerun retries it
                            summary["failed"].append(run.file_name)
                            tqdm.write(f"ttr sweep: run {run.label} failed: {type(e).__name__}: "
                                       f"{str(e)[:300]}")
                        total_bar.finish(run.id)
                        bar, line = bars.pop(run.id, (None, None))
                        if bar is not None:
                            free.append(line)
                            bar.close()
        finally:
            for bar, _ in bars.values():
                bar.close()
            total_bar.close()
            if pq is not None:
                pq.close()
        summary["seconds"] = round(time.perf_counter() - start, 1)
        log(f"ttr sweep: ran {summary['ran']} runs in {summary['seconds']:.0f} s "
            f"({summary['skipped']} skipped); results in {out_dir / 'runs'}")
        if summary["failed"]:
            raise SweepFailed(f"{len(summary['failed'])} of {len(todo)} runs failed (their errors "
                               f"are above; rerunning the sweep retries only them): "
                               f"{', '.join(summary['failed'][:5])}")
        return summary


@contextmanager
def _exclusive(lock: Path, out_dir: Path):
    """Hold an exclusive lock on `lock` while a sweep runs on `out_dir`: a second sweep on the
    same directory would run the same runs and remove the first one's temporary files. The
    kernel drops the lock with the process, however it ends (flock, not a pid file)."""
    try:
        import fcntl
    except ImportError:  # not on Windows: no lock there
        yield
        return
    with open(lock, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise ValueError(f"--out: another ttr sweep is running on {out_dir} "
                             f"({f.read().strip() or 'pid unknown'}); expected it to have "
                             f"ended") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}\n")
        f.flush()
        yield


def estimated_costs(experiment: ModuleType, runs: list[Run]) -> dict[str, float] | None:
    """Run id -> the experiment's `cost` of the run's config (a dict with "task", as `runs()`
    gives it), validated before any run starts; None if the experiment has no `cost`."""
    cost = getattr(experiment, "cost", None)
    if cost is None:
        return None
    out = {}
    for run in runs:
        c = cost({"task": run.task, **asdict(run.config)})
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 < c < float("inf"):
            raise ValueError(f"{_name(experiment)}.cost: expected a positive finite number for "
                             f"{run.label}, got {c!r}")
        out[run.id] = float(c)
    return out


class SweepProgress:
    """The sweep's bar: the fraction of the work done, runs done / total beside it, and the
    ETA. Work is counted in run costs (`estimated_costs`; without them every run counts 1),
    credited as the runs in flight report their steps. A run's first report is its baseline:
    a resumed run's earlier steps were done before this process started, so they come off the
    total instead of counting as work done now (which would have inflated the rate, so the
    ETA, by the saved part of every resumed run)."""

    def __init__(self, runs: list[Run], done: set[str], costs: dict[str, float] | None,
                 desc: str, enabled: bool = True):
        self.cost = costs or {r.id: 1.0 for r in runs}
        self.credited: dict[str, float] = {}  # run id -> fraction of it credited so far
        self.runs, self.runs_done = len(runs), sum(r.id in done for r in runs)
        self.total = sum(self.cost.values())
        self.n = sum(self.cost[r.id] for r in runs if r.id in done)
        self.desc = desc
        # the run count goes into the description: a postfix is printed after a comma
        self.bar = tqdm(total=self.total, initial=self.n, desc=desc, disable=not enabled,
                        dynamic_ncols=True, position=0,
                        bar_format="{l_bar}{bar}| [{elapsed}<{remaining}]")
        self._describe()

    def step(self, run_id: str, done: int, total: int) -> None:
        frac = min(done / max(total, 1), 1.0)
        if run_id not in self.credited:  # the baseline: not work of this process
            self.credited[run_id] = frac
            self.total -= self.cost[run_id] * frac
            self.bar.total = self.total
            self.bar.refresh()
            return
        self._credit(run_id, frac)

    def finish(self, run_id: str) -> None:
        self.credited.setdefault(run_id, 0.0)
        self._credit(run_id, 1.0)
        self.runs_done += 1
        if self.runs_done == self.runs:  # the float sums may differ in the last bit: the bar
            self.n = self.bar.n = self.bar.total = self.total  # stopped a glyph short of full
            self.bar.refresh()
        self._describe()

    def close(self) -> None:
        self.bar.close()

    def _credit(self, run_id: str, frac: float) -> None:
        more = self.cost[run_id] * (frac - self.credited[run_id])
        if more > 0:
            self.credited[run_id] = frac
            self.n += more
            self.bar.update(more)

    def _describe(self) -> None:
        self.bar.set_description_str(f"{self.desc} ({self.runs_done}/{self.runs} runs)")


def _drain(pq, bars: dict, free: list, sweep_bar: SweepProgress) -> None:
    """Move per-run progress messages from the workers onto one bar per run in flight, and
    credit them to the sweep's bar."""
    if pq is None:
        return
    while True:
        try:
            run_id, label, done, total = pq.get_nowait()
        except queue.Empty:
            return
        sweep_bar.step(run_id, done, total)
        if run_id not in bars:
            if not free:
                continue
            line = free.pop(0)
            # initial: a resumed run starts part-way, and its rate counts only new steps
            bars[run_id] = tqdm(total=total, initial=done, desc=label, position=line,
                                leave=False, dynamic_ncols=True), line
        bar = bars[run_id][0]
        bar.update(done - bar.n)

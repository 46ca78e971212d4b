"""`ttr bench`: time every op x form x sequence length on identical inputs, in one run.

Per case: median (min, max) over `repeats` back-to-back runs, after one warm-up, of the forward
(under no_grad) and of forward+backward (backward of sum(o * w), w fixed random weights, w.r.t.
q, k, v and every per-token parameter); the peak memory of forward+backward; achieved GFLOP/s from
the analytic counts of `FLOPS` next to the fp32 (and bf16) matmul rate measured at the start
of the same run; the speedup of each form over the recurrent form of the same op.

Each case runs in a fresh `python -m ttr.bench --case JSON` process: torch does not track CPU
allocations, so peak memory is the rise of `getrusage(RUSAGE_SELF).ru_maxrss` over its value
once the inputs exist, and no case inherits another's allocator state or warm caches.
The results are in docs/benchmarks.md with the command that produced them.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import gc
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time

import torch

from ttr import bench_peers
from ttr.bench_cases import CHUNK, FWD_BWD, OPS, cap, flops
from ttr.runtime import allocator_description

# -- one case, in its own process ---------------------------------------------------------------

def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _reset_peak_rss() -> None:
    """Lower the high-water mark to the current RSS (Linux >= 4.0), so that the peak counts
    from the inputs, not from the transient peaks of `import torch`; else keep the old mark
    (then small cases can read 0)."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure(case: dict) -> dict:
    """Run one case in this process: {op, form, T, d, heads, dtype, compile, repeats, threads}."""
    torch.set_num_threads(case["threads"])
    torch.manual_seed(0)
    op = OPS[case["op"]]
    inputs = [x.requires_grad_() for x in op.make(1, case["T"], case["heads"], case["d"])]
    w = torch.randn(1, case["T"], case["heads"], case["d"])  # o's weights in the loss

    if case["form"].startswith("fla:"):
        eager = bench_peers.load(_peer(case["op"], case["form"]))
    else:
        def eager(*xs):
            return op.fn(*xs, form=case["form"], **op.kwargs)[0]

    call = torch.compile(eager, fullgraph=True) if case["compile"] else eager
    bf16 = case["dtype"] == "bf16"

    def amp():
        return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def fwd():
        with torch.no_grad(), amp():
            return call(*inputs)

    def fwd_bwd():
        for x in inputs:
            x.grad = None
        with amp():
            o = call(*inputs)
        (o.float() * w).sum().backward()

    gc.collect()
    _reset_peak_rss()
    base = _maxrss_mb()
    t0 = time.perf_counter()
    try:
        fwd_bwd()  # warm-up; also compiles
        fwd()
    except Exception as e:  # a compile failure or graph break is a result, not a crash
        kind = "compile" if case["compile"] else "run"
        return {"error": f"{kind} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    result = {"warmup_s": time.perf_counter() - t0}
    # Each in its own block of back-to-back calls, as the matmul rate is measured: a forward
    # timed right after a forward + backward finds its inputs flushed from the cache by the
    # backward (linear attention, T = 2048, the 2-core Xeon: 10.3 ms against 7.5 back to back).
    times = {"fwd": [], "fwd_bwd": []}
    for name, f in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
        f()  # the other block ran last: one call to settle
        for _ in range(case["repeats"]):
            t = time.perf_counter()
            f()
            times[name].append(1e3 * (time.perf_counter() - t))
    result["peak_mb"] = _maxrss_mb() - base
    if op.iterations is not None and case["form"] == "chunk":
        with torch.no_grad():
            result["iterations"] = op.iterations(*inputs)
    for name, ts in times.items():
        result[name] = (statistics.median(ts), min(ts), max(ts))
    if bf16:
        with torch.no_grad():
            ref = eager(*inputs).double()
            result["rel_err"] = float((fwd().double() - ref).norm() / ref.norm())
    return result


# -- the run ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """What to run. Empty `ops` / `forms` mean all; `threads` None = torch's default."""

    ops: tuple[str, ...] = ()
    forms: tuple[str, ...] = ()
    Ts: tuple[int, ...] = (512, 2048, 8192)
    d: int = 64
    heads: int = 16
    repeats: int = 5
    dtypes: tuple[str, ...] = ("fp32",)
    compile: bool = False
    threads: int | None = None
    caps: bool = True
    matmul_size: int = 2048
    peers: bool = False  # also time the installed peers' references (ttr.bench_peers)

    def __post_init__(self):
        for name, got, allowed in (("op", self.ops, list(OPS)), ("dtype", self.dtypes,
                                   ["fp32", "bf16"]),
                                   ("form", self.forms, sorted({f for o in OPS.values()
                                                                for f in o.forms}))):
            bad = [x for x in got if x not in allowed]
            if bad:
                raise ValueError(f"{name}: expected one of {allowed}, got {bad[0]!r}")
        for name in ("d", "heads", "repeats", "matmul_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive int, got {getattr(self, name)}")
        if not self.Ts or min(self.Ts) < 1:
            raise ValueError(f"T: expected positive sequence lengths, got {list(self.Ts)}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads: expected a positive int, got {self.threads}")
        if not self.cases():
            raise ValueError(f"form: none of {list(self.forms)} is a form of {list(self.ops)}")

    def cases(self) -> list[tuple[str, str, int, str, bool]]:
        """(op, form, T, dtype, compiled) in table order."""
        out = []
        for name in self.ops or OPS:
            for T in self.Ts:
                for form in OPS[name].forms:
                    if self.forms and form not in self.forms:
                        continue
                    for dt in self.dtypes:
                        out.append((name, form, T, dt, False))
                        if self.compile and form == "chunk":
                            out.append((name, form, T, dt, True))
                if self.peers:  # fp32 only: the references upcast to float32 themselves
                    out += [(name, p.form, T, "fp32", False) for p in bench_peers.available()
                            if p.op == name and (not self.forms or p.like in self.forms)]
        return out


@dataclasses.dataclass
class Row:
    """One measured case. Times in ms (median, min, max over `repeats`), memory in MiB, rates
    in GFLOP/s; None where not run or not applicable; `note` says why."""

    op: str
    form: str
    T: int
    dtype: str
    compiled: bool
    repeats: int
    fwd_ms: float | None = None
    fwd_min_ms: float | None = None
    fwd_max_ms: float | None = None
    fwd_bwd_ms: float | None = None
    fwd_bwd_min_ms: float | None = None
    fwd_bwd_max_ms: float | None = None
    peak_mb: float | None = None
    gflop: float = 0.0  # analytic forward GFLOP per call
    gflops_fwd: float | None = None
    gflops_fwd_bwd: float | None = None
    pct_matmul_fwd: float | None = None  # forward rate / matmul rate of the same dtype
    speedup_fwd: float | None = None  # recurrent time / this time, same op, T, dtype
    speedup_fwd_bwd: float | None = None
    bf16_speedup_fwd_bwd: float | None = None  # fp32 time / this bf16 time
    rel_err: float | None = None  # bf16: relative L2 error of o vs the fp32 forward
    note: str = ""


def matmul_gflops(n: int, dtype: torch.dtype, repeats: int = 10,
                  budget_s: float = 5.0) -> tuple[float, int]:
    """Median rate of n x n @ n x n in this process (after two warm-ups), and the n measured.

    n is halved (down to 256) while the repeats would take more than `budget_s` by a 256 x 256
    probe: on a CPU without native bf16 (AVX2 only) a 2048^2 bf16 matmul takes ~20 s, and the
    rate is the same at 512."""
    probe = torch.randn(256, 256, dtype=dtype)
    probe @ probe
    t = time.perf_counter()
    probe @ probe
    per_256 = time.perf_counter() - t
    while n > 256 and (repeats + 2) * per_256 * (n / 256) ** 3 > budget_s:
        n //= 2
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    ts = []
    for _ in range(repeats + 2):
        t = time.perf_counter()
        a @ b
        ts.append(time.perf_counter() - t)
    ts = ts[2:]  # the first calls pay for thread-pool start-up and page faults
    return 2 * n**3 / statistics.median(ts) / 1e9, n


def _run_case(case: dict) -> dict:
    proc = subprocess.run([sys.executable, "-m", "ttr.bench", "--case", json.dumps(case)],
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        # SIGKILL is what the kernel's out-of-memory killer sends; other signals came from a user
        why = ("crashed" if proc.returncode > 0 else "killed (out of memory?)"
               if proc.returncode == -signal.SIGKILL else
               f"stopped by {signal.Signals(-proc.returncode).name}")
        tail = (proc.stderr.strip().splitlines() or [""])[-1][:200]
        return {"error": f"{why}: exit {proc.returncode} {tail}".strip()}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(config: BenchConfig, command: str = "", progress: bool = True) -> dict:
    """Run every case; returns {"header": {...}, "rows": [Row, ...]}."""
    from tqdm import tqdm

    load = os.getloadavg()[0]
    start = time.perf_counter()
    threads = config.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    measured = {dt: matmul_gflops(config.matmul_size, torch.float32 if dt == "fp32"
                                  else torch.bfloat16) for dt in config.dtypes}
    rates = {dt: rate for dt, (rate, _) in measured.items()}
    rows = []
    for op, form, T, dt, compiled in tqdm(config.cases(), desc="ttr bench", disable=not progress):
        repeats = config.repeats
        like = _peer(op, form).like if form.startswith("fla:") else form  # its algorithm
        row = Row(op, form, T, dt, compiled, repeats,
                  gflop=flops(op, like, T, config.d, config.heads) / 1e9)
        limit = cap(op, like) if config.caps else None
        if limit and T > limit[0]:
            row.note = f"not run: T > {limit[0]} ({limit[1]}; --no-caps runs it)"
            rows.append(row)
            continue
        res = _run_case(dict(op=op, form=form, T=T, d=config.d, heads=config.heads, dtype=dt,
                             compile=compiled, repeats=repeats, threads=threads))
        if "error" in res:
            row.note = res["error"]
        else:
            row.fwd_ms, row.fwd_min_ms, row.fwd_max_ms = res["fwd"]
            row.fwd_bwd_ms, row.fwd_bwd_min_ms, row.fwd_bwd_max_ms = res["fwd_bwd"]
            row.peak_mb, row.rel_err = res["peak_mb"], res.get("rel_err")
            if "iterations" in res:  # an iterative form: count the iterations it took
                row.gflop = flops(op, form, T, config.d, config.heads, res["iterations"]) / 1e9
                row.note = f"{res['iterations']} CG iterations"
            row.gflops_fwd = row.gflop / row.fwd_ms * 1e3
            fb = FWD_BWD.get((row.op, like))
            total = (config.heads * fb(row.T, min(CHUNK, row.T), config.d, config.d) / 1e9
                     if fb else 3 * row.gflop)
            row.gflops_fwd_bwd = total / row.fwd_bwd_ms * 1e3
            row.pct_matmul_fwd = 100 * row.gflops_fwd / rates[dt]
            if compiled:
                warm = f"compile + first call {res['warmup_s']:.1f} s"
                row.note = f"{row.note}; {warm}" if row.note else warm
        rows.append(row)
    _ratios(rows)
    header = dict(command=command, date=datetime.datetime.now().isoformat(timespec="seconds"),
                  torch=torch.__version__, python=platform.python_version(), cpu=_cpu_model(),
                  cores=os.cpu_count(), threads=threads, matmul_size=config.matmul_size,
                  matmul_sizes={dt: n for dt, (_, n) in measured.items()},
                  cpu_capability=torch.backends.cpu.get_cpu_capability(),
                  matmul_gflops=rates, load_at_start=load, batch=1, heads=config.heads,
                  d=config.d, repeats=config.repeats, fla=_fla_status(config.peers),
                  allocator=allocator_description(), load_at_end=os.getloadavg()[0],
                  wall_s=time.perf_counter() - start)
    return {"header": header, "rows": rows}


def _ratios(rows: list[Row]) -> None:
    """Speedups against the recurrent row (same op, T, dtype) and bf16 against fp32."""
    eager = {(r.op, r.form, r.T, r.dtype): r for r in rows if not r.compiled}
    for r in rows:
        rec = eager.get((r.op, "recurrent", r.T, r.dtype))
        if rec and rec.fwd_ms and r.fwd_ms and r.form != "recurrent":
            r.speedup_fwd, r.speedup_fwd_bwd = rec.fwd_ms / r.fwd_ms, rec.fwd_bwd_ms / r.fwd_bwd_ms
        fp32 = eager.get((r.op, r.form, r.T, "fp32"))
        if r.dtype == "bf16" and fp32 and fp32.fwd_bwd_ms and r.fwd_bwd_ms and not r.compiled:
            r.bf16_speedup_fwd_bwd = fp32.fwd_bwd_ms / r.fwd_bwd_ms


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _fla_status(timed: bool) -> str:
    version = bench_peers.fla_version()
    if bench_peers.fla_root() is None:
        return "fla not installed (`pip install -e .[peers]`, then --peers)"
    names = sorted({p.form for p in bench_peers.available()})
    if not timed:
        return f"{version} installed; --peers times its references ({', '.join(names)})"
    return (f"{version}: its pure-PyTorch references, loaded from their files (no Triton), "
            f"rows `fla:*` ({', '.join(names)})")


def _peer(op: str, form: str) -> bench_peers.Peer:
    return next(p for p in bench_peers.PEERS if p.op == op and p.form == form)


# -- output -------------------------------------------------------------------------------------

def _f(x, fmt: str = ".3g") -> str:
    if x is None:
        return "—"
    return f"{x:.0f}" if fmt == ".3g" and abs(x) >= 1000 else format(x, fmt)


def to_markdown(result: dict) -> str:
    """The header block and one table, rows in run order (op, T, form)."""
    h, rows = result["header"], result["rows"]
    sizes = h.get("matmul_sizes", {})
    rates = ", ".join(f"{dt} {r:.1f} GFLOP/s" + (f" (at {sizes[dt]}x{sizes[dt]}: slow on this "
                                                  "CPU, shrunk to bound the measurement)"
                                                  if sizes.get(dt, h["matmul_size"])
                                                  != h["matmul_size"] else "")
                      for dt, r in h["matmul_gflops"].items())
    lines = [
        f"Command: `{h['command'] or 'ttr.bench.run(...)'}`",
        "",
        f"- date {h['date']}; torch {h['torch']}; Python {h['python']}",
        f"- CPU: {h['cpu']} ({h['cores']} logical cores, torch's CPU capability "
        f"{h.get('cpu_capability', 'not recorded')}); torch threads: {h['threads']}",
        f"- allocator (each case's process inherits it): {h.get('allocator', 'not recorded')} "
        "(ttr.runtime.tune_allocator; TTR_TUNE_MALLOC=0 for glibc's defaults)",
        f"- matmul rate, {h['matmul_size']}x{h['matmul_size']} (median of 10): {rates}",
        f"- load average (1 min) at start: {h['load_at_start']:.2f}, at end "
        f"{h['load_at_end']:.2f} (the run's own {h['threads']} threads count there)"
        + (" -- WARNING: > 1.0, the machine was busy and these numbers are unreliable"
           if h["load_at_start"] > 1.0 else ""),
        f"- sizes: B = {h['batch']}, H = {h['heads']}, Dk = Dv = {h['d']}; chunk {CHUNK}; "
        f"median [min-max] of {h['repeats']} back-to-back runs after 1 warm-up (forwards, "
        f"then forward + backwards); wall time "
        f"{h['wall_s']:.0f} s",
        "- fwd = forward under no_grad; f+b = forward + backward of sum(o * w) w.r.t. q, k, v "
        "and the per-token params; x rec = recurrent time / this time (same op, T, dtype)",
        "- GFLOP/s from the analytic forward counts in ttr/bench_cases.py (f+b = 3x forward, or "
        "FWD_BWD's count); % mm = forward rate / matmul rate",
        "- peak MB: rise of getrusage ru_maxrss over its value after the inputs were allocated "
        "(high-water mark reset there via /proc/self/clear_refs), each case in a fresh process;"
        " includes allocator slack and first-call allocations",
        f"- peers: {h['fla']}",
        "- ops: " + "; ".join(f"{o.name} = {o.about}" for o in OPS.values()),
        "",
    ]
    bf16 = any(r.dtype == "bf16" for r in rows)
    cols = ["op", "form", "T", "dtype", "fwd ms [min-max]", "f+b ms [min-max]", "x rec fwd",
            "x rec f+b", "GFLOP/s fwd", "% mm", "GFLOP/s f+b", "peak MB"]
    cols += ["bf16 x fp32 f+b", "bf16 rel err"] if bf16 else []
    lines += ["| " + " | ".join(cols + ["note"]) + " |", "|" + "---|" * (len(cols) + 1)]
    for r in rows:
        cells = [r.op, r.form + (" (compiled)" if r.compiled else ""), str(r.T), r.dtype,
                 f"{_f(r.fwd_ms)} [{_f(r.fwd_min_ms)}-{_f(r.fwd_max_ms)}]" if r.fwd_ms else "—",
                 f"{_f(r.fwd_bwd_ms)} [{_f(r.fwd_bwd_min_ms)}-{_f(r.fwd_bwd_max_ms)}]"
                 if r.fwd_bwd_ms else "—",
                 _f(r.speedup_fwd, ".1f"), _f(r.speedup_fwd_bwd, ".1f"), _f(r.gflops_fwd),
                 _f(r.pct_matmul_fwd, ".0f"), _f(r.gflops_fwd_bwd), _f(r.peak_mb, ".0f")]
        cells += [_f(r.bf16_speedup_fwd_bwd, ".2f"), _f(r.rel_err, ".1e")] if bf16 else []
        lines.append("| " + " | ".join(cells + [r.note]) + " |")
    return "\n".join(lines) + "\n"


def write_csv(result: dict, path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[x.name for x in dataclasses.fields(Row)])
        writer.writeheader()
        writer.writerows(dataclasses.asdict(r) for r in result["rows"])


if __name__ == "__main__":  # the per-case child process: `python -m ttr.bench --case JSON`
    if len(sys.argv) != 3 or sys.argv[1] != "--case":
        sys.exit("usage: python -m ttr.bench --case JSON (the runner's child); use `ttr bench`")
    print(json.dumps(measure(json.loads(sys.argv[2]))))

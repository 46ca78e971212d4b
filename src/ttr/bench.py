"""`ttr bench`: time every op x form x sequence length on identical inputs, in one run.

Per case: median (min, max) over `repeats` runs, after one warm-up, of the forward (under
no_grad) and of forward+backward (backward of sum(o * w), w fixed random weights, w.r.t. q, k,
v and every per-token parameter); the peak memory of forward+backward; achieved GFLOP/s from
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
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

# Functions and FORMS by name from each module: `ttr.ops.delta_product` may become a function
# once the package exports it, so the modules themselves are not imported as attributes.
from ttr.ops.delta import FORMS as DELTA_FORMS
from ttr.ops.delta import delta_rule
from ttr.ops.delta_product import FORMS as PRODUCT_FORMS
from ttr.ops.delta_product import delta_product
from ttr.ops.linear import FORMS as LINEAR_FORMS
from ttr.ops.linear import linear_attention
from ttr.ops.local import FORMS as LOCAL_FORMS
from ttr.ops.local import softmax_attention
from ttr.ops.local_linear import FORMS as LOCAL_LINEAR_FORMS
from ttr.ops.local_linear import local_linear_attention
from ttr.ops.momentum import FORMS as MOMENTUM_FORMS
from ttr.ops.momentum import momentum_delta_rule
from ttr.ops.rls import FORMS as RLS_FORMS
from ttr.ops.rls import rls

# -- what is benchmarked ------------------------------------------------------------------------

CHUNK, N_H = 64, 2  # the ops' default chunk; DeltaProduct steps


def _unit(*shape):  # unit-norm keys and queries keep the delta rule and RLS well conditioned
    return F.normalize(torch.randn(*shape), dim=-1)


def _beta(*shape):
    return torch.sigmoid(torch.randn(*shape))


def _log_decay(*shape):  # exp(g) ~ 0.98: a typical trained forget gate
    return F.logsigmoid(torch.randn(*shape) + 4.0)


@dataclasses.dataclass(frozen=True)
class Op:
    """One row group: `fn(*make(B, T, H, D), form=form, **kwargs)` returns (o, state)."""

    name: str
    fn: Callable
    forms: tuple[str, ...]  # the op module's FORMS, so a new form is benchmarked (and counted)
    make: Callable[[int, int, int, int], list[torch.Tensor]]
    about: str
    kwargs: dict = dataclasses.field(default_factory=dict)


def _qkv(*params: Callable) -> Callable:
    """Inputs q, k (unit norm), v and per-token params [B, T, H] built by `params`."""
    return lambda B, T, H, D: [_unit(B, T, H, D), _unit(B, T, H, D), torch.randn(B, T, H, D),
                               *(p(B, T, H, D) for p in params)]


BETA = lambda B, T, H, D: _beta(B, T, H)
G = lambda B, T, H, D: _log_decay(B, T, H)
G_DIM = lambda B, T, H, D: _log_decay(B, T, H, D)
MU = lambda B, T, H, D: 0.9 * _beta(B, T, H)


def _product_inputs(B, T, H, D):  # DeltaProduct: n_h keys, values and step sizes per token
    return [_unit(B, T, H, D), _unit(B, T, H, N_H, D), torch.randn(B, T, H, N_H, D),
            _beta(B, T, H, N_H), _log_decay(B, T, H)]


OPS = {op.name: op for op in [
    Op("linear_attention", linear_attention, LINEAR_FORMS, _qkv(), "no decay (Eq. 2)"),
    Op("linear_attention_scalar", linear_attention, LINEAR_FORMS, _qkv(G),
       "scalar decay per head (RetNet / Mamba-2)"),
    Op("linear_attention_per_dim", linear_attention, LINEAR_FORMS, _qkv(G_DIM),
       "per-dimension decay (GLA)"),
    Op("delta_rule", delta_rule, DELTA_FORMS, _qkv(BETA), "DeltaNet"),
    Op("gated_delta_rule", delta_rule, DELTA_FORMS, _qkv(BETA, G), "Gated DeltaNet"),
    Op("delta_product", delta_product, PRODUCT_FORMS, _product_inputs,
       f"n_h = {N_H} steps per token, scalar decay"),
    Op("momentum_delta_rule", momentum_delta_rule, MOMENTUM_FORMS, _qkv(BETA, MU, G),
       "Titans-linear, scalar decay; its chunk form is a different function (chunk-start "
       "gradients) from its recurrent form"),
    Op("rls", rls, RLS_FORMS, _qkv(), "exact ridge regression, ridge 1, uniform weights",
       {"ridge": 1.0}),
    Op("softmax_attention", softmax_attention, LOCAL_FORMS, _qkv(), "causal SDPA"),
    Op("local_linear_attention", local_linear_attention, LOCAL_LINEAR_FORMS, _qkv(),
       "p = 1 (Eq. 52-54), ridge 0.1, bandwidth 2 sqrt(D); blocked: custom backward",
       {"ridge": 0.1}),
    Op("local_linear_attention_recompute", local_linear_attention, ("blocked",), _qkv(),
       "the same, recompute=True: the backward recomputes the per-query statistics",
       {"ridge": 0.1, "recompute": True}),
]}

# Forms whose time or memory grows too fast for the default sizes (B*H = 16, D = 64) run only
# up to a length; the table says so. `--no-caps` lifts these.
LOOP_CAP = (2048, "a Python loop over tokens")
CAPS = {
    ("linear_attention", "parallel"): (2048, "O(T^2) memory: 4 GB per T x T tensor at 8192"),
    ("linear_attention_scalar", "parallel"): (2048, "O(T^2) memory"),
    ("linear_attention_per_dim", "parallel"): (256, "O(T^2 Dk) memory: 5 GB and 12 s per "
                                                    "fwd+bwd at T = 512"),
    ("rls", "parallel"): (2048, "O(T Dk^2) memory: 2 GB per prefix-Gram tensor at T = 8192"),
    ("softmax_attention", "recurrent"): (512, "a Python loop whose backward is O(T^2)"),
    ("local_linear_attention", "naive"): (4096, "O(T^2 (1 + D)) memory"),
}


def cap(op: str, form: str) -> tuple[int, str] | None:
    return CAPS.get((op, form), LOOP_CAP if "recurrent" in form else None)


# -- analytic FLOP counts -----------------------------------------------------------------------
# Forward FLOPs of ONE (batch, head), a multiply-add = 2 FLOPs, leading terms only; T tokens,
# C = min(64, T) chunk, Dk = Dv = D. Forward+backward is counted as 3x the
# forward (the usual convention: the backward of a matmul is two matmuls) except in FWD_BWD.
#   linear attention  recurrent  4 T Dk Dv (rank-1 update k v^T + read S^T q), +T Dk Dv decay
#                     parallel   2 T^2 (Dk + Dv) + 2 T Dk Dv (full T x T QK^T and AV, final
#                                state); per-dim decay 3 T^2 Dk for the [T, T, Dk] einsum
#                     chunk      2 T C (Dk + Dv) + 4 T Dk Dv (intra-chunk QK^T and AV; chunk
#                                states K^T V; reads Q S_0); per-dim decay + 2 T C Dk: the
#                                triangular-matmul cumulative sums of its log2(C) levels
#   delta rule        recurrent  6 T Dk Dv (read S^T k, rank-1 update, read S^T q), +decay
#                     chunk      T (C^2 + 4 C (Dk + Dv) + 6 Dk Dv): per chunk KK^T, the C x C
#                                triangular solve against I (C^3), W = T K and U = T V, state
#                                pass W S and K^T u, outputs QK^T, Q S_0, A u
#   delta product     the delta rule's counts on T n_h sub-steps (+2 T Dk Dv per-token read)
#   momentum          recurrent  9 T Dk Dv (decay, read, outer product, mu U - step, S + U,
#                                read); chunk_recurrent 10 T Dk Dv (also decays S_ref);
#                     chunk      T (2 C^2 + 2 C (Dk + Dv) + 10 Dk Dv): per chunk Gamma P
#                                (2 C^3), QK^T, K S, two state updates, three output products
#   rls               recurrent  T (2/3 Dk^3 + 4 Dk^2 + 4 Dk Dv): Gram updates, one LU solve
#                                per token, read
#                     parallel   T (2/3 Dk^3 + 2 C Dk^2 + 7 Dk^2 + 2 C (Dk + Dv) + 4 Dk Dv):
#                                prefix Grams as chunk linear attention with Dk^2-wide values,
#                                batched LU solves, a second chunk linear attention
#                     chunk      T/C (Dk^3 + 16/3 C^3 + 10 C Dk^2 + 18 C^2 Dk + 2 C^2 Dv
#                                + 4 C Dk Dv): per chunk Cholesky + inverse of the base, one
#                                C x C Cholesky + triangular inverse, two Woodbury solves (one
#                                refinement), the refinement residual, the output
#   softmax           both       T^2 (Dk + Dv): the causal half of QK^T and PV
#   local linear      blocked    T^2/2 (2 Dk^2 + 2 Dk Dv + 4 Dk + 2 Dv) + T (Dk^3/3 + 2 Dk^2 Dv):
#                                per (query, visible key) the log-weight and the moments
#                                w k, w k k^T, w v, w v k^T; per query one Cholesky-sized
#                                solve; naive: the same on all T^2 pairs. Its backward
#                                (`FWD_BWD`) is no 2x matmul mirror of the forward: it only
#                                recomputes the log-weights and takes ~10 (query x key)
#                                products of width Dk or Dv, T^2/2 (20 Dk + 4 Dv).


def _la(T, C, K, V, decay):
    per_dim = decay == "per_dim"
    return {"recurrent": (4 + (decay != "none")) * T * K * V,
            "parallel": 2 * T * T * V + (3 if per_dim else 2) * T * T * K + 2 * T * K * V,
            "chunk": 2 * T * C * (K + V) + 4 * T * K * V
            + per_dim * 2 * T * C * K}


def _delta(T, C, K, V, decay):
    return {"recurrent": (6 + decay) * T * K * V,
            "chunk": T * (C * C + 4 * C * (K + V) + 6 * K * V)}


FLOPS: dict[tuple[str, str], Callable[[int, int, int, int], float]] = {
    **{(f"linear_attention{s}", f): (lambda T, C, K, V, f=f, d=d: _la(T, C, K, V, d)[f])
       for s, d in (("", "none"), ("_scalar", "scalar"), ("_per_dim", "per_dim"))
       for f in ("recurrent", "parallel", "chunk")},
    **{(n, f): (lambda T, C, K, V, f=f, d=d: _delta(T, C, K, V, d)[f])
       for n, d in (("delta_rule", 0), ("gated_delta_rule", 1)) for f in ("recurrent", "chunk")},
    ("delta_product", "recurrent"): lambda T, C, K, V: T * (4 * N_H + 3) * K * V,
    ("delta_product", "chunk"): lambda T, C, K, V: _delta(T * N_H, C, K, V, 1)["chunk"],
    ("momentum_delta_rule", "recurrent"): lambda T, C, K, V: 9 * T * K * V,
    ("momentum_delta_rule", "chunk_recurrent"): lambda T, C, K, V: 10 * T * K * V,
    ("momentum_delta_rule", "chunk"):
        lambda T, C, K, V: T * (2 * C * C + 2 * C * (K + V) + 10 * K * V),
    ("rls", "recurrent"): lambda T, C, K, V: T * (2 / 3 * K**3 + 4 * K * K + 4 * K * V),
    ("rls", "parallel"): lambda T, C, K, V: T * (2 / 3 * K**3 + 2 * C * K * K + 7 * K * K
                                                 + 2 * C * (K + V) + 4 * K * V),
    ("rls", "chunk"): lambda T, C, K, V: T / C * (K**3 + 16 / 3 * C**3 + 10 * C * K * K
                                                  + 18 * C * C * K + 2 * C * C * V
                                                  + 4 * C * K * V),
    ("softmax_attention", "fused"): lambda T, C, K, V: T * T * (K + V),
    ("softmax_attention", "recurrent"): lambda T, C, K, V: T * T * (K + V),
}


def _local_linear(T, K, V, pairs):
    return pairs * (2 * K * K + 2 * K * V + 4 * K + 2 * V) + T * (K**3 / 3 + 2 * K * K * V)


FLOPS[("local_linear_attention", "blocked")] = \
    lambda T, C, K, V: _local_linear(T, K, V, T * T / 2)
FLOPS[("local_linear_attention", "naive")] = lambda T, C, K, V: _local_linear(T, K, V, T * T)
FLOPS[("local_linear_attention_recompute", "blocked")] = \
    FLOPS[("local_linear_attention", "blocked")]
# Forward+backward FLOPs where they are not 3x the forward.
FWD_BWD: dict[tuple[str, str], Callable[[int, int, int, int], float]] = {
    ("local_linear_attention", "blocked"):
        lambda T, C, K, V: _local_linear(T, K, V, T * T / 2) + T * T / 2 * (20 * K + 4 * V),
    ("local_linear_attention_recompute", "blocked"):  # the forward twice
        lambda T, C, K, V: 2 * _local_linear(T, K, V, T * T / 2) + T * T / 2 * (20 * K + 4 * V),
}


def flops(op: str, form: str, T: int, d: int, heads: int) -> float:
    """Forward FLOPs of one call with B = 1, `heads` heads, Dk = Dv = d."""
    return heads * FLOPS[(op, form)](T, min(CHUNK, T), d, d)


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
    times = {"fwd": [], "fwd_bwd": []}
    for _ in range(case["repeats"]):
        for name, f in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
            t = time.perf_counter()
            f()
            times[name].append(1e3 * (time.perf_counter() - t))
    result["peak_mb"] = _maxrss_mb() - base
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


def matmul_gflops(n: int, dtype: torch.dtype, repeats: int = 10) -> float:
    """Median rate of n x n @ n x n in this process (after two warm-ups)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    ts = []
    for _ in range(repeats + 2):
        t = time.perf_counter()
        a @ b
        ts.append(time.perf_counter() - t)
    ts = ts[2:]  # the first calls pay for thread-pool start-up and page faults
    return 2 * n**3 / statistics.median(ts) / 1e9


def _run_case(case: dict) -> dict:
    proc = subprocess.run([sys.executable, "-m", "ttr.bench", "--case", json.dumps(case)],
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        why = "killed (out of memory?)" if proc.returncode < 0 else "crashed"
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
    rates = {dt: matmul_gflops(config.matmul_size, torch.float32 if dt == "fp32"
                               else torch.bfloat16) for dt in config.dtypes}
    rows = []
    for op, form, T, dt, compiled in tqdm(config.cases(), desc="ttr bench", disable=not progress):
        repeats = config.repeats
        row = Row(op, form, T, dt, compiled, repeats,
                  gflop=flops(op, form, T, config.d, config.heads) / 1e9)
        limit = cap(op, form) if config.caps else None
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
            row.gflops_fwd = row.gflop / row.fwd_ms * 1e3
            fb = FWD_BWD.get((row.op, row.form))
            total = (config.heads * fb(row.T, min(CHUNK, row.T), config.d, config.d) / 1e9
                     if fb else 3 * row.gflop)
            row.gflops_fwd_bwd = total / row.fwd_bwd_ms * 1e3
            row.pct_matmul_fwd = 100 * row.gflops_fwd / rates[dt]
            if compiled:
                row.note = f"compile + first call {res['warmup_s']:.1f} s"
        rows.append(row)
    _ratios(rows)
    header = dict(command=command, date=datetime.datetime.now().isoformat(timespec="seconds"),
                  torch=torch.__version__, python=platform.python_version(), cpu=_cpu_model(),
                  cores=os.cpu_count(), threads=threads, matmul_size=config.matmul_size,
                  matmul_gflops=rates, load_at_start=load, batch=1, heads=config.heads,
                  d=config.d, repeats=config.repeats, fla=_fla_status(),
                  load_at_end=os.getloadavg()[0], wall_s=time.perf_counter() - start)
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


def _fla_status() -> str:
    if importlib.util.find_spec("fla") is None:
        return "not installed"
    return "installed, but its naive references are not wired into this runner yet"


# -- output -------------------------------------------------------------------------------------

def _f(x, fmt: str = ".3g") -> str:
    if x is None:
        return "—"
    return f"{x:.0f}" if fmt == ".3g" and abs(x) >= 1000 else format(x, fmt)


def to_markdown(result: dict) -> str:
    """The header block and one table, rows in run order (op, T, form)."""
    h, rows = result["header"], result["rows"]
    rates = ", ".join(f"{dt} {r:.1f} GFLOP/s" for dt, r in h["matmul_gflops"].items())
    lines = [
        f"Command: `{h['command'] or 'ttr.bench.run(...)'}`",
        "",
        f"- date {h['date']}; torch {h['torch']}; Python {h['python']}",
        f"- CPU: {h['cpu']} ({h['cores']} logical cores); torch threads: {h['threads']}",
        f"- matmul rate, {h['matmul_size']}x{h['matmul_size']} (median of 10): {rates}",
        f"- load average (1 min) at start: {h['load_at_start']:.2f}, at end "
        f"{h['load_at_end']:.2f} (the run's own {h['threads']} threads count there)"
        + (" -- WARNING: > 1.0, the machine was busy and these numbers are unreliable"
           if h["load_at_start"] > 1.0 else ""),
        f"- sizes: B = {h['batch']}, H = {h['heads']}, Dk = Dv = {h['d']}; chunk {CHUNK}; "
        f"median [min-max] of {h['repeats']} runs after 1 warm-up; wall time "
        f"{h['wall_s']:.0f} s",
        "- fwd = forward under no_grad; f+b = forward + backward of sum(o * w) w.r.t. q, k, v "
        "and the per-token params; x rec = recurrent time / this time (same op, T, dtype)",
        "- GFLOP/s from the analytic forward counts in ttr/bench.py (f+b = 3x forward, or "
        "FWD_BWD's count); % mm = forward rate / matmul rate",
        "- peak MB: rise of getrusage ru_maxrss over its value after the inputs were allocated "
        "(high-water mark reset there via /proc/self/clear_refs), each case in a fresh process;"
        " includes allocator slack and first-call allocations",
        f"- peers: fla {h['fla']}",
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

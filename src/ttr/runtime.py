"""Process settings for tensor-heavy CPU work: let glibc's malloc keep freed memory for reuse.

Why. glibc serves every allocation above its mmap threshold (128 KB at start, raised as blocks
are freed, to at most 32 MB) with a fresh `mmap` and hands it back to the kernel on `free`.
PyTorch has no caching allocator on the CPU, and a chunk form allocates dozens of tensors of
that size per call ([1, 8192, 16, 64] float32 is 32 MB), so every call faults all of them in
again and the kernel zeroes every page first: an extra pass over memory per tensor, plus the
faults. Measured on the 2-core machine of docs/benchmarks.md (B*H = 16, D = 64, `ttr bench
--op ... --form recurrent --form chunk --T 2048 --T 8192` with TTR_TUNE_MALLOC=0, then without;
chunk forms, glibc's defaults -> tuned):

    T = 8192, forward + backward: linear attention 350 -> 201 ms, scalar decay 529 -> 253 ms,
              per-dimension decay 645 -> 345 ms, delta rule 792 -> 429 ms, Gated DeltaNet
              891 -> 488 ms; forward alone 1.7-2.0x; peak memory 549 -> 762 MB (linear
              attention) to 726 -> 1244 MB (delta rule): freed blocks stay resident
    T = 2048, forward + backward: 5-24% (glibc's dynamic threshold keeps many of these tensors
              on its heap); forward-only loops (inference), where nothing else keeps the heap
              large: linear attention 19.5 -> 12 ms, the delta rule 41.5 -> 30.5 ms

(PyTorch's CUDA allocator caches freed blocks for the same reason.)

`tune_allocator()` makes glibc serve large blocks from its heap (M_MMAP_MAX = 0) and never hand
freed heap memory back (M_TRIM_THRESHOLD = -1, which glibc documents as "disables trimming
completely"; pass `trim_threshold` to trim once that many bytes lie free at the top of the
heap), and exports the same settings as MALLOC_MMAP_MAX_ / MALLOC_TRIM_THRESHOLD_ so that child
processes (bench cases, sweep workers, torchrun ranks), whose glibc reads them at start-up, get
them too. The threshold was 2 GiB before (mallopt's int maximum), and a local linear attention
training step of fig3 (d_model 64, 64 sequences of T = 1024, one thread) peaks at ~3.8 GB, so
the freed top of the heap passed it now and then and went back to the kernel, to be faulted in
again on the next step (365k faults, 3.1 s of system time in one step: page faults cost ~8.5 us
each on this VM). Measured with getrusage around each of 30 such steps in a fresh process
(`ttr.experiments.mqar.train_step`), over steps 4-30, 2 GiB -> never: 20.9k -> 4.2k faults and
0.35 -> 0.08 s of system time per step, 5.81 -> 5.64 CPU s per step (the faults left are the
heap's growth to its peak). The cost: the resident memory of the process stays near its peak
between calls instead of falling back. The `ttr` command calls it at start; library users call
it once at the top of a script. It does nothing (and says so by returning False) off glibc, when
TTR_TUNE_MALLOC=0, or when the environment already chooses: MALLOC_MMAP_MAX_ or
MALLOC_TRIM_THRESHOLD_ set, or an allocator preloaded (LD_PRELOAD of jemalloc or tcmalloc, the
other usual remedy).
"""

from __future__ import annotations

import ctypes
import os
import platform

# mallopt parameter numbers from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")


def _chosen_elsewhere() -> bool:
    """The user opted out, or the environment already chooses the allocator's settings."""
    return (os.environ.get("TTR_TUNE_MALLOC", "1") == "0"
            or any(name in os.environ for name in _ENV) or _preloaded() is not None)


def _preloaded() -> str | None:
    """LD_PRELOAD when it loads jemalloc or tcmalloc, else None."""
    preload = os.environ.get("LD_PRELOAD", "")
    return preload if "jemalloc" in preload or "tcmalloc" in preload else None


def tune_allocator(trim_threshold: int | None = None) -> bool:
    """Keep freed memory in the process for reuse (see the module docstring). Returns whether
    this process now runs with the tuned settings (also True when they came through the
    environment, as in a child of a tuned process); calling it again changes nothing.

    trim_threshold: None (never hand freed heap memory back) or the bytes that may lie free at
    the top of the heap before glibc returns them to the kernel, an int in [0, 2^31) (mallopt
    takes an int).
    """
    if trim_threshold is not None and (
            isinstance(trim_threshold, bool) or not isinstance(trim_threshold, int)
            or not 0 <= trim_threshold < 2**31):
        raise ValueError("trim_threshold: expected None or an int in [0, 2^31), got "
                         f"{trim_threshold!r}")
    # glibc's "never trim" is -1, in mallopt and in the variable (read with atoi / strtoul)
    trim = -1 if trim_threshold is None else trim_threshold
    if os.environ.get("MALLOC_MMAP_MAX_") == "0":
        return True  # glibc read it at start-up (a tuned parent's child), or we applied it
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or _chosen_elsewhere():
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if mallopt(_M_MMAP_MAX, 0) != 1 or mallopt(_M_TRIM_THRESHOLD, trim) != 1:
        return False
    os.environ.update({"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(trim)})
    return True


def allocator_description() -> str:
    """One line for benchmark headers: which allocator settings this process runs with."""
    if _preloaded():
        return f"preloaded ({_preloaded()})"
    if platform.libc_ver()[0] != "glibc":
        return "the platform's malloc"
    chosen = [f"{n}={os.environ[n]}" for n in _ENV if n in os.environ]
    return "glibc, " + (", ".join(chosen) or "defaults (freed large blocks go back to the kernel)")

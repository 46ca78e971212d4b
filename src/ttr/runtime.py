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

`tune_allocator()` makes glibc serve large blocks from its heap (M_MMAP_MAX = 0) and keep freed
memory until more than `trim_threshold` bytes lie free at the top of the heap (M_TRIM_THRESHOLD),
and exports the same settings as MALLOC_MMAP_MAX_ / MALLOC_TRIM_THRESHOLD_ so that child
processes (bench cases, sweep workers, torchrun ranks), whose glibc reads them at start-up, get
them too. The cost: the resident memory of the process stays near its peak between calls instead
of falling back. The `ttr` command calls it at start; library users call it once at the top of a
script. It does nothing (and says so by returning False) off glibc, when TTR_TUNE_MALLOC=0, or
when the environment already chooses: MALLOC_MMAP_MAX_ or MALLOC_TRIM_THRESHOLD_ set, or an
allocator preloaded (LD_PRELOAD of jemalloc or tcmalloc, the other usual remedy).
"""

from __future__ import annotations

import ctypes
import os
import platform

# mallopt parameter numbers from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

TRIM_THRESHOLD = 2**31 - 1  # 2 GiB (mallopt's int maximum): free memory kept at the heap's top

_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")


def _chosen_elsewhere() -> bool:
    """The user opted out, or the environment already chooses the allocator's settings."""
    return (os.environ.get("TTR_TUNE_MALLOC", "1") == "0"
            or any(name in os.environ for name in _ENV) or _preloaded() is not None)


def _preloaded() -> str | None:
    """LD_PRELOAD when it loads jemalloc or tcmalloc, else None."""
    preload = os.environ.get("LD_PRELOAD", "")
    return preload if "jemalloc" in preload or "tcmalloc" in preload else None


def tune_allocator(trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Keep freed memory in the process for reuse (see the module docstring). Returns whether
    this process now runs with the tuned settings (also True when they came through the
    environment, as in a child of a tuned process); calling it again changes nothing.

    trim_threshold: bytes that may lie free at the top of the heap before glibc returns them to
    the kernel, an int in [0, 2^31).
    """
    if isinstance(trim_threshold, bool) or not isinstance(trim_threshold, int) \
            or not 0 <= trim_threshold < 2**31:
        raise ValueError(f"trim_threshold: expected an int in [0, 2^31), got {trim_threshold!r}")
    if os.environ.get("MALLOC_MMAP_MAX_") == "0":
        return True  # glibc read it at start-up (a tuned parent's child), or we applied it
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or _chosen_elsewhere():
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if mallopt(_M_MMAP_MAX, 0) != 1 or mallopt(_M_TRIM_THRESHOLD, trim_threshold) != 1:
        return False
    os.environ.update({"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(trim_threshold)})
    return True


def allocator_description() -> str:
    """One line for benchmark headers: which allocator settings this process runs with."""
    if _preloaded():
        return f"preloaded ({_preloaded()})"
    if platform.libc_ver()[0] != "glibc":
        return "the platform's malloc"
    chosen = [f"{n}={os.environ[n]}" for n in _ENV if n in os.environ]
    return "glibc, " + (", ".join(chosen) or "defaults (freed large blocks go back to the kernel)")

"""ttr.runtime.tune_allocator: large tensors come from glibc's heap instead of fresh mmaps.

Each case runs in a fresh interpreter (the setting is process-wide and read by glibc at
start-up) and counts glibc's mmapped blocks (mallinfo2().hblks) around one large allocation (64 MB
unless given): one more with glibc's defaults, none once tuned; and whether the heap still holds
it once freed (mallinfo2().arena): tuned, glibc never trims it, however large.
"""

import os
import platform
import subprocess
import sys

import pytest

from ttr.runtime import tune_allocator

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")

PROBE = """
import ctypes, os, sys
import torch

class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                              "usmblks", "fsmblks", "uordblks", "fordblks",
                                              "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Mallinfo2
tuned = None
if sys.argv[1].startswith("tune"):
    from ttr.runtime import tune_allocator
    # "tune" or "tune=BYTES" (a trim threshold)
    tuned = tune_allocator(*(int(a) for a in sys.argv[1].split("=")[1:]))
before = libc.mallinfo2().hblks
# above glibc's largest mmap threshold (32 MB); untouched, so no page is faulted in
x = torch.empty(int(sys.argv[2]) // 4 if len(sys.argv) > 2 else 16 * 2**20)
info = libc.mallinfo2()
blocks, held = info.hblks - before, info.arena
del x  # from the heap: its top, kept or trimmed
kept = libc.mallinfo2().arena >= held  # the heap did not shrink
print(tuned, blocks, os.environ.get("MALLOC_MMAP_MAX_"), kept,
      os.environ.get("MALLOC_TRIM_THRESHOLD_"))
"""


def _probe(mode: str, *args: str, **env) -> list[str]:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k not in ("TTR_TUNE_MALLOC", "LD_PRELOAD")}
    out = subprocess.run([sys.executable, "-c", PROBE, mode, *args], env={**clean, **env},
                         capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_defaults_mmap_large_blocks():
    # the control: without tuning, glibc maps the 64 MB block (the heap is not involved)
    assert _probe("plain")[:3] == ["None", "1", "None"]


def test_tuned_process_serves_large_blocks_from_the_heap_and_keeps_them():
    assert _probe("tune") == ["True", "0", "0", "True", "-1"]


def test_tuned_heap_keeps_a_freed_block_past_two_gib():
    """mallopt's largest threshold, 2 GiB, handed a freed 2.5 GB top of the heap back to the
    kernel (fig3's local linear attention steps peak at ~3.8 GB and paid to fault it in again)."""
    assert _probe("tune", str(5 * 2**29)) == ["True", "0", "0", "True", "-1"]


def test_a_trim_threshold_is_passed_on():
    # whether glibc then trims the freed block depends on what else was allocated above it
    tuned, blocks, mmap_max, _, trim = _probe(f"tune={2**20}")
    assert (tuned, blocks, mmap_max, trim) == ("True", "0", "0", str(2**20))


def test_children_inherit_the_setting():
    # what a tuned parent exports (bench cases, sweep workers): glibc reads it at start-up
    env = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "-1"}
    assert _probe("plain", **env)[1:4] == ["0", "0", "True"]


def test_opt_out_and_the_environment_win():
    assert _probe("tune", TTR_TUNE_MALLOC="0")[:3] == ["False", "1", "None"]
    # a trim threshold chosen by the user: left alone, large blocks still mapped
    assert _probe("tune", MALLOC_TRIM_THRESHOLD_="1000")[:3] == ["False", "1", "None"]


@pytest.mark.parametrize("bad", [-1, 2**31, 1.5, True, "1"])
def test_bad_trim_threshold(bad):
    with pytest.raises(ValueError,
                       match=r"trim_threshold: expected None or an int in \[0, 2\^31\)"):
        tune_allocator(bad)

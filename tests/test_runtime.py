"""ttr.runtime.tune_allocator: large tensors come from glibc's heap instead of fresh mmaps.

Each case runs in a fresh interpreter (the setting is process-wide and read by glibc at
start-up) and counts glibc's mmapped blocks (mallinfo2().hblks) around a 64 MB allocation: one
more with glibc's defaults, none once tuned.
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
if sys.argv[1] == "tune":
    from ttr.runtime import tune_allocator
    tuned = tune_allocator()
before = libc.mallinfo2().hblks
x = torch.empty(16 * 2**20)  # 64 MB, above glibc's largest mmap threshold
print(tuned, libc.mallinfo2().hblks - before, os.environ.get("MALLOC_MMAP_MAX_"))
"""


def _probe(mode: str, **env) -> list[str]:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k not in ("TTR_TUNE_MALLOC", "LD_PRELOAD")}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env={**clean, **env},
                         capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_defaults_mmap_large_blocks():
    # the control: without tuning, glibc maps the 64 MB block
    assert _probe("plain") == ["None", "1", "None"]


def test_tuned_process_serves_large_blocks_from_the_heap():
    assert _probe("tune") == ["True", "0", "0"]


def test_children_inherit_the_setting():
    # what a tuned parent exports (bench cases, sweep workers): glibc reads it at start-up
    assert _probe("plain", MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_="2147483647")[1] == "0"


def test_opt_out_and_the_environment_win():
    assert _probe("tune", TTR_TUNE_MALLOC="0") == ["False", "1", "None"]
    # a trim threshold chosen by the user: left alone, large blocks still mapped
    assert _probe("tune", MALLOC_TRIM_THRESHOLD_="1000") == ["False", "1", "None"]


@pytest.mark.parametrize("bad", [-1, 2**31, 1.5, True, "1"])
def test_bad_trim_threshold(bad):
    with pytest.raises(ValueError, match=r"trim_threshold: expected an int in \[0, 2\^31\)"):
        tune_allocator(bad)

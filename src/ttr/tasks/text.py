"""Byte-level language-model data: a corpus of text files as one uint8 tensor per split, and a
seeded sampler of training windows.

Corpus. With no `path`, the Python standard library's own `.py` files (under
`sysconfig.get_paths()["stdlib"]`, without `site-packages`): always present, no download.
Otherwise `path` is one text file or a directory searched recursively for `*.txt`, `*.py`,
`*.md`. Files are split into train / validation BY FILE: the sorted file list is shuffled with
a fixed seed (`SPLIT_SEED`, independent of the training seed, so every run sees the same split)
and the first `val_fraction` of the files (at least one) are validation. A single file is split
by bytes instead: its last `val_fraction` of bytes are validation. Each split is the
concatenation of its files' bytes, capped at `max_bytes` in total (train gets
`(1 - val_fraction) * max_bytes`, validation the rest; the last file read is cut at the cap).

The vocabulary is the 256 byte values; token t of the corpus is byte t.

Sampler. A step draws B window starts s_b ~ Uniform{0, ..., N - T - 1} from a torch.Generator
and returns x[b, j] = data[s_b + j], j = 0..T, as a [B, T + 1] int64 tensor: the model reads
x[:, :T] and predicts x[:, 1:]. The generator's state is the "data position" a checkpoint
stores; restoring it replays the same windows. Worked example (data = b"def f(x):\\n", N = 10,
B = 2, T = 3, draws s = (0, 6)):

    b  s_b  x[b, :T]   (input)   x[b, 1:]  (target)
    0   0   "d" "e" "f"          "e" "f" " "
    1   6   "x" ")" ":"          ")" ":" "\\n"

Under data parallelism every rank draws the starts of the whole global batch from identically
seeded generators and keeps its own slice of rows, so the union over ranks is exactly the batch
one process would draw, and all ranks' generator states stay equal.
"""

from __future__ import annotations

import os
import random
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

SPLIT_SEED = 0
SUFFIXES = (".txt", ".py", ".md")
VOCAB_SIZE = 256


@lru_cache(maxsize=8)
def list_files(path: str | None) -> tuple[Path, ...]:
    """The corpus files, sorted: the stdlib's .py files (path None), one file, or a directory's
    *.txt, *.py, *.md (recursively)."""
    if path is None:
        root, suffixes, skip = Path(sysconfig.get_paths()["stdlib"]), (".py",), "site-packages"
    else:
        root, suffixes, skip = Path(path), SUFFIXES, None
        if root.is_file():
            return (root,)
        if not root.is_dir():
            raise ValueError(f"data: {path!r} is neither a file nor a directory")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != skip)  # prune in place: os.walk obeys
        files += [Path(dirpath) / f for f in filenames if f.endswith(suffixes)]
    if not files:
        raise ValueError(f"data: no {'/'.join(suffixes)} files under {str(root)!r}")
    return tuple(sorted(files))


def _read(files, cap: int) -> bytes:
    chunks, n = [], 0
    for f in files:
        if n >= cap:
            break
        b = f.read_bytes()[: cap - n]
        chunks.append(b)
        n += len(b)
    return b"".join(chunks)


@dataclass(frozen=True)
class TextData:
    """The two splits as uint8 tensors [N_train], [N_val], and where they came from."""

    train: torch.Tensor
    val: torch.Tensor
    source: str
    n_files: tuple[int, int]


def load_text(path: str | None = None, *, max_bytes: int = 2**24, val_fraction: float = 0.05,
              min_len: int = 2) -> TextData:
    """Read the corpus (module docstring) into uint8 tensors. `min_len`: each split must hold
    at least this many bytes (the sampler needs T + 1)."""
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 2:
        raise ValueError(f"max_bytes: expected an int >= 2, got {max_bytes!r}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction: expected a number in (0, 1), got {val_fraction!r}")
    files = list(list_files(path))
    val_cap = max(1, int(max_bytes * val_fraction))
    if len(files) == 1:
        raw = files[0].read_bytes()
        cut = len(raw) - max(1, int(len(raw) * val_fraction))
        train, val, counts = raw[:cut][: max_bytes - val_cap], raw[cut:][:val_cap], (1, 1)
    else:
        random.Random(SPLIT_SEED).shuffle(files)
        n_val = max(1, round(len(files) * val_fraction))
        train, val = _read(files[n_val:], max_bytes - val_cap), _read(files[:n_val], val_cap)
        counts = (len(files) - n_val, n_val)
    source = "python stdlib" if path is None else str(path)
    for name, split in (("train", train), ("validation", val)):
        if len(split) < min_len:
            raise ValueError(f"data: the {name} split of {source!r} has {len(split)} bytes, "
                             f"fewer than the {min_len} needed (seq_len + 1); use more data or "
                             f"a larger max_bytes")

    def as_tensor(b: bytes) -> torch.Tensor:
        return torch.frombuffer(bytearray(b), dtype=torch.uint8)  # [N]

    return TextData(as_tensor(train), as_tensor(val), source, counts)


def sample_windows(data: torch.Tensor, batch: int, seq_len: int, generator: torch.Generator,
                   rows: slice | None = None) -> torch.Tensor:
    """[batch, seq_len + 1] int64 windows of `data` at starts drawn from `generator` (module
    docstring). `rows`: keep only these rows of the batch (this rank's slice); the generator
    advances by the whole batch either way."""
    if data.numel() < seq_len + 1:
        raise ValueError(f"seq_len: {seq_len} + 1 exceeds the {data.numel()} bytes of data")
    starts = torch.randint(0, data.numel() - seq_len, (batch,), generator=generator)  # [B]
    if rows is not None:
        starts = starts[rows]
    idx = starts[:, None] + torch.arange(seq_len + 1)  # [B, T + 1]
    return data[idx].long()

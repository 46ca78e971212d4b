"""Peers for `ttr bench`: flash-linear-attention's pure-PyTorch reference implementations.

flash-linear-attention (`fla`, Yang et al.; pip `fla-core`, ttr's `peers` extra) ships Triton
kernels, which need a GPU, and beside each a plain-PyTorch `naive.py` -- what a CPU user of fla
is left with. Importing the `fla` package imports Triton, so each naive file is loaded on its
own from the installed package's directory (`importlib.util.spec_from_file_location`); those
files import only torch, torch.nn.functional and einops.

Each peer is timed like a ttr form of the same op, on the same inputs (`ttr bench --peers`); its
row's form is `fla:<function>` and its FLOP count is that of the ttr form it mirrors (`like`).
The adapters below make the peer compute ttr's function: fla scales q by Dk^-1/2 by default, so
`scale=1.0` is passed where the function takes it and q is multiplied by sqrt(Dk) where it does
not; layouts are converted where a peer wants [B, H, T, D]. `tests/test_bench_peers.py` checks,
when fla is installed, that every peer's output equals ttr's.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from collections.abc import Callable
from pathlib import Path

import torch


@dataclasses.dataclass(frozen=True)
class Peer:
    """`call(fn, *inputs)` -> o [B, T, H, Dv], with inputs as `ttr.bench_cases.OPS[op].make`."""

    op: str  # the ttr bench op whose inputs it takes
    function: str  # the function's name in `file`
    file: str  # path inside the fla package
    like: str  # the ttr form with the same algorithm class (FLOP count, size caps)
    call: Callable[..., torch.Tensor]

    @property
    def form(self) -> str:
        return f"fla:{self.function}"


def _bhtd(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)


def _scaled(q: torch.Tensor) -> torch.Tensor:  # undo fla's fixed q * Dk^-1/2
    return q * math.sqrt(q.shape[-1])


def _zeros_gate(q: torch.Tensor) -> torch.Tensor:
    return q.new_zeros(q.shape[:3])


SIMPLE_GLA, GLA = "ops/simple_gla/naive.py", "ops/gla/naive.py"
DELTA, GATED_DELTA = "ops/delta_rule/naive.py", "ops/gated_delta_rule/naive.py"

PEERS = [
    Peer("linear_attention", "naive_recurrent_simple_gla", SIMPLE_GLA, "recurrent",
         lambda f, q, k, v: f(q, k, v, _zeros_gate(q), scale=1.0)[0]),
    Peer("linear_attention", "naive_chunk_simple_gla", SIMPLE_GLA, "chunk",
         lambda f, q, k, v: f(q, k, v, _zeros_gate(q), scale=1.0, chunk_size=64)[0]),
    Peer("linear_attention_scalar", "naive_recurrent_simple_gla", SIMPLE_GLA, "recurrent",
         lambda f, q, k, v, g: f(q, k, v, g, scale=1.0)[0]),
    Peer("linear_attention_scalar", "naive_chunk_simple_gla", SIMPLE_GLA, "chunk",
         lambda f, q, k, v, g: f(q, k, v, g, scale=1.0, chunk_size=64)[0]),
    Peer("linear_attention_per_dim", "naive_recurrent_gla", GLA, "recurrent",
         lambda f, q, k, v, g: f(_scaled(q), k, v, g)[0]),
    Peer("delta_rule", "delta_rule_recurrence", DELTA, "recurrent",
         lambda f, q, k, v, beta: _bhtd(f(_bhtd(_scaled(q)), _bhtd(k), _bhtd(v),
                                          _bhtd(beta))[0])),
    # delta_rule_chunkwise needs T divisible by its chunk size and writes its outputs into
    # slices of a preallocated tensor (autograd records those copies)
    Peer("delta_rule", "delta_rule_chunkwise", DELTA, "chunk",
         lambda f, q, k, v, beta: _bhtd(f(_bhtd(_scaled(q)), _bhtd(k), _bhtd(v), _bhtd(beta),
                                          chunk_size=64)[0])),
    Peer("gated_delta_rule", "naive_recurrent_gated_delta_rule", GATED_DELTA, "recurrent",
         lambda f, q, k, v, beta, g: f(q, k, v, beta, g, scale=1.0)[0]),
    Peer("gated_delta_rule", "naive_chunk_gated_delta_rule", GATED_DELTA, "chunk",
         lambda f, q, k, v, beta, g: f(q, k, v, g, beta, chunk_size=64, scale=1.0)[0]),
]


def fla_root() -> Path | None:
    """The installed fla package's directory, found without importing it (that imports
    Triton); None if fla is not installed."""
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def fla_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("fla-core", "flash-linear-attention"):
        try:
            return f"{dist} {version(dist)}"
        except PackageNotFoundError:
            continue
    return None


def available(root: Path | None = None) -> list[Peer]:
    """The peers whose file exists in the installed fla (none without fla)."""
    root = root or fla_root()
    return [] if root is None else [p for p in PEERS if (root / p.file).is_file()]


def load(peer: Peer, root: Path | None = None) -> Callable[..., torch.Tensor]:
    """fn(*inputs) -> o for one peer, its naive.py loaded from the file alone."""
    root = root or fla_root()
    if root is None:
        raise ModuleNotFoundError("fla: not installed (pip install -e .[peers])")
    path = root / peer.file
    spec = importlib.util.spec_from_file_location(
        "ttr_peer_" + peer.file.replace("/", "_").removesuffix(".py"), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fn = getattr(module, peer.function)
    return lambda *inputs: peer.call(fn, *inputs)

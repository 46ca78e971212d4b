"""The recurrent cache `generate()` carries between calls, and the cached forward pass.

A `TTRCache` holds, per group of sequences, one `MixerState` per layer: conv caches, the op's
state (S for linear memories, (H_kk, H_kv) for the mesa layer, the KV cache for softmax
attention) and the position. Each decoding step feeds only the new token through `LM.step`:
O(1) work per token for parametric memories, one KV-cache append for softmax layers.

Left padding. The memories have no attention mask: a pad token written into S would change
every later output. So the prefill drops the padded positions and runs each sequence on its
real tokens only. Sequences of equal real length run together as one dense batch and stay one
group; sequences of different lengths cannot share a batch afterwards either (their KV caches
differ in length, their positions differ), so decoding runs one batched `LM.step` per group
and scatters the results back into the batch. Without padding there is exactly one group.

    group g: rows [b_g] of the batch, states = [MixerState per layer] with batch b_g
    prefill  ids [B, T], mask [B, T] -> per group: ids[rows][mask[rows]] .view(b_g, n_g)
    decode   ids [B, 1]              -> per group: LM.step(ids[rows, 0], states)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers.cache_utils import Cache

from ttr.nn.mixer import MixerState

# run(ids [b, T], states | None, output_states) -> (out [b, T, *], states | None)
Run = Callable[[torch.Tensor, Any, bool], tuple[torch.Tensor, Any]]
# step(ids_t [b], states) -> (out [b, *], states)
Step = Callable[[torch.Tensor, Any], tuple[torch.Tensor, Any]]


def map_batch(fn: Callable[[torch.Tensor], torch.Tensor], obj: Any) -> Any:
    """Apply fn to every tensor of a (nested) state; every state tensor is batch-first."""
    if torch.is_tensor(obj):
        return fn(obj)
    if isinstance(obj, MixerState):
        return MixerState(*(map_batch(fn, x) for x in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_batch(fn, x) for x in obj)
    if isinstance(obj, dict):
        return {k: map_batch(fn, v) for k, v in obj.items()}
    return obj  # None, the int position


class TTRCache(Cache):
    """Per-layer MixerStates of a batch, in groups of sequences that decode together.

    `groups`: list of (rows LongTensor [b_g], states list[MixerState]). `width`: columns of the
    (padded) input consumed so far, what `get_seq_length` reports to `generate`.
    """

    def __init__(self):
        super().__init__(layers=[])
        self.groups: list[tuple[torch.Tensor, list[MixerState]]] = []
        self.width = 0

    def __repr__(self) -> str:
        return (f"TTRCache(groups={[len(r) for r, _ in self.groups]}, width={self.width})")

    # -- what generate() asks of a Cache --------------------------------------------------------

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.width

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False  # a recurrent memory cannot forget its last tokens

    @property
    def is_initialized(self) -> bool:
        return bool(self.groups)

    @property
    def batch_size(self) -> int:
        return sum(len(rows) for rows, _ in self.groups)

    def reset(self) -> None:
        self.groups, self.width = [], 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Row i of the new batch continues old row beam_idx[i] (beam search)."""
        self._reindex(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._reindex(torch.arange(self.batch_size).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._reindex(indices)

    def _reindex(self, src: torch.Tensor) -> None:
        """New row i takes the state of old row src[i]; rows keep their group."""
        src = src.to("cpu", torch.long)
        new = []
        for rows, states in self.groups:
            rows = rows.cpu()
            hit = torch.isin(src, rows).nonzero().flatten()  # new rows drawn from this group
            if len(hit) == 0:
                continue
            where = {int(r): j for j, r in enumerate(rows)}  # old row -> index in the group
            pick = torch.tensor([where[int(src[i])] for i in hit])
            new.append((hit, [map_batch(lambda t, p=pick: t[p.to(t.device)], s) for s in states]))
        self.groups = new

    # -- the cached pass ---------------------------------------------------------------------

    def run(self, run: Run, step: Step, ids: torch.Tensor, mask: torch.Tensor | None,
            output_states: bool = True) -> torch.Tensor:
        """Feed ids [B, T] (mask: the last T columns of attention_mask, [B, T]) after what the
        cache holds; returns out [B, T, *] (zeros at padded positions) and updates the cache."""
        B, T = ids.shape
        if not self.groups:
            out, self.groups = _prefill(run, ids, mask, output_states)
        else:
            if mask is not None and not bool(mask.all()):
                raise ValueError("attention_mask: padding is supported in the first call (the "
                                 "prefill) only; the new tokens of a continuation must all be 1")
            if self.batch_size != B:
                raise ValueError(f"input_ids: the cache holds {self.batch_size} sequences, got "
                                 f"a batch of {B}")
            outs, groups = [], []
            for rows, states in self.groups:
                r = rows.to(ids.device)
                if T == 1:  # the recurrent step form: O(1) per token for parametric memories
                    o, s = step(ids[r, 0], states)
                    o = o[:, None]
                else:
                    o, s = run(ids[r], states, True)
                outs.append((r, o))
                groups.append((rows, s))
            out = _scatter(outs, B, T)
            self.groups = groups
        self.width += T
        return out


def _prefill(run: Run, ids: torch.Tensor, mask: torch.Tensor | None, output_states: bool):
    """The first call: each sequence on its real tokens only, equal lengths batched."""
    B, T = ids.shape
    if mask is None or bool(mask.all()):
        out, states = run(ids, None, output_states)
        return out, [(torch.arange(B), states)]
    keep = mask.bool()
    lengths = keep.sum(1)  # [B] real tokens per sequence
    if bool((lengths == 0).any()):
        raise ValueError(f"attention_mask: rows {(lengths == 0).nonzero().flatten().tolist()} "
                         "have no unmasked token")
    outs, groups = [], []
    for n in lengths.unique().tolist():
        rows = (lengths == n).nonzero().flatten()  # [b_g]
        o, s = run(ids[rows][keep[rows]].view(len(rows), n), None, output_states)  # [b_g, n, *]
        full = o.new_zeros(len(rows), T, *o.shape[2:])
        full[keep[rows]] = o.reshape(-1, *o.shape[2:])
        outs.append((rows, full))
        groups.append((rows.cpu(), s))
    return _scatter(outs, B, T), groups


def _scatter(outs: list[tuple[torch.Tensor, torch.Tensor]], B: int, T: int) -> torch.Tensor:
    o0 = outs[0][1]
    out = o0.new_zeros(B, T, *o0.shape[2:])
    for rows, o in outs:
        out[rows] = o
    return out

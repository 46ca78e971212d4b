"""Multi-query associative recall (MQAR), the task of paper Section 6 (Eq. 57-58, Fig. 3).

Both generators return `(inputs [N, T] long, targets [N, T] long)`; a target is the token the
model must output at that position and `IGNORE` (-100) everywhere else, the convention of
`torch.nn.functional.cross_entropy(ignore_index=-100)`. Randomness comes only from the
`torch.Generator` passed in, so a seeded generator gives the same data on every machine.

`paper_mqar`, the variant of Section 6. P cues u_j (ids 0..P-1) map one-to-one to P responses
v_j (ids P..2P-1) through a permutation drawn per sequence; the sequence is T/2 pairs drawn
uniformly with replacement, u v u v ... A cue that already appeared earlier in the sequence
must be answered with its response, which is also the next input token. With keys built from
the previous token (k_t = x_{t-1}, Eq. 56 with w = (0, 1)), the layer memorizes the pairs
(cue, response) and the query q_t = x_t retrieves the response (Eq. 57-58). Example with P = 4,
T = 16, `paper_mqar(1, 16, 4, torch.Generator().manual_seed(4))`, whose mapping is
0->6 1->7 2->5 3->4 ("." = -100, ignored):

    position     0    1    2    3    4    5    6    7    8    9   10   11   12   13   14   15
    inputs       1    7    0    6    3    4    0    6    2    5    1    7    2    5    0    6
    targets      .    .    .    .    .    .    6    .    .    .    7    .    5    .    6    .

`zoology_mqar`, the multi-query AR of Arora et al. 2023 (zoology `multiquery_ar`). Keys come
from the first half of the vocabulary (ids 1..V/2-1; 0 is the filler), values from the second
half; the P distinct key-value pairs are laid out first, then each key re-appears once as a
query in the remaining T - 2P positions, at an even offset 2 d from the end of the context. The
gaps d are drawn without replacement from {0, ..., (T - 2P)/2 - 1} with probability
proportional to (d + 1)^(power_a - 1): power_a < 1 favours short gaps, as the distance between
repeated bigrams in text follows a power law; power_a = 1 is uniform. Fillers are 0 and ignored;
the target at a query is its value. Example with V = 16, P = 3, T = 16,
`zoology_mqar(1, 16, 3, 16, torch.Generator().manual_seed(1))`:

    position     0    1    2    3    4    5    6    7    8    9   10   11   12   13   14   15
    inputs       5   14    2   10    7   15    2    0    0    0    5    0    0    0    7    0
    targets      .    .    .    .    .    .   10    .    .    .   14    .    .    .   15    .
"""

from __future__ import annotations

import torch

IGNORE = -100


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")


def _check_generator(generator) -> None:
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")


def _sample_distinct(n: int, low: int, high: int, k: int, generator) -> torch.Tensor:
    """`[n, k]` distinct integers per row, uniform from [low, high)."""
    scores = torch.rand(n, high - low, generator=generator)
    return scores.argsort(dim=1)[:, :k] + low  # a uniformly random k-subset, in random order


def paper_mqar(n: int, seq_len: int, num_pairs: int, generator: torch.Generator):
    """The Section 6 variant: `n` sequences of `seq_len` tokens over a vocabulary of
    2 * num_pairs tokens (cues 0..P-1, responses P..2P-1). Returns (inputs, targets) `[n, T]`."""
    _check_int("n", n, 1)
    _check_int("seq_len", seq_len, 2)
    _check_int("num_pairs", num_pairs, 1)
    _check_generator(generator)
    if seq_len % 2:
        raise ValueError(f"seq_len: expected an even length (cue-response pairs), got {seq_len}")
    P, half = num_pairs, seq_len // 2
    response_of = torch.rand(n, P, generator=generator).argsort(dim=1) + P  # [n, P] bijection
    cues = torch.randint(0, P, (n, half), generator=generator)  # [n, T/2], with replacement
    responses = response_of.gather(1, cues)  # [n, T/2]
    inputs = torch.stack([cues, responses], dim=2).reshape(n, seq_len)  # u v u v ...
    # A cue is answerable iff an earlier pair had the same cue: compare with its first index.
    step = torch.arange(half).expand(n, half)
    first = torch.full((n, P), half, dtype=torch.long)
    first = first.scatter_reduce(1, cues, step, reduce="amin")  # [n, P]
    repeated = step > first.gather(1, cues)  # [n, T/2]
    targets = torch.full((n, seq_len), IGNORE, dtype=torch.long)
    targets[:, 0::2] = torch.where(repeated, responses, IGNORE)
    return inputs, targets


def paper_mqar_load(seq_len: int, num_pairs: int) -> float:
    """The memory load of `paper_mqar`: the expected number of distinct pairs that precede an
    answered query, over all answered queries. Cues are drawn with replacement, so at P pairs
    and length T a query's memory holds fewer than P of them until T >> 2 P ln P; above
    d_model = D_k of them, a linear memory can no longer keep them apart (Section 6). At
    P = 128 the load is 58.6 at T = 256 (below d_model = 64), 86.1 at T = 512, 107.7 at
    T = 1024: accuracy against T at fixed P measures a growing load too. (The memory also
    receives the response -> next cue transitions, as many again; cues and responses are
    different tokens, so a trained key map can silence those, and the cue pairs are the load
    that must fit.)

    Exact: with D_s the distinct cues among the s pairs before pair s, the s-th cue is
    answered with probability D_s / P, so the mean load over answered queries is
    sum_s E[D_s^2] / sum_s E[D_s], where, by indicators of each cue having been seen,
    E[D_s] = P p1 and E[D_s^2] = P p1 + P (P - 1) p2 with p1 = 1 - (1 - 1/P)^s (one given cue
    seen) and p2 = 1 - 2 (1 - 1/P)^s + (1 - 2/P)^s (two given cues both seen)."""
    _check_int("seq_len", seq_len, 4)
    _check_int("num_pairs", num_pairs, 1)
    P = num_pairs
    first = second = 0.0
    for s in range(seq_len // 2):
        p1 = 1 - (1 - 1 / P) ** s
        p2 = 1 - 2 * (1 - 1 / P) ** s + (1 - 2 / P) ** s
        first += P * p1
        second += P * p1 + P * (P - 1) * p2
    return second / first


def paper_mqar_loads(inputs: torch.Tensor, num_pairs: int) -> torch.Tensor:
    """The load of every pair of `paper_mqar` sequences: inputs [N, T] -> [N, T/2], the
    number of distinct cues among the pairs before each pair (its query's memory load when
    the cue is answered). `paper_mqar_load` is its expected mean over the answered queries."""
    return _cue_history(inputs, num_pairs)[0]


def paper_mqar_gaps(inputs: torch.Tensor, num_pairs: int) -> torch.Tensor:
    """The recency of every pair of `paper_mqar` sequences: inputs [N, T] -> [N, T/2], the
    pairs since its cue's previous occurrence (1: the pair just before; 0: none before, so
    the cue is not answered)."""
    return _cue_history(inputs, num_pairs)[1]


def _cue_history(inputs: torch.Tensor, num_pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(loads, gaps) [N, T/2] of `paper_mqar_loads` and `paper_mqar_gaps`, in one scan."""
    _check_int("num_pairs", num_pairs, 1)
    cues = inputs[:, 0::2]  # [N, T/2]
    rows = torch.arange(cues.shape[0])
    last = torch.full((cues.shape[0], num_pairs), -1, dtype=torch.long)  # each cue's last pair
    loads = torch.empty(cues.shape, dtype=torch.long)
    gaps = torch.empty(cues.shape, dtype=torch.long)
    for s in range(cues.shape[1]):  # T/2 steps over [N, P]: no [N, T/2, P] tensor
        loads[:, s] = (last >= 0).sum(1)
        before = last[rows, cues[:, s]]
        gaps[:, s] = torch.where(before >= 0, s - before, 0)
        last[rows, cues[:, s]] = s
    return loads, gaps


def zoology_power_law(space: int, power_a: float) -> torch.Tensor:
    """Probabilities `[space]` of the gaps 0..space-1: proportional to (d + 1)^(power_a - 1)."""
    d = torch.arange(1, space + 1, dtype=torch.float64)
    p = d ** (power_a - 1)
    return p / p.sum()


def zoology_mqar(n: int, seq_len: int, num_pairs: int, vocab_size: int,
                 generator: torch.Generator, power_a: float = 0.01):
    """Arora et al.'s multi-query AR: P key-value pairs, then the P keys as queries at
    power-law distributed gaps. Returns (inputs, targets) `[n, T]`."""
    _check_int("n", n, 1)
    _check_int("seq_len", seq_len, 4)
    _check_int("num_pairs", num_pairs, 1)
    _check_int("vocab_size", vocab_size, 4)
    _check_generator(generator)
    if isinstance(power_a, bool) or not isinstance(power_a, (int, float)) or not power_a > 0:
        raise ValueError(f"power_a: expected a positive number, got {power_a!r}")
    P, T, V = num_pairs, seq_len, vocab_size
    if T % 2:
        raise ValueError(f"seq_len: expected an even length, got {T}")
    if 4 * P > T:
        raise ValueError(f"seq_len: expected >= 4 * num_pairs = {4 * P} (context plus room "
                         f"for the queries), got {T}")
    if V // 2 - 1 < P:
        raise ValueError(f"vocab_size: expected >= 2 * (num_pairs + 1) = {2 * (P + 1)} so that "
                         f"{P} distinct keys fit in ids 1..V/2-1, got {V}")
    context = 2 * P
    keys = _sample_distinct(n, 1, V // 2, P, generator)  # [n, P]
    values = _sample_distinct(n, V // 2, V, P, generator)  # [n, P]
    space = (T - context) // 2
    probs = zoology_power_law(space, power_a).expand(n, space)
    gaps = torch.multinomial(probs, P, replacement=False, generator=generator)  # [n, P]
    where = context + 2 * gaps  # [n, P], query positions
    inputs = torch.zeros(n, T, dtype=torch.long)
    inputs[:, 0:context:2] = keys
    inputs[:, 1:context:2] = values
    inputs.scatter_(1, where, keys)
    targets = torch.full((n, T), IGNORE, dtype=torch.long)
    targets.scatter_(1, where, values)
    return inputs, targets

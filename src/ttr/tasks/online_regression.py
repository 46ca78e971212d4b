"""Online regression on a switching autoregressive process (paper Section 5, Eq. 55, Fig. 2).

Keys follow a non-stationary AR(1) process in R^d whose coefficient switches at T/4:

    k_{t+1} = 0.9   k_t + 0.02 eps_t    for t <  T/4     (fast: keys forget in ~10 steps)
    k_{t+1} = 0.999 k_t + 0.02 eps_t    for t >= T/4     (slow: nearly a random walk)   (55)

with eps_t ~ Normal(0, Sigma). The paper only says Sigma has a unit diagonal and non-zero
off-diagonals (so that K_t^T K_t != I, which is what separates RLS from linear attention) and
does not state k_1. Our choices:

* Sigma = (1 - rho) I + rho 1 1^T, rho = 0.5 by default (equicorrelation): unit diagonal,
  every off-diagonal equal to rho, positive definite for -1/(d-1) < rho < 1. It needs no extra
  randomness, so the task is the same for every seed, and its key covariance is far from the
  identity (one eigenvalue 1 + (d-1) rho = 32.5, the other d-1 equal to 1 - rho = 0.5).
* k_1 ~ Normal(0, s^2 Sigma) with s^2 = 0.02^2 / (1 - 0.9^2), the stationary law of the first
  regime. The first quarter is then stationary and "fast-changing" from its first step: each
  key keeps only 0.9 of the previous one and its direction turns by a constant amount per step
  (cos(k_t, k_{t+1}) ~ 0.9). Starting at k_1 = 0 would give the same after ~20 steps; a large
  k_1 (say unit variance) would instead make the first quarter a slow, predictable decay
  0.9^t k_1 along one direction, the opposite of the regime the paper describes. After T/4 the
  increments (norm ~0.02 sqrt(d)) stay fixed while |k_t| grows like a random walk, so the
  direction of k_t changes slowly: the "more predictable" regime.

The regression dataset (Section 5): the memory m_t is fitted to the pairs (k_i, v_i), i <= t, with

    v_t = k_{t+1} / |k_{t+1}|   (the next key, normalized)     q_t = k_{t+1}   (the next key)

so y_t = m_t(q_t) is an out-of-sample prediction of v_{t+1} = k_{t+2} / |k_{t+2}| from k_{t+1},
and the loss of Fig. 2 is |v_{t+1} - y_t|^2. A step needs k_t, k_{t+1} and k_{t+2}, so T steps
need T + 2 keys. Worked example, T = 4 (keys k_1..k_6):

    step t   memory holds (after step t)           query q_t   prediction y_t of   target
    1        (k_1, k_2/|k_2|)                       k_2         k_3/|k_3|           v_2
    2        (k_1, k_2/|k_2|), (k_2, k_3/|k_3|)     k_3         k_4/|k_4|           v_3
    3        ... + (k_3, k_4/|k_4|)                 k_4         k_5/|k_5|           v_4
    4        ... + (k_4, k_5/|k_5|)                 k_5         k_6/|k_6|           v_5

The newest pair (k_t, v_t) maps k_t to k_{t+1}/|k_{t+1}| and the query is k_{t+1}: the layer
must generalize one step, "key -> normalized next key", to a key it has not stored. The naive
forecaster predicts y_t = v_t = q_t / |q_t| (the paper's "v_{t-1} given k_t", shifted by its
one-step indexing): tomorrow's direction equals today's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

COEFS = (0.9, 0.999)  # AR coefficients before / after the switch at T/4 (Eq. 55)
NOISE = 0.02  # scale of the innovations eps_t (Eq. 55)


@dataclass(frozen=True)
class OnlineRegressionData:
    """One batch of the task; every tensor but `keys` is in the op layout `[N, T, 1, d]`.

    keys    [N, T + 2, d]  k_1 .. k_{T+2} (row i is k_{i+1})
    k       [N, T, 1, d]   k_t,                 t = 1..T
    v       [N, T, 1, d]   v_t = k_{t+1}/|k_{t+1}|
    q       [N, T, 1, d]   q_t = k_{t+1}
    target  [N, T, 1, d]   v_{t+1} = k_{t+2}/|k_{t+2}|, what y_t is scored against
    """

    keys: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    q: torch.Tensor
    target: torch.Tensor


def equicorrelation(d: int, rho: float, dtype=torch.float64) -> torch.Tensor:
    """Sigma = (1 - rho) I + rho 1 1^T, `[d, d]`: unit diagonal, off-diagonals rho."""
    return (1 - rho) * torch.eye(d, dtype=dtype) + rho * torch.ones(d, d, dtype=dtype)


def switching_ar(
    n_seqs: int,
    T: int = 256,
    d: int = 64,
    *,
    generator: torch.Generator,
    rho: float = 0.5,
    coefs: tuple[float, float] = COEFS,
    noise: float = NOISE,
    dtype: torch.dtype = torch.float64,
) -> OnlineRegressionData:
    """`n_seqs` independent sequences of Eq. 55 and their regression dataset (see module doc).

    Randomness comes only from `generator` (sampling happens on the CPU in float64 and is then
    cast to `dtype`), so a seeded generator gives the same data on every machine.
    """
    _check_int("n_seqs", n_seqs, 1)
    _check_int("T", T, 1)
    _check_int("d", d, 1)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
    low = -1.0 / (d - 1) if d > 1 else -math.inf
    if not isinstance(rho, (int, float)) or isinstance(rho, bool) or not low < rho < 1:
        raise ValueError(f"rho: expected a correlation in ({low:.4g}, 1) so that Sigma is "
                         f"positive definite for d={d}, got {rho!r}")
    if len(coefs) != 2 or not all(0 < abs(a) < 1 for a in coefs):
        raise ValueError(f"coefs: expected two AR coefficients with 0 < |a| < 1, got {coefs!r}")
    if not noise > 0:
        raise ValueError(f"noise: expected > 0, got {noise!r}")
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype: expected torch.float32 or torch.float64, got {dtype}")

    chol = torch.linalg.cholesky(equicorrelation(d, rho))  # [d, d], eps = chol @ z
    z = torch.randn(n_seqs, T + 2, d, generator=generator, dtype=torch.float64)
    eps = z @ chol.T  # [N, T + 2, d], rows ~ Normal(0, Sigma)

    keys = torch.empty(n_seqs, T + 2, d, dtype=torch.float64)  # row i holds k_{i+1}
    keys[:, 0] = noise / math.sqrt(1 - coefs[0] ** 2) * eps[:, 0]  # stationary start (doc)
    for t in range(1, T + 2):  # paper step t generates k_{t+1} from k_t
        a = coefs[0] if t < T / 4 else coefs[1]
        keys[:, t] = a * keys[:, t - 1] + noise * eps[:, t]

    unit = keys / keys.norm(dim=-1, keepdim=True)  # [N, T + 2, d], k_i / |k_i|
    keys = keys.to(dtype)
    unit = unit.to(dtype)
    return OnlineRegressionData(
        keys=keys,
        k=keys[:, :T, None],  # k_1 .. k_T
        v=unit[:, 1 : T + 1, None],  # v_t = k_{t+1}/|k_{t+1}|
        q=keys[:, 1 : T + 1, None],  # q_t = k_{t+1}
        target=unit[:, 2 : T + 2, None],  # v_{t+1} = k_{t+2}/|k_{t+2}|
    )


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")

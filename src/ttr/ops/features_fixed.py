"""Fixed feature maps phi: [..., D] -> [..., D_phi] (no parameters), and the input checks that
every map in `ttr.ops.features` shares.

A linear memory on features, m(k) = M phi(k) (paper Eq. 3, Vignette 1 "Nonlinear associative
memory"), retrieves with the kernel phi(q).phi(k). The maps here either make that kernel
non-negative (elu + 1, relu, DPFP), make it a polynomial in q.k (Based's Taylor map), or, with
the token positions, add a locality bias (cosFormer). All act on the last dimension only, so
they do not care whether the layout is [B, T, H, D] or [B, H, T, D] -- except cosFormer, whose
positions need the time axis and therefore the op contract's [B, T, H, D].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ttr.ops.common import check_tensor

# -- input checks shared by all feature maps -------------------------------------------------


def check_input(x, name: str = "x") -> int:
    """`x` is a float tensor [..., D] with D >= 1; returns D."""
    check_tensor(name, x)
    if x.ndim == 0 or x.shape[-1] == 0:
        raise ValueError(f"{name}: expected a tensor [..., D] with D >= 1, got shape "
                         f"{tuple(x.shape)}")
    return x.shape[-1]


def check_param(name: str, p, shape: tuple, what: str, x: torch.Tensor) -> torch.Tensor:
    """`p` is a float tensor of `shape` (None = any size) with the dtype and device of `x`."""
    check_tensor(name, p)
    if p.ndim != len(shape) or any(s is not None and s != n for s, n in zip(shape, p.shape,
                                                                            strict=False)):
        want = [("*" if s is None else s) for s in shape]
        raise ValueError(f"{name}: expected shape {what} = {want} (D = last dim of x), got "
                         f"{tuple(p.shape)}")
    if p.dtype != x.dtype:
        raise TypeError(f"{name}: expected dtype {x.dtype} (that of x), got {p.dtype}")
    if p.device != x.device:
        raise ValueError(f"{name}: expected device {x.device} (that of x), got {p.device}")
    return p


def check_int(name: str, v, low: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {v!r}")
    return v


def check_positive(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name}: expected a finite number > 0, got {v!r}")
    return float(v)


def outer_square(z: torch.Tensor, symmetric: bool = False) -> torch.Tensor:
    """z (x) z flattened, so that outer_square(a) . outer_square(b) = (a.b)^2.

    `symmetric=True` keeps only the upper triangle i <= j with the off-diagonal entries scaled
    by sqrt(2) (each appears twice in the full product): same inner products, D(D+1)/2
    instead of D^2 features, i.e. half the memory state.
    """
    D = z.shape[-1]
    zz = z.unsqueeze(-1) * z.unsqueeze(-2)  # [..., D, D]
    if not symmetric:
        return zz.flatten(-2)  # [..., D * D]
    i, j = torch.triu_indices(D, D, device=z.device)
    # Built in z's dtype: a float32 sqrt(2) would cost float64 callers 1e-8 of accuracy.
    scale = torch.full(i.shape, math.sqrt(2.0), dtype=z.dtype, device=z.device)
    scale[i == j] = 1.0  # [D(D+1)/2]
    return zz[..., i, j] * scale  # [..., D(D+1)/2]


# -- elementwise maps: D_phi = D -------------------------------------------------------------


def identity(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = x: the linear memory itself (paper Eq. 2). D_phi = D."""
    check_input(x)
    return x


def elu1(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = 1 + elu(x) > 0 (Katharopoulos et al. 2020, "Transformers are RNNs").

    Positive features keep the normalized attention weights positive. D_phi = D.
    """
    check_input(x)
    return F.elu(x) + 1


def relu(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = max(x, 0) (Qin et al. 2022, cosFormer's base map; also TransNormer). D_phi = D."""
    check_input(x)
    return F.relu(x)


# -- Based: second-order Taylor map of exp(q.k / sqrt(D)) -----------------------------------


def based(x: torch.Tensor, *, symmetric: bool = False) -> torch.Tensor:
    """Taylor feature map of Based (Arora et al. 2024, "Simple linear attention language models
    balance the recall-throughput tradeoff"; the `TaylorExp` map of their code).

        phi(x) = [1, x / D^(1/4), (x (x) x) / sqrt(2 D)]
        phi(q).phi(k) = 1 + q.k/sqrt(D) + (q.k)^2 / (2 D),

    the second-order Taylor polynomial of the softmax kernel exp(q.k / sqrt(D)). D_phi =
    1 + D + D^2, or 1 + D + D(D+1)/2 with `symmetric=True` (same kernel, see `outer_square`).
    Based applies it after projecting q, k to a small feature dimension (16 in the paper).
    """
    D = check_input(x)
    ones = x.new_ones(x.shape[:-1] + (1,))  # [..., 1]
    quad = outer_square(x, symmetric) / math.sqrt(2.0 * D)  # [..., D^2 or D(D+1)/2]
    return torch.cat([ones, x / D**0.25, quad], dim=-1)


# -- DPFP: deterministic parameter-free projection -------------------------------------------


def dpfp(x: torch.Tensor, nu: int = 1) -> torch.Tensor:
    """Deterministic parameter-free projection DPFP-nu (Schlag et al. 2021, "Linear Transformers
    Are Secretly Fast Weight Programmers").

    With r = [relu(x), relu(-x)] in R^{2D} (indices mod 2D), feature (j - 1) 2D + i is
    r_i r_{i+j} for shifts j = 1..nu: products of distinct coordinates, non-negative and
    sparse (x and -x never both pass the relu), so keys are near-orthogonal in a space of
    dimension D_phi = 2 D nu.
    """
    check_input(x)
    check_int("nu", nu)
    r = torch.cat([F.relu(x), F.relu(-x)], dim=-1)  # [..., 2D]
    # roll(-j) puts r_{i+j} at position i.
    shifted = torch.cat([r.roll(-j, dims=-1) for j in range(1, nu + 1)], dim=-1)  # [..., 2D nu]
    return r.repeat((1,) * (r.ndim - 1) + (nu,)) * shifted  # [..., 2D nu]


# -- cosFormer: relu features with a cos re-weighting by relative position ------------------


def cosformer(x: torch.Tensor, positions: torch.Tensor, horizon: float) -> torch.Tensor:
    """cosFormer features (Qin et al. 2022, "cosFormer: Rethinking Softmax in Attention").

    cosFormer scores a query at position t against a key at position i with
        relu(q_t).relu(k_i) cos(pi/2 (t - i) / M),
    a locality bias (largest at t = i) for horizon M (cosFormer takes M = the sequence length
    and positions 1..T). cos(a - b) = cos a cos b + sin a sin b splits it into features,
        phi(x_t) = [relu(x_t) cos(pi t / 2M), relu(x_t) sin(pi t / 2M)],   D_phi = 2D,
    applied to q and k alike, so that phi(q_t).phi(k_i) is exactly the score above. The weight
    stays in [0, 1] while |t - i| <= M; for decoding pick M >= the longest sequence.

    x: [B, T, H, D] (the op contract's layout; the positions index dim 1); positions: [T] real
    or int tensor; horizon: M > 0.
    """
    check_input(x)
    if x.ndim != 4:
        raise ValueError(f"x: expected [B, T, H, D] (positions index dim 1), got shape "
                         f"{tuple(x.shape)}")
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"positions: expected a tensor [T], got {type(positions).__name__}")
    if positions.dtype.is_complex or positions.dtype == torch.bool:
        raise TypeError(f"positions: expected a real or int dtype, got {positions.dtype}")
    if tuple(positions.shape) != (x.shape[1],):
        raise ValueError(f"positions: expected shape [T] = [{x.shape[1]}], got "
                         f"{tuple(positions.shape)}")
    if positions.device != x.device:
        raise ValueError(f"positions: expected device {x.device} (that of x), got "
                         f"{positions.device}")
    M = check_positive("horizon", horizon)
    angle = (math.pi / (2 * M)) * positions.to(x.dtype)  # [T]
    angle = angle[None, :, None, None]  # [1, T, 1, 1]
    r = F.relu(x)  # [B, T, H, D]
    return torch.cat([r * torch.cos(angle), r * torch.sin(angle)], dim=-1)  # [B, T, H, 2D]


def no_params(D: int, *, dtype: torch.dtype = torch.float32, device=None) -> dict:
    """Params creator of a map without parameters (cosFormer): an empty dict."""
    check_int("D", D)
    return {}

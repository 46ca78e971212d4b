"""Rotary position embedding (Su et al. 2021, RoFormer: Enhanced Transformer with Rotary Position
Embedding): rotate each pair of coordinates (x_j, x_{j + D/2}) of a query or key at position t
by the angle t * base^(-2j/D), j < D/2 (GPT-NeoX's "rotate half" pairing). Rotations preserve
norms, and the product of a rotated query at t and a rotated key at i depends on t - i only, so
a memory that compares keys with queries (softmax attention above all) sees relative positions.
ttr's layers have no positional embedding otherwise; the short convolutions give recurrent layers
their local order.
"""

from __future__ import annotations

import torch


def rotary(x: torch.Tensor, position: int, base: float) -> torch.Tensor:
    """x [B, T, H, (n,) D] with even D, the tokens at positions position .. position + T - 1."""
    T, D = x.shape[1], x.shape[-1]
    half = D // 2
    inv = base ** (-torch.arange(half, dtype=torch.float64, device=x.device) / half)  # [D/2]
    t = torch.arange(position, position + T, dtype=torch.float64, device=x.device)
    angle = (t[:, None] * inv).view(1, T, *[1] * (x.ndim - 3), half)  # float64: long T exact
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)

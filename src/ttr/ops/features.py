"""Feature maps phi for linear memories m(k) = M phi(k) (paper Eq. 3, "nonlinear associative
memory"). Each maps `[..., D] -> [..., D_phi]` and is applied to keys and queries alike.

The registry is a plain table so that recipes name maps by string and the recipe validator can
list the choices.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


def elu1(x: torch.Tensor) -> torch.Tensor:
    """1 + ELU, positive features of linear attention (Katharopoulos et al. 2020)."""
    return F.elu(x) + 1


def relu(x: torch.Tensor) -> torch.Tensor:
    """ReLU features (used e.g. by Qin et al. 2022's TransNormer ablations)."""
    return F.relu(x)


FEATURE_MAPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": identity,
    "elu1": elu1,
    "relu": relu,
}

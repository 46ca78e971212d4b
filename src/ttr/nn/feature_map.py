"""The feature map phi of a linear memory on features, m(k) = M phi(k) (paper Eq. 3), as a
module: it owns the map's parameters (learned ones as nn.Parameters, random draws as buffers,
so that a saved model reproduces its features) and applies phi to queries and keys alike.

    >>> phi = FeatureMap("hedgehog", 16)          # learned [softmax(Wx+b), softmax(-Wx-b)]
    >>> phi(torch.randn(2, 5, 4, 16)).shape       # [B, T, H, D] -> [B, T, H, D_phi]
    torch.Size([2, 5, 4, 32])
"""

from __future__ import annotations

import torch
from torch import nn

from ttr.ops.features import FEATURE_MAPS, PARAMETRIC_FEATURE_MAPS

FEATURE_NAMES = (*FEATURE_MAPS, *PARAMETRIC_FEATURE_MAPS)


class FeatureMap(nn.Module):
    """phi by name (`ttr.ops.features`), on `[B, T, H, D]`; `options` go to the map's params
    creator (e.g. num_features=), `horizon` is cosFormer's M (positions come per call)."""

    def __init__(self, name: str, dim: int, *, horizon: float = 4096.0, **options):
        super().__init__()
        if name not in FEATURE_NAMES:
            raise ValueError(f"feature_map: expected one of {list(FEATURE_NAMES)}, got {name!r}")
        self.name, self.horizon = name, horizon
        self.param_names: tuple[str, ...] = ()
        if name in PARAMETRIC_FEATURE_MAPS:
            spec = PARAMETRIC_FEATURE_MAPS[name]
            params = spec.make_params(dim, **options)
            for key, value in params.items():
                if key in spec.trainable:
                    self.register_parameter(key, nn.Parameter(value))
                else:
                    self.register_buffer(key, value)
            self.param_names = tuple(params)
        elif options:
            raise ValueError(f"feature_map: {name!r} takes no options, got {sorted(options)}")
        self.out_dim = self(torch.zeros(1, 1, 1, dim)).shape[-1]

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """x `[B, T, H, D]`, `start` the position of x[:, 0] in the sequence (cosFormer)."""
        if self.name in FEATURE_MAPS:
            return FEATURE_MAPS[self.name](x)
        spec = PARAMETRIC_FEATURE_MAPS[self.name]
        params = {k: getattr(self, k).to(x.dtype) for k in self.param_names}
        if "positions" in spec.inputs:
            params["positions"] = torch.arange(start + 1, start + 1 + x.shape[1],
                                               device=x.device)  # cosFormer counts from 1
            params["horizon"] = self.horizon
        return spec.fn(x, **params)

    def extra_repr(self) -> str:
        return f"{self.name!r}, out_dim={self.out_dim}"

"""Short causal convolution over time (paper Eq. 56): k_t = sum_{i=0}^{K-1} w_i W_K x_{t-i}.

Applied after the projection, one filter per channel (depthwise), no bias and no activation, so
that the layer stays the linear map of Eq. 56. With K = 2 and w_0 = 0, w_1 = 1 the key is the
previous token, k_t = x_{t-1}: the construction that solves MQAR with a single layer (Eq. 57-58).

Decoding carries a cache of the last K-1 inputs; running the layer on a sequence split in two
pieces with the cache carried over equals running it on the whole sequence.

    >>> conv = ShortConv(channels=8, kernel_size=3)
    >>> y, cache = conv(torch.randn(2, 5, 8))           # y [2, 5, 8], cache [2, 2, 8]
    >>> y_next, cache = conv(torch.randn(2, 1, 8), cache)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ShortConv(nn.Module):
    """Depthwise causal conv1d on `[B, T, C]`, `weight[c, i]` = w_i of channel c (lag i).

    Initialization: uniform in (-1/sqrt(K), 1/sqrt(K)), PyTorch's `nn.Conv1d` default for a
    depthwise filter (fan-in K), which the short convolutions of Mamba and fla also start from.
    It leaves the lags unordered, so the layer has to learn which lag to look at, as the
    paper's trained models do (Section 6).
    """

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        for name, val in (("channels", channels), ("kernel_size", kernel_size)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"ShortConv.{name}: expected an int >= 1, got {val!r}")
        self.channels = channels
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(channels, kernel_size))  # [C, K], lag order
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.kernel_size)
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None = None):
        """x `[B, T, C]`, cache None (zeros before the start) or `[B, K-1, C]`, the last K-1
        inputs. Returns (y `[B, T, C]`, the new cache `[B, K-1, C]`)."""
        if x.ndim != 3 or x.shape[-1] != self.channels:
            raise ValueError(f"x: expected shape [B, T, C={self.channels}], got {tuple(x.shape)}")
        B, T, C = x.shape
        K = self.kernel_size
        if cache is None:
            cache = x.new_zeros(B, K - 1, C)
        elif tuple(cache.shape) != (B, K - 1, C):
            raise ValueError(f"cache: expected shape [B, K-1, C] = [{B}, {K - 1}, {C}], "
                             f"got {tuple(cache.shape)}")
        xp = torch.cat([cache.to(x.dtype), x], dim=1)  # [B, K-1+T, C], the history each y_t sees
        # conv1d correlates, so the lag-ordered filter is flipped to put w_0 on the newest input.
        w = self.weight.flip(-1).unsqueeze(1).to(x.dtype)  # [C, 1, K]
        y = F.conv1d(xp.transpose(1, 2), w, groups=C).transpose(1, 2)  # [B, T, C]
        return y, xp[:, xp.shape[1] - (K - 1):]

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.kernel_size}"

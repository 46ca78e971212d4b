"""Feature maps phi for linear memories m(k) = M phi(k) (paper Eq. 3, Vignette 1 "Nonlinear
associative memory"). Each maps `[..., D] -> [..., D_phi]` and is applied to keys and queries
alike, so the memory retrieves with the kernel phi(q).phi(k). All are pure functions.

  name        D_phi                  kernel phi(q).phi(k)                      file
  identity    D                      q.k                                       features_fixed
  elu1        D                      (1 + elu q).(1 + elu k) > 0               features_fixed
  relu        D                      relu(q).relu(k) >= 0                      features_fixed
  based       1 + D + D^2 (*)        1 + q.k/sqrt D + (q.k)^2/2D               features_fixed
  dpfp<nu>    2 D nu                 sparse products of relu([x, -x])          features_fixed
  cosformer   2D                     relu(q).relu(k) cos(pi/2 (t - i)/M)       features_fixed
  favor_plus  m                      E = exp(q.k), positive features           features_random
  rfa         2m                     E = exp(-|q - k|^2 / 2 sigma^2)           features_random
  dijiang     m <= D                 sum_i w_i^2 exp(t_i C_i.(q + k))          features_random
  rebased     D^2 (*)                (z_q.z_k)^2, z = gamma LN(x) + beta       features_learned
  hedgehog    2F                     [softmax(Wx+b), softmax(-Wx-b)] products  features_learned
  (*) D^2 -> D(D+1)/2 with symmetric=True (upper triangle of x (x) x, same kernel).

Two tables, two calling conventions:

FEATURE_MAPS[name](x) -> phi        maps that need nothing but x. Recipes name these
                                    (`FunctionClass.features(name)`), and the recipe validator
                                    lists the keys.

PARAMETRIC_FEATURE_MAPS[name] = ParametricFeatureMap(fn, make_params, trainable, inputs):
    params = make_params(D, **options)                 # dict of tensors, options per map
                                                       # (num_features=, generator=, dtype=, ...)
    phi    = fn(x, **params, **{n: ... for n in inputs})  # inputs: per-call data (cosFormer's
                                                       # positions and horizon)
A layer (nn.Module) registers the params named in `trainable` as nn.Parameters and the others
(random draws) as buffers, and passes them back on every call; the ops never own state.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch

from ttr.ops.features_fixed import (
    based,
    cosformer,
    dpfp,
    elu1,
    identity,
    no_params,
    outer_square,
    relu,
)
from ttr.ops.features_learned import hedgehog, hedgehog_params, rebased, rebased_params
from ttr.ops.features_random import (
    dct_matrix,
    dijiang,
    dijiang_params,
    favor_plus,
    favor_plus_params,
    gaussian_directions,
    rfa,
    rfa_params,
)

__all__ = [
    "FEATURE_MAPS", "PARAMETRIC_FEATURE_MAPS", "ParametricFeatureMap",
    "based", "cosformer", "dct_matrix", "dijiang", "dijiang_params", "dpfp", "elu1",
    "favor_plus", "favor_plus_params", "gaussian_directions", "hedgehog", "hedgehog_params",
    "identity", "no_params", "outer_square", "rebased", "rebased_params", "relu", "rfa",
    "rfa_params",
]


FEATURE_MAPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": identity,
    "elu1": elu1,
    "relu": relu,
    "based": based,
    # DPFP-nu for the orders Schlag et al. (2021) evaluate.
    "dpfp1": partial(dpfp, nu=1),
    "dpfp2": partial(dpfp, nu=2),
    "dpfp3": partial(dpfp, nu=3),
}


class ParametricFeatureMap(NamedTuple):
    """A feature map with parameters or per-call inputs (see the module docstring)."""

    fn: Callable[..., torch.Tensor]
    make_params: Callable[..., dict]
    trainable: tuple[str, ...] = ()  # params a layer learns; the rest are fixed buffers
    inputs: tuple[str, ...] = ()  # per-call keyword inputs besides x and the params


PARAMETRIC_FEATURE_MAPS: dict[str, ParametricFeatureMap] = {
    "cosformer": ParametricFeatureMap(cosformer, no_params, inputs=("positions", "horizon")),
    "favor_plus": ParametricFeatureMap(favor_plus, favor_plus_params),
    "rfa": ParametricFeatureMap(rfa, rfa_params),
    "dijiang": ParametricFeatureMap(dijiang, dijiang_params, trainable=("log_weight",)),
    "rebased": ParametricFeatureMap(rebased, rebased_params, trainable=("gamma", "beta")),
    "hedgehog": ParametricFeatureMap(hedgehog, hedgehog_params, trainable=("weight", "bias")),
}

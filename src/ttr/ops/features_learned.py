"""Learnable feature maps phi: [..., D] -> [..., D_phi]: the function class M_phi of Eq. 3 with
phi itself trained, so that the linear memory's kernel phi(q).phi(k) can approach softmax's.

  rebased   (gamma * LN(x) + beta)^(x)2         kernel (a.b)^2 on affine-normalized inputs
  hedgehog  [softmax(Wx + b), softmax(-Wx - b)] spiky, positive, monotone in Wx

The parameters are explicit arguments; `*_params` create them with the papers' initialization
for a layer to own as nn.Parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ttr.ops.features_fixed import check_input, check_int, check_param, outer_square

# -- ReBased: quadratic kernel on a learned affine map of the normalized input ---------------


def rebased_params(D: int, *, dtype: torch.dtype = torch.float32, device=None) -> dict:
    """{"gamma": ones [D], "beta": zeros [D]}: LayerNorm's affine, learned."""
    check_int("D", D)
    return {"gamma": torch.ones(D, dtype=dtype, device=device),
            "beta": torch.zeros(D, dtype=dtype, device=device)}


def rebased(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, *, eps: float = 1e-5,
            symmetric: bool = False) -> torch.Tensor:
    """ReBased features (Aksenov et al. 2024, "Linear Transformers with Learnable Kernel
    Functions are Better In-Context Models"):

        z = gamma * LN(x) + beta,    phi(x) = z (x) z,    phi(q).phi(k) = (z_q . z_k)^2.

    Based's Taylor map keeps 1 + s + s^2/2; ReBased drops the constant and linear terms and
    lets the learned affine (gamma, beta) after a LayerNorm (mean/variance over D, `eps` as in
    torch's layer_norm) shape the now purely quadratic kernel, which is non-negative and can
    reach zero for unrelated tokens. D_phi = D^2, or D(D+1)/2 with `symmetric=True` (same
    kernel, see `outer_square`). The fla implementation additionally divides the kernel by D;
    here that scale is left to the layer.
    """
    D = check_input(x)
    check_param("gamma", gamma, (D,), "[D]", x)
    check_param("beta", beta, (D,), "[D]", x)
    z = F.layer_norm(x, (D,), gamma, beta, eps)  # [..., D]
    return outer_square(z, symmetric)  # [..., D^2 or D(D+1)/2]


# -- Hedgehog: learned linear map, then softmax over [Wx, -Wx] ------------------------------


def hedgehog_params(D: int, num_features: int | None = None, *, bias: bool = True,
                    generator=None, dtype: torch.dtype = torch.float32, device=None) -> dict:
    """{"weight": [F, D], "bias": [F]} for `hedgehog`, F = num_features (default D).

    For F = D the map starts as the identity (W = I, b = 0; the fla reference does so), so
    phi starts as [softmax(x), softmax(-x)]; otherwise W ~ N(0, 1/D). `bias=False` omits the
    bias.
    """
    check_int("D", D)
    F_ = D if num_features is None else check_int("num_features", num_features)
    if F_ == D:
        weight = torch.eye(D, dtype=torch.float64)
    else:
        weight = torch.randn(F_, D, generator=generator, dtype=torch.float64) / D**0.5
    params = {"weight": weight.to(dtype=dtype, device=device)}
    if bias:
        params["bias"] = torch.zeros(F_, dtype=dtype, device=device)
    return params


def hedgehog(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
             ) -> torch.Tensor:
    """Hedgehog features (Zhang et al. 2024, "The Hedgehog & the Porcupine: Expressive Linear
    Attentions with Softmax Mimicry"):

        z = W x + b,    phi(x) = [softmax(z), softmax(-z)]   (softmax over the F features).

    exp(z) and exp(-z) make the kernel spiky and monotone in z_q . z_k, as softmax attention is;
    the negated copy keeps negative directions of z informative. Each softmax normalizes its
    half per token, which keeps exp from overflowing (as in the authors' follow-up code,
    LoLCATs' `SoftmaxDim`; fla instead takes one softmax over [2z, -2z]): each half of a row
    sums to 1, the row to 2. The two normalizers differ, so phi(q).phi(k) is not
    exp(z_q.z_k) up to a constant. W and b are trained, in the paper by distilling softmax
    attention weights. D_phi = 2F.
    """
    D = check_input(x)
    check_param("weight", weight, (None, D), "[num_features, D]", x)
    if bias is not None:
        check_param("bias", bias, (weight.shape[0],), "[num_features]", x)
    z = F.linear(x, weight, bias)  # [..., F]
    return torch.cat([torch.softmax(z, dim=-1), torch.softmax(-z, dim=-1)], dim=-1)  # [..., 2F]

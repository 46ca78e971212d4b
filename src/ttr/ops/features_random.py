"""Random-feature maps phi: [..., D] -> [..., D_phi] whose inner product estimates a kernel.

The exact kernel memories of the paper (Vignette 4, Eq. 42-47: exp(q.k) or a Gaussian kernel)
have infinite-dimensional features; these maps replace them with m sampled ones, turning the
kernel memory back into a linear memory on features (Eq. 3) with a state of m x Dv numbers.

  favor_plus  exp(w.x - |x|^2/2) / sqrt(m)      E[phi(q).phi(k)] = exp(q.k)       D_phi = m
  rfa         [sin(w.x), cos(w.x)] / sqrt(m)      E[phi(q).phi(k)] = exp(-|q-k|^2/2s^2)  2m
  dijiang     exp(t * DCT(x) + log_weight)        deterministic DCT directions      m <= D

The random draws are parameters, created once by `*_params` (a layer keeps them as buffers, or
redraws them) and passed explicitly, so the maps themselves are pure functions.
"""

from __future__ import annotations

import math

import torch

from ttr.ops.features_fixed import check_input, check_int, check_param, check_positive

# -- shared sampler ---------------------------------------------------------------------------


def gaussian_directions(m: int, D: int, *, orthogonal: bool = True, generator=None,
                        dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """m vectors w_i in R^D, each marginally N(0, I_D): [m, D].

    `orthogonal=True` draws them block-orthogonal (Choromanski et al. 2021; Yu et al. 2016,
    "Orthogonal Random Features"): within each block of D rows the directions are orthonormal
    (Haar-random Q from a QR of a Gaussian matrix), and each row is rescaled by the norm of an
    independent Gaussian vector (chi_D), so that every single w_i is still exactly N(0, I) --
    estimators stay unbiased -- while orthogonal directions lower their variance.
    """
    check_int("num_features", m)
    check_int("D", D)
    g = dict(generator=generator, dtype=torch.float64)
    if not orthogonal:
        w = torch.randn(m, D, **g)
    else:
        blocks = []
        for _ in range(math.ceil(m / D)):
            q, r = torch.linalg.qr(torch.randn(D, D, **g))
            # QR is unique only up to column signs; fixing them by sign(diag R) makes Q Haar.
            blocks.append((q * torch.sign(torch.diagonal(r))).T)  # [D, D], orthonormal rows
        norms = torch.linalg.vector_norm(torch.randn(m, D, **g), dim=-1, keepdim=True)  # [m, 1]
        w = torch.cat(blocks)[:m] * norms
    return w.to(dtype=dtype, device=device)  # [m, D]


# -- Performer FAVOR+: positive random features for exp(q.k) --------------------------------


def favor_plus_params(D: int, num_features: int | None = None, *, orthogonal: bool = True,
                      generator=None, dtype: torch.dtype = torch.float32, device=None) -> dict:
    """{"w": [num_features, D]} random directions for `favor_plus` (a buffer, not learned).

    num_features defaults to D; the Performer paper suggests m of order D log D.
    """
    m = D if num_features is None else num_features
    return {"w": gaussian_directions(m, D, orthogonal=orthogonal, generator=generator,
                                     dtype=dtype, device=device)}


def favor_plus(x: torch.Tensor, w: torch.Tensor, *, stabilize: str | None = None) -> torch.Tensor:
    """Positive random features of FAVOR+ (Choromanski et al. 2021, "Rethinking Attention with
    Performers", Lemma 1):

        phi(x) = exp(w_i.x - |x|^2 / 2)_{i=1..m} / sqrt(m),     w_i ~ N(0, I_D),

    an unbiased estimate of the softmax kernel, E[phi(q).phi(k)] = exp(q.k) (scale q and k by
    D^(-1/4) first for exp(q.k/sqrt(D))), with positive features whatever the draw. D_phi = m.

    For long x every logit is far from 0 and exp under- or overflows (in float32, |x| of
    15-20 zeroes every feature of a token), so `stabilize` subtracts a max c inside the
    exponent, as the Performer code does, which multiplies the features by exp(-c):
      None        exact and unbiased.
      "token"     c = max over the m features, per token. Every estimate involving this token
                  is scaled by its own exp(-c_t): use it on queries only, where it rescales a
                  whole output row, which cancels in normalized attention. On keys it would
                  re-weight keys against each other, i.e. bias the memory.
      "sequence"  c = one max over all tokens and features, per batch entry and head, for
                  x: [B, T, H, D]. A constant for all keys of a sequence, so it cancels in
                  normalized attention without biasing; it reads future tokens, so a
                  token-by-token decoder cannot reproduce it.
    The max is not detached: the gradient is that of the function computed.
    """
    D = check_input(x)
    check_param("w", w, (None, D), "[num_features, D]", x)
    m = w.shape[0]
    logits = x @ w.T - 0.5 * (x * x).sum(-1, keepdim=True)  # [..., m]
    if stabilize == "token":
        logits = logits - logits.amax(dim=-1, keepdim=True)
    elif stabilize == "sequence":
        if x.ndim != 4:
            raise ValueError(f"x: stabilize='sequence' needs [B, T, H, D], got shape "
                             f"{tuple(x.shape)}")
        logits = logits - logits.amax(dim=(1, 3), keepdim=True)
    elif stabilize is not None:
        raise ValueError(f"stabilize: expected None, 'token' or 'sequence', got {stabilize!r}")
    return torch.exp(logits) / math.sqrt(m)  # [..., m]


# -- RFA: random Fourier features for the Gaussian kernel ------------------------------------


def rfa_params(D: int, num_features: int | None = None, *, sigma: float = 1.0,
               orthogonal: bool = False, generator=None, dtype: torch.dtype = torch.float32,
               device=None) -> dict:
    """{"w": [num_features, D]} = directions N(0, I) / sigma for `rfa` (a buffer);
    num_features defaults to D."""
    sigma = check_positive("sigma", sigma)
    m = D if num_features is None else num_features
    w = gaussian_directions(m, D, orthogonal=orthogonal, generator=generator,
                            dtype=torch.float64)
    return {"w": (w / sigma).to(dtype=dtype, device=device)}


def rfa(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Random Fourier features of RFA (Peng et al. 2021, "Random Feature Attention";
    Rahimi & Recht 2007):

        phi(x) = [sin(w_i.x), cos(w_i.x)]_{i=1..m} / sqrt(m),    w_i ~ N(0, I_D / sigma^2),

    E[phi(q).phi(k)] = E[cos(w.(q - k))] = exp(-|q - k|^2 / (2 sigma^2)), the Gaussian kernel.
    sigma is the kernel's bandwidth, so the directions have variance 1/sigma^2. RFA
    l2-normalizes q and k first, where the Gaussian kernel is proportional to
    exp(q.k / sigma^2), i.e. softmax attention. Features can be negative. D_phi = 2m.
    """
    D = check_input(x)
    check_param("w", w, (None, D), "[num_features, D]", x)
    z = x @ w.T  # [..., m]
    return torch.cat([torch.sin(z), torch.cos(z)], dim=-1) / math.sqrt(w.shape[0])  # [..., 2m]


# -- DiJiang: weighted DCT features ----------------------------------------------------------


def dct_matrix(D: int, *, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """The orthonormal DCT-II matrix C [D, D]: (C x)_k = s_k sum_n x_n cos(pi (2n + 1) k / 2D),
    s_0 = sqrt(1/D), s_k = sqrt(2/D) otherwise (C C^T = I)."""
    check_int("D", D)
    k = torch.arange(D, dtype=torch.float64)[:, None]  # [D, 1] frequency
    n = torch.arange(D, dtype=torch.float64)[None, :]  # [1, D] position
    C = torch.cos(math.pi * (2 * n + 1) * k / (2 * D)) * math.sqrt(2.0 / D)  # [D, D]
    C[0] /= math.sqrt(2.0)
    return C.to(dtype=dtype, device=device)


def dijiang_params(D: int, num_features: int | None = None, *, generator=None,
                   dtype: torch.dtype = torch.float32, device=None) -> dict:
    """{"proj": [m, D] = diag(t) C[:m] (a buffer), "log_weight": [m] (learned)} for `dijiang`.

    t_i = Phi^{-1}(u_i) are normal quantiles at a randomly shifted and permuted lattice u_i =
    (pi_i + s) / m, one point in each stratum [i/m, (i+1)/m): the quasi-Monte-Carlo radii.
    m <= D keeps the m lowest DCT frequencies (the paper uses m = D). log_weight starts at
    -log(m)/2, the 1/sqrt(m) of an unweighted Monte-Carlo average.
    """
    check_int("D", D)
    m = D if num_features is None else check_int("num_features", num_features)
    if m > D:
        raise ValueError(f"num_features: DiJiang has one feature per DCT frequency, expected "
                         f"<= D = {D}, got {m}")
    shift = torch.rand((), generator=generator, dtype=torch.float64).clamp(min=1e-6)
    perm = torch.randperm(m, generator=generator).to(torch.float64)
    t = torch.special.ndtri((perm + shift) / m)  # [m]
    proj = t[:, None] * dct_matrix(D)[:m]  # [m, D]
    log_weight = torch.full((m,), -0.5 * math.log(m), dtype=torch.float64)
    return {"proj": proj.to(dtype=dtype, device=device),
            "log_weight": log_weight.to(dtype=dtype, device=device)}


def dijiang(x: torch.Tensor, proj: torch.Tensor, log_weight: torch.Tensor) -> torch.Tensor:
    """Weighted DCT features of DiJiang (Chen et al. 2024, "DiJiang: Efficient Large Language
    Models through Compact Kernelization", the WDCF map):

        phi(x) = D_w exp(T C x),   C = DCT-II [m, D], T = diag(t), D_w = exp(log_weight),

    i.e. positive features exp(w_i.x) whose directions w_i = t_i C_i are the DCT basis (fixed,
    orthonormal) scaled by quasi-Monte-Carlo normal quantiles t_i, and whose weights D_w are
    learned (the paper's weighted QMC, learning D directly; exp(log_weight) keeps phi > 0).
    D_phi = m (= D in the paper).

    The paper's Gaussian-kernel estimate (its positive fixed features) carries a factor
    exp(-|x|^2) that the WDCF map drops; with fixed directions there is no unbiasedness to
    test. The released code differs again (x C^T with a softmax over features and decay
    gates); this follows the paper's formula.
    """
    D = check_input(x)
    check_param("proj", proj, (None, D), "[num_features, D]", x)
    check_param("log_weight", log_weight, (proj.shape[0],), "[num_features]", x)
    return torch.exp(x @ proj.T + log_weight)  # [..., m]

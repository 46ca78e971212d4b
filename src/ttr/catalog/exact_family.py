"""The exact solution of the regression (one Newton step, Eq. 11, 15, 25): the mesa layer and
its weighted, forgetting variant; and the nonparametric memories that keep every pair and
solve per query (Section 4, Vignette 4): kernel regression, softmax attention as local-constant
regression, local linear attention (p = 1)."""

from __future__ import annotations

import math

from ttr.catalog.registry import Built, entry
from ttr.nn.gates import SigmoidDecay, StepSize, Temperature
from ttr.recipe import FunctionClass, Optimizer, Recipe, Weights

LIN = FunctionClass.linear()


@entry("mesa", "exact second order",
       "von Oswald et al. 2023, Uncovering mesa-optimization algorithms in Transformers",
       conv_k=4, output_norm="rms")
def mesa(config, *, ridge: float = 1.0):
    """Mesa layer (von Oswald et al. 2023, Eq. 6-8): o_t = V^T K (K^T K + lambda I)^-1 q_t, the
    exact ridge regression of all past pairs (paper Eq. 11), uniform weights. Deviation: the
    ridge lambda is a fixed option (`ridge`) instead of a learned parameter."""
    return Built(Recipe(Weights.uniform(), LIN, Optimizer.exact(ridge)))


@entry("mesanet", "exact second order",
       "von Oswald et al. 2025, MesaNet: Sequence Modeling by Locally Optimal Test-Time Training",
       conv_q=4, conv_k=4, conv_silu=True, qk_norm=True, output_norm="rms", form="chunk")
def mesanet(config, *, ridge: float = 1.0):
    """MesaNet (von Oswald et al. 2025, Eq. 3-6): weighted ridge regression with forgetting,
    H_kk <- gamma_t H_kk + beta_t k k^T, H_kv <- gamma_t H_kv + beta_t k v^T, with data-dependent
    forget gate gamma_t = sigmoid(W x) and input gate beta_t = sigmoid(W x). Deviations: the
    ridge is a fixed scalar option, not MesaNet's learned per-dimension Lambda. The default form
    is MesaNet's own algorithm, conjugate gradient on chunked linear attention (`form="chunk"`;
    tolerance and iteration cap in ttr.ops.rls_cg), which solves every system to a relative
    residual of 1e-5 in float32 (1e-12 in float64). `form="parallel"` solves them exactly by
    batched LU, at a cost: one MQAR training step (d_model 128, one head, T = 128, 32
    sequences, one thread) took 3.0 s in the parallel form and 0.49 s in the chunk form, because
    the parallel form materializes every prefix Gram ([B, T, H, Dk^2])."""
    recipe = Recipe(Weights.geometric(), LIN, Optimizer.exact(ridge))
    return Built(recipe, (SigmoidDecay(config.d_model, config.n_heads, bias=4.0),
                          StepSize(config.d_model, config.n_heads)))


@entry("intention", "exact second order",
       "Garnelo & Czarnecki 2023, Exploring the Space of Key-Value-Query Models with Intention")
def intention(config, *, ridge: float = 1.0):
    """Intention (Garnelo & Czarnecki 2023, Eq. 5): o_t = q_t^T (K^T K + delta I)^-1 K^T V, the
    regression of values on keys read at the query, here causal (the prefix up to t) as the
    issue asks; no short conv, no output norm. The same op as the mesa layer; the difference is
    the layer around it."""
    return Built(Recipe(Weights.uniform(), LIN, Optimizer.exact(ridge)))


@entry("kernel_regression", "nonparametric",
       "Wang, Shi & Fox 2025, Test-time regression (Eq. 42-44); kernel ridge regression",
       output_norm="rms")
def kernel_regression(config, *, ridge: float = 1.0, kernel: str = "exp"):
    """Exact causal kernel ridge regression (paper Eq. 43): o_t = V^T (k(K,K) + lambda I)^-1
    k(K, q_t) over the prefix, kernel exp(k.k'/sqrt Dk) by default, blocked Cholesky
    (ttr.ops.kernel_regression); the state is the KV cache and the work O(T^3) per sequence.
    The output is RMS-normalized per head (not part of the regression) so that deep stacks
    stay well scaled. Non-causal mode not yet."""
    recipe = Recipe(Weights.uniform(), FunctionClass.kernel_class(kernel), Optimizer.exact(ridge))
    return Built(recipe)


@entry("unnormalized_softmax", "nonparametric",
       "Wang, Shi & Fox 2025, Test-time regression (Eq. 45-47, the crude approximation "
       "k(K, K) ~ I)",
       output_norm="rms")
def unnormalized_softmax(config):
    """Unnormalized softmax attention (paper Eq. 45-47): one GD step from zero in the exp
    kernel's feature space, o_t = sum_{i<=t} exp(q_t.k_i / sqrt Dk) v_i, i.e. kernel regression
    with k(K, K) replaced by I. Without the softmax denominator the output scale grows with t
    and with the logits; the per-head RMSNorm (the paper's Eq. 13 remedy) makes it trainable,
    and the logits must stay below ~88 in float32 (ttr.ops.kernel_regression)."""
    recipe = Recipe(Weights.uniform(), FunctionClass.kernel_class("exp"), Optimizer.gd())
    return Built(recipe)


@entry("softmax_attention", "nonparametric",
       "Vaswani et al. 2017, Attention Is All You Need (NeurIPS)")
def softmax_attention(config):
    """Softmax attention (Vaswani et al. 2017; paper Eq. 1): Nadaraya-Watson regression with
    the similarity exp(q.k / sqrt(Dk)) (Eq. 50). Not the Gaussian kernel unless q and k have
    unit norm (that is `softmax_qknorm`); the recipe column shows the local-constant class."""
    return Built(Recipe(Weights.local(), FunctionClass.local_polynomial(0), Optimizer.exact()),
                 memory="softmax")


@entry("softmax_qknorm", "nonparametric",
       "Henry et al. 2020, Query-Key Normalization for Transformers (Findings of EMNLP); paper "
       "Eq. 51",
       qk_norm=True)
def softmax_qknorm(config, *, temperature: float = 10.0):
    """Softmax attention with QKNorm = the Gaussian-kernel local-constant regressor (paper
    Eq. 48-51): unit-norm q, k and exp(-||k - c q||^2 / (2 sqrt Dk)), with a learned per-head
    scale c (QKNorm's learned temperature; starts at `temperature` * sqrt(Dk) / 1, i.e. logits
    temperature * q.k). The recipe's bandwidth is 2 sqrt(Dk) / c."""
    recipe = Recipe(Weights.local(), FunctionClass.local_polynomial(0), Optimizer.exact())
    return Built(recipe, (Temperature(config.n_heads, init=temperature * math.sqrt(config.dk)),))


@entry("local_linear", "nonparametric",
       "Wang, Shi & Fox 2025, Test-time regression (Eq. 52-54, proposed; blocked algorithm: ttr)")
def local_linear(config, *, ridge: float = 0.1):
    """Local linear attention (paper Eq. 52-54, p = 1): per query, the Gaussian-weighted affine
    fit of the values on k_i - q_t, output the intercept; blocked FlashAttention-style
    (ttr.ops.local_linear_attention). Bandwidth 2 sqrt(Dk) fixed; q and k are not normalized, so
    the layer sharpens the kernel through their norms. `ridge` on the slope keeps the fit
    differentiable on short prefixes."""
    recipe = Recipe(Weights.local(), FunctionClass.local_polynomial(1), Optimizer.exact(ridge))
    return Built(recipe)

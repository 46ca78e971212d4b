"""Online SGD on the newest pair, warm-started from the previous memory (Eq. 26-41): the delta
rule and its step-size rules, forgetting, several steps per token, momentum, and nonlinear
(MLP) memories trained at test time. The layers normalize q and k to unit length where their
papers do (DeltaNet and its descendants), which keeps a step beta in (0, 1) stable."""

from __future__ import annotations

from ttr.catalog.registry import Built, entry
from ttr.nn.gates import InnerModel, MambaDecay, NeuralMemory, StepSize
from ttr.recipe import FunctionClass, Optimizer, Recipe, Weights

LIN = FunctionClass.linear()
CONV4 = dict(conv_q=4, conv_k=4, conv_v=4, conv_silu=True)


@entry("deltanet", "online SGD",
       "Schlag et al. 2021, Linear Transformers Are Secretly Fast Weight Programmers (ICML); "
       "Yang et al. 2024, Parallelizing Linear Transformers with the Delta Rule over Sequence "
       "Length (NeurIPS)",
       **CONV4, qk_norm=True, output_norm="rms")
def deltanet(config):
    """DeltaNet (Schlag et al. 2021, Eq. 17-20; Yang et al. 2024, Eq. 1): one SGD step per
    token with a data-dependent step beta_t = sigmoid(W x), S_t = S_{t-1}(I - beta k k^T)
    + beta k v^T (paper Eq. 29), on L2-normalized q, k after a SiLU short conv (Yang et al.)."""
    recipe = Recipe(Weights.uniform(), LIN, Optimizer.sgd())
    return Built(recipe, (StepSize(config.d_model, config.n_heads),))


@entry("longhorn", "online SGD",
       "Liu et al. 2024, Longhorn: State Space Models are Amortized Online Learners",
       **CONV4)
def longhorn(config):
    """Longhorn (Liu et al. 2024, Eq. 8-9; paper Eq. 30-31): the implicit (proximal) online
    step, beta_t = delta_t / (1 + delta_t ||k_t||^2) with delta_t = softplus(W x) > 0; keys
    are not normalized (the rule adapts the step to ||k||). Deviation: Longhorn's per-channel
    state (a diagonal-in-value SSM with separate delta per value channel) is one delta per head
    here, the matrix memory of the paper's Eq. 31."""
    recipe = Recipe(Weights.uniform(), LIN, Optimizer.sgd("longhorn"))
    return Built(recipe, (StepSize(config.d_model, config.n_heads, kind="softplus"),))


@entry("nlms", "online SGD",
       "Wang, Shi & Fox 2025, Test-time regression (Eq. 32-33); Kaczmarz 1937; Nagumo & Noda "
       "1967 (NLMS)",
       **CONV4)
def nlms(config):
    """NLMS / Kaczmarz (paper Eq. 32-33, proposed as a layer by the paper): beta_t =
    1 / ||k_t||^2, the smallest change of the memory that interpolates the newest pair exactly
    (an orthogonal projection, stable for any key norm). No learned step; keys are not
    normalized (with unit keys it would be DeltaNet with beta = 1)."""
    return Built(Recipe(Weights.uniform(), LIN, Optimizer.sgd("nlms")))


@entry("leaky_lms", "online SGD",
       "Wang, Shi & Fox 2025, Test-time regression (Eq. 34-37, the decoupled leaky LMS the "
       "paper suggests)",
       **CONV4, qk_norm=True, output_norm="rms")
def leaky_lms(config, *, weight_decay: float = 0.1):
    """Leaky LMS (paper Eq. 34-37): SGD on 1/2 ||v - M k||^2 + lambda/2 ||M||^2 with the
    learning rate beta_t = sigmoid(W x) and the L2 strength lambda (`weight_decay`) decoupled;
    ttr runs it as Gated DeltaNet with alpha_t = 1 - beta_t lambda (Eq. 38-41,
    ttr.recipe.sgd_gates)."""
    recipe = Recipe(Weights.uniform(), LIN, Optimizer.sgd(weight_decay=weight_decay))
    return Built(recipe, (StepSize(config.d_model, config.n_heads),))


@entry("gated_deltanet", "online SGD",
       "Yang, Kautz & Hatamizadeh 2025, Gated Delta Networks: Improving Mamba2 with Delta Rule "
       "(ICLR)",
       **CONV4, qk_norm=True, output_norm="rms", output_gate="silu")
def gated_deltanet(config):
    """Gated DeltaNet (Yang et al. 2025, Eq. 10): S_t = alpha_t S_{t-1}(I - beta_t k k^T)
    + beta_t k v^T with Mamba-2's decay alpha_t = exp(-exp(A) softplus(W x + b)) and
    beta_t = sigmoid(W x); L2-normalized q, k after a SiLU conv, gated RMSNorm output. Paper
    Eq. 41: it is the leaky LMS reparameterized."""
    recipe = Recipe(Weights.geometric(), LIN, Optimizer.sgd())
    return Built(recipe, (MambaDecay(config.d_model, config.n_heads, scale_v=False),
                          StepSize(config.d_model, config.n_heads)))


@entry("deltaproduct", "online SGD",
       "Siems et al. 2025, DeltaProduct: Improving State-Tracking in Linear RNNs via Householder "
       "Products",
       **CONV4, qk_norm=True, output_norm="rms", keys_per_token=2)
def deltaproduct(config):
    """DeltaProduct (Siems et al. 2025, Eq. 4-5): n_h = keys_per_token delta steps per token,
    each with its own key, value and step, S_t = S_{t-1} prod_j (I - beta_j k_j k_j^T) + ...
    Deviation: beta_j = sigmoid in (0, 1); the paper's variant with beta in (0, 2) (negative
    eigenvalues, for state tracking) is the same op with 2 sigmoid."""
    recipe = Recipe(Weights.uniform(), LIN, Optimizer.sgd(steps=config.keys_per_token))
    return Built(recipe, (StepSize(config.d_model, config.n_heads, n=config.keys_per_token),),
                 memory="delta_product")


@entry("ttt_linear", "online SGD",
       "Sun et al. 2024, Learning to (Learn at Test Time): RNNs with Expressive Hidden States",
       output_norm="layer", output_gate="silu")
def ttt_linear(config, *, mini_batch: int = 16, base_lr: float = 1.0):
    """TTT-Linear (Sun et al. 2024, Sections 2.4-2.7): the inner model f(x) = x + LN(x W + b)
    trained on 1/2 ||LN(g(k)) - (v - k)||^2 by mini-batch GD (b = 16, gradients at the
    mini-batch start), learnable token-dependent inner learning rate base * sigmoid(W x) / D;
    output f_{W_t}(q_t). Deviations: TTT's learnable 1/t scaling of the rows inside a
    mini-batch is left out (ttr.ops.nonlinear); decoding replays the tokens since the last
    mini-batch boundary (exact, O(b) per token) instead of TTT's accumulated-gradient cache.
    Needs d_key == d_value (the residual)."""
    return _ttt(config, "linear", mini_batch, base_lr)


@entry("ttt_mlp", "online SGD",
       "Sun et al. 2024, Learning to (Learn at Test Time): RNNs with Expressive Hidden States",
       output_norm="layer", output_gate="silu")
def ttt_mlp(config, *, mini_batch: int = 16, base_lr: float = 0.1):
    """TTT-MLP (Sun et al. 2024): as TTT-Linear with a 2-layer MLP inner model
    g(x) = gelu(x W1 + b1) W2 + b2 (hidden 4D, tanh-gelu), base inner learning rate 0.1."""
    return _ttt(config, "mlp", mini_batch, base_lr)


def _ttt(config, model, mini_batch, base_lr):
    if config.dk != config.dv:
        raise ValueError(f"d_key: TTT's inner model is residual, x + LN(g(x)), so it needs "
                         f"d_key == d_value, got {config.dk} and {config.dv}")
    recipe = Recipe(Weights.uniform(), FunctionClass.mlp(), Optimizer.sgd())
    gate = InnerModel(config.d_model, config.n_heads, config.dk, model=model, base=base_lr,
                      mini_batch=mini_batch)
    return Built(recipe, (gate,), memory="ttt")


@entry("titans", "online SGD",
       "Behrouz, Zhong & Mirrokni 2024, Titans: Learning to Memorize at Test Time",
       **CONV4, qk_norm=True, output_norm="rms", output_gate="silu")
def titans(config, *, depth: int = 2, chunk_size: int = 4):
    """Titans' neural memory (Behrouz et al. 2024, Eq. 8-15): an MLP memory (depth 2, SiLU)
    trained on 1/2 ||M(k) - v||^2 by SGD with data-dependent momentum eta_t and forgetting
    alpha_t, S_t = eta_t S_{t-1} - theta_t grad, M_t = (1 - alpha_t) M_{t-1} + S_t, gradients
    at the chunk's start memory (Section 3.2); output M_t(q_t). The memory module alone (Titans'
    "LMM"), not the MAC/MAG/MAL architectures around it; q, k L2-normalized after a SiLU conv,
    as Titans does. Deviation: chunks of 4 tokens by default, not 16. With 16, momentum sums
    16 repeats of each chunk-start gradient and the memory overflowed on MQAR (zoology, d_model
    64, T = 128: diverged at the first step for every learning rate; float64 too); with 4 it
    trained to 48% there (lr 3e-3, 600 steps) and to 97% at T = 64, where 16 gave 99%."""
    recipe = Recipe(Weights.geometric(), FunctionClass.mlp(),
                    Optimizer.sgd(momentum=0.9))
    gate = NeuralMemory(config.d_model, config.n_heads, config.dk, config.dv, depth=depth,
                        chunk_size=chunk_size)
    return Built(recipe, (gate,), memory="titans")

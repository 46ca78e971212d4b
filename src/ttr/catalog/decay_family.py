"""Geometric weights (Eq. 14-16) with one GD step from zero: linear attention with forgetting.
The architectures differ in how the decay gamma_t = exp(g_t) is parameterized (fixed, learned
but static, data-dependent; per head or per key dimension) and in what else the layer adds
(output gates, normalizers, a bonus for the current token)."""

from __future__ import annotations

from ttr.catalog.registry import Built, entry
from ttr.nn.gates import (
    FixedDecay,
    ForgetGateKey,
    InputGate,
    MambaDecay,
    RWKVDecay,
    SigmoidDecay,
    StaticDecay,
)
from ttr.recipe import FunctionClass, Optimizer, Recipe, Weights

LIN = FunctionClass.linear()


def _decayed(granularity: str = "scalar") -> Recipe:
    return Recipe(Weights.geometric(granularity), LIN, Optimizer.gd())


@entry("retnet", "geometric decay",
       "Sun et al. 2023, Retentive Network: A Successor to Transformer for Large Language Models",
       output_norm="layer", output_gate="silu")
def retnet(config):
    """RetNet (Sun et al. 2023, Eq. 8-9): retention with a fixed decay per head,
    gamma_h = 1 - 2^(-5-h), GroupNorm (LayerNorm per head) and a swish output gate. Deviation:
    no xPos rotation of q and k (a position encoding, orthogonal to the memory)."""
    return Built(_decayed(), (FixedDecay(config.n_heads),))


@entry("gla", "geometric decay",
       "Yang et al. 2024, Gated Linear Attention Transformers with Hardware-Efficient Training "
       "(ICML)",
       output_norm="rms", output_gate="silu")
def gla(config, *, normalizer: float = 16.0, rank: int = 16):
    """GLA (Yang et al. 2024, Eq. 9-10): a data-dependent decay per key dimension,
    alpha_t = sigmoid(W2 W1 x + b)^(1/16) with a rank-16 bottleneck, RMSNorm and a swish
    output gate. Deviation: GLA's q/k dimension is half the value dimension by default; here
    both default to d_model / n_heads (set d_key)."""
    return Built(_decayed("dim"), (SigmoidDecay(config.d_model, config.n_heads, config.dk,
                                                normalizer=normalizer, rank=rank),))


@entry("gateloop", "geometric decay",
       "Katsch 2023, GateLoop: Fully Data-Controlled Linear Recurrence for Sequence Modeling",
       output_norm="rms", output_gate="silu")
def gateloop(config):
    """GateLoop (Katsch 2023, Eq. 3-5): data-controlled diagonal state transitions per key
    dimension, a_t = sigmoid(W x + b), resting values spread over (0.9, 0.999). Deviation:
    GateLoop's transitions are complex (magnitude and a data-controlled phase, a relative
    rotation); here only the real magnitude, which is the regression weight of Eq. 14."""
    return Built(_decayed("dim"), (SigmoidDecay(config.d_model, config.n_heads, config.dk,
                                                bias=(0.9, 0.999)),))


@entry("hgrn2", "geometric decay",
       "Qin et al. 2024, HGRN2: Gated Linear RNNs with State Expansion (COLM)",
       output_norm="rms", output_gate="silu")
def hgrn2(config, *, lower_bound: float = 0.0):
    """HGRN-2 (Qin et al. 2024, Eq. 5-6): per-dimension forget gate f_t with a lower bound and
    the key tied to it, k_t = 1 - f_t; decay g = log f_t. Deviation: the lower bound is a
    constant option instead of HGRN-2's learned, depth-increasing per-layer bound."""
    return Built(_decayed("dim"), (ForgetGateKey(config.d_model, config.n_heads, config.dk,
                                                 lower_bound=lower_bound),))


@entry("lru", "geometric decay",
       "Orvieto et al. 2023, Resurrecting Recurrent Neural Networks for Long Sequences (ICML)")
def lru(config, *, r_min: float = 0.9, r_max: float = 0.999):
    """LRU (Orvieto et al. 2023, Section 3): a learned but data-independent decay per key
    dimension, lambda = exp(-exp(nu)) initialized on the ring [r_min, r_max], and the input
    normalization gamma = sqrt(1 - lambda^2). Deviation: LRU is complex-valued with a diagonal
    vector state read by Re(C h_t); here the decay is real and the state is linear attention's
    matrix memory read with a query (see ttr.nn.gates.StaticDecay)."""
    return Built(_decayed("dim"), (StaticDecay(config.n_heads, config.dk, r_min=r_min,
                                               r_max=r_max),))


@entry("mamba2", "geometric decay",
       "Dao & Gu 2024, Transformers are SSMs: Generalized Models and Efficient Algorithms "
       "Through Structured State Space Duality (ICML)",
       conv_q=4, conv_k=4, conv_v=4, conv_silu=True, output_norm="rms", output_gate="silu",
       skip=True)
def mamba2(config):
    """Mamba-2 / SSD (Dao & Gu 2024, Section 3-7): scalar data-dependent decay exp(Delta_t A)
    per head, k = B, q = C, v = x scaled by Delta_t, a length-4 conv with SiLU on x, B, C, the
    D skip term and a gated RMSNorm. Deviations: B and C have one group per head (Mamba-2
    shares them across heads, ngroups = 1); the output is RMSNorm(o) * silu(z) (Mamba-2
    normalizes after gating)."""
    return Built(_decayed(), (MambaDecay(config.d_model, config.n_heads, scale_v=True),))


@entry("rwkv6", "geometric decay",
       "Peng et al. 2024, Eagle and Finch: RWKV with Matrix-Valued States and Dynamic "
       "Recurrence (COLM)",
       conv_q=2, conv_k=2, conv_v=2, output_norm="layer", output_gate="silu")
def rwkv6(config, *, rank: int = 64):
    """RWKV-6 "Finch" (Peng et al. 2024, Eq. 15-20): per-dimension data-dependent decay
    w_t = exp(-exp(d + LoRA(x))), receptance r = q, and the bonus u that weights the current
    token's pair, o_t = S_{t-1}^T r_t + (r_t . (u * k_t)) v_t. Deviation: RWKV's token shift
    (a data-dependent interpolation between x_t and x_{t-1} per projection) is a learned
    length-2 short conv on r, k, v here."""
    return Built(_decayed("dim"), (RWKVDecay(config.d_model, config.n_heads, config.dk,
                                             rank=rank),), memory="rwkv6")


@entry("mlstm", "geometric decay",
       "Beck et al. 2024, xLSTM: Extended Long Short-Term Memory (NeurIPS)",
       conv_q=4, conv_k=4, conv_silu=True, output_norm="layer", output_gate="sigmoid")
def mlstm(config):
    """mLSTM (Beck et al. 2024, Eq. 19-27): matrix memory with an exponential input gate, a
    sigmoid forget gate, the normalizer state n_t and the max-stabilizer m_t,
    h_t = C_t^T q_t / max(|n_t^T q_t|, 1) with k scaled by 1/sqrt(Dk); GroupNorm (LayerNorm per
    head) and a sigmoid output gate as the xLSTM block. The regression view: geometric weights
    with an extra per-token weight exp(i_t), output-normalized (Eq. 13)."""
    return Built(_decayed(), (InputGate(config.d_model, config.n_heads),), memory="mlstm")

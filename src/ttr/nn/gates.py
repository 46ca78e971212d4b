"""Per-token gates: how each architecture turns the input x into the regression weights and
step sizes its recipe reads (paper Table 1 / Section 4: the weights gamma and the optimizer's
step size are where architectures differ most, beyond the three design axes).

Every gate is a small nn.Module with the same call, applied after the projections, the short
convolutions and the optional q/k normalization:

    q, k, v, inputs = gate(x, q, k, v, inputs)
        x [B, T, d_model];  q, k [B, T, H, Dk];  v [B, T, H, Dv]
        inputs: dict of per-token tensors for the op (g, beta, i, f, eta, ...)

A gate may rewrite q, k, v (HGRN-2's key is 1 - forget gate; Mamba-2 scales v by its step
Delta; LRU normalizes the input), or only add entries to `inputs`. A Mixer applies a tuple of
gates in order, so Gated DeltaNet is (MambaDecay, StepSize). The names of the entries match
the op arguments: g (log-decay, Eq. 14), beta (SGD step size or sample weight), i and f
(mLSTM's input and forget gates), u (RWKV-6 bonus), eta (TTT inner learning rate), lr /
momentum / decay (Titans), params (the initial weights of TTT's and Titans' inner models).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def resting_bias(layer: nn.Linear, bias: float | tuple[float, float]) -> None:
    """Set a gate's bias: a constant, or logit of decays spread linearly over (lo, hi)."""
    with torch.no_grad():
        if isinstance(bias, tuple):
            p = torch.linspace(*bias, layer.out_features, dtype=torch.float64)
            layer.bias.copy_(torch.log(p / (1 - p)))
        else:
            layer.bias.fill_(bias)


class FixedDecay(nn.Module):
    """RetNet (Sun et al. 2023, Eq. 8): a fixed decay per head, gamma_h = 1 - 2^(-5-h); the
    weights are geometric but data-independent, g [B, T, H] = log gamma_h."""

    def __init__(self, n_heads: int):
        super().__init__()
        gamma = 1 - 2.0 ** (-5.0 - torch.arange(n_heads, dtype=torch.float64))
        self.register_buffer("log_gamma", gamma.log().float())  # [H]

    def forward(self, x, q, k, v, inputs):
        B, T = x.shape[:2]
        inputs["g"] = self.log_gamma.to(x.dtype).expand(B, T, -1)  # [B, T, H]
        return q, k, v, inputs


class SigmoidDecay(nn.Module):
    """A data-dependent forget gate gamma_t = sigmoid(W x + b)^(1/normalizer), in log space
    g = logsigmoid(W x + b) / normalizer; per head ([B, T, H]) or per key dimension
    ([B, T, H, Dk], `d_key` given). `rank` factors W through a low-rank bottleneck.

    GLA (Yang et al. 2024, Eq. 9): per dimension, rank 16, normalizer 16 (so that the gates
    start close to 1). GateLoop (Katsch 2023): per dimension, full rank, normalizer 1.
    MesaNet / mLSTM forget gates: per head. `bias` sets the resting value of the gate: a float,
    or a pair (lo, hi) of resting decays spread linearly over the gate's units (so that some
    units remember for ~1/(1 - hi) tokens and others forget fast, as LRU's ring init does).
    """

    def __init__(self, d_model: int, n_heads: int, d_key: int | None = None, *,
                 normalizer: float = 1.0, rank: int | None = None,
                 bias: float | tuple[float, float] = 0.0, name: str = "g"):
        super().__init__()
        out = n_heads * (d_key or 1)
        self.shape = (n_heads, d_key) if d_key else (n_heads,)
        self.normalizer, self.name = normalizer, name
        if rank is None:
            self.proj = nn.Linear(d_model, out)
        else:
            self.proj = nn.Sequential(nn.Linear(d_model, rank, bias=False), nn.Linear(rank, out))
        last = self.proj if rank is None else self.proj[1]
        resting_bias(last, bias)

    def forward(self, x, q, k, v, inputs):
        g = F.logsigmoid(self.proj(x)) / self.normalizer  # [B, T, H * (Dk or 1)]
        inputs[self.name] = g.view(*x.shape[:2], *self.shape)
        return q, k, v, inputs


class MambaDecay(nn.Module):
    """Mamba-2 (Dao & Gu 2024, Section 3 / the SSD layer): a step Delta_t = softplus(W x + b_dt)
    per head and a learned A_h < 0; the decay is exp(Delta_t A_h), g = Delta_t * A_h.
    Mamba-2 also discretizes the input with Delta (x_t Delta_t, i.e. v scaled by Delta):
    `scale_v=True`. Gated DeltaNet (Yang et al. 2025, Eq. 10) reuses this gate with
    `scale_v=False` (its step size is the separate beta). Initialization as Mamba-2:
    A ~ U[1, 16], Delta ~ log-uniform on [1e-3, 1e-1] through the inverse softplus of b_dt."""

    def __init__(self, d_model: int, n_heads: int, *, scale_v: bool):
        super().__init__()
        self.scale_v = scale_v
        self.proj = nn.Linear(d_model, n_heads, bias=False)
        self.A_log = nn.Parameter(torch.empty(n_heads).uniform_(1, 16).log())
        dt = torch.exp(torch.empty(n_heads).uniform_(math.log(1e-3), math.log(1e-1)))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)

    def forward(self, x, q, k, v, inputs):
        dt = F.softplus(self.proj(x) + self.dt_bias)  # [B, T, H]
        inputs["g"] = -self.A_log.exp() * dt
        if self.scale_v:
            v = v * dt.unsqueeze(-1)
        return q, k, v, inputs


class ForgetGateKey(nn.Module):
    """HGRN-2 (Qin et al. 2024, Eq. 5-6): a per-dimension forget gate with a lower bound,
    f_t = lb + (1 - lb) sigmoid(W x + b), and the key tied to it, k_t = 1 - f_t (the input gate
    of HGRN-1 becomes the key). g = log f_t. HGRN-2 learns lb per layer, rising with depth (a
    softmax-cumsum over layers); a single layer here takes it as a constant. The layer has no
    key projection (`replaces_key`): k arrives as None."""

    replaces_key = True

    def __init__(self, d_model: int, n_heads: int, d_key: int, *, lower_bound: float = 0.0):
        super().__init__()
        if not 0.0 <= lower_bound < 1.0:
            raise ValueError(f"lower_bound: expected a value in [0, 1), got {lower_bound!r}")
        self.lower_bound = lower_bound
        self.proj = nn.Linear(d_model, n_heads * d_key)
        # resting forget gates spread over (0.9, 0.999) of the range above the lower bound
        resting_bias(self.proj, (0.9, 0.999))

    def forward(self, x, q, k, v, inputs):
        lb = self.lower_bound
        f = lb + (1 - lb) * torch.sigmoid(self.proj(x)).view_as(q)  # [B, T, H, Dk]
        inputs["g"] = torch.log(f)
        return q, 1 - f, v, inputs


class StaticDecay(nn.Module):
    """LRU (Orvieto et al. 2023, Section 3): a data-independent per-dimension decay
    lambda = exp(-exp(nu)), initialized uniformly on the ring [r_min, r_max] = [0.9, 0.999],
    and the input normalization gamma = sqrt(1 - lambda^2) (learned from its initial value),
    applied to the key. The original is complex-valued (lambda = exp(-exp(nu) + i exp(theta)))
    with a diagonal state h_t = lambda h_{t-1} + gamma B x_t and readout Re(C h_t); here the
    decay is real (no phase rotation) and the state is the matrix memory of linear attention,
    read with a query: the regression view of the same decay."""

    def __init__(self, n_heads: int, d_key: int, *, r_min: float = 0.9, r_max: float = 0.999):
        super().__init__()
        u = torch.rand(n_heads, d_key, dtype=torch.float64)
        r2 = u * (r_max ** 2 - r_min ** 2) + r_min ** 2  # |lambda|^2 uniform on the ring
        self.nu_log = nn.Parameter(torch.log(-0.5 * torch.log(r2)).float())  # [H, Dk]
        self.gamma_log = nn.Parameter(0.5 * torch.log1p(-r2).float())  # log sqrt(1 - |l|^2)

    def forward(self, x, q, k, v, inputs):
        B, T = x.shape[:2]
        inputs["g"] = (-self.nu_log.exp()).to(x.dtype).expand(B, T, -1, -1)  # [B, T, H, Dk]
        return q, k * self.gamma_log.exp().to(k.dtype), v, inputs


class RWKVDecay(nn.Module):
    """RWKV-6 (Peng et al. 2024, Eq. 15-18): a per-dimension data-dependent decay
    w_t = exp(-exp(d + tanh(x A) B)) (a low-rank "LoRA" on x) and the bonus u [H, Dk] that
    weights the current token's own pair. Returns g = -exp(d + tanh(x A) B) and u."""

    def __init__(self, d_model: int, n_heads: int, d_key: int, *, rank: int = 64):
        super().__init__()
        self.shape = (n_heads, d_key)
        self.down = nn.Linear(d_model, rank, bias=False)
        self.up = nn.Linear(rank, n_heads * d_key, bias=False)
        # RWKV-6 starts the LoRA data-independent (B = 0); a small B instead lets the gradient
        # reach both factors from the first step
        nn.init.normal_(self.up.weight, std=0.01)
        # RWKV-6's per-channel speed ramp: decay rates spread from slow to fast channels
        ramp = torch.linspace(0, 1, n_heads * d_key)
        self.d = nn.Parameter((-6 + 5 * ramp ** 0.7).view(n_heads, d_key))
        self.u = nn.Parameter(torch.full((n_heads, d_key), 0.5))

    def forward(self, x, q, k, v, inputs):
        lora = self.up(torch.tanh(self.down(x))).view(*x.shape[:2], *self.shape)
        inputs["g"] = -torch.exp(self.d + lora)  # [B, T, H, Dk]
        inputs["u"] = self.u
        return q, k, v, inputs


class StepSize(nn.Module):
    """A data-dependent step size per head (and per sub-step with `n` > 1, DeltaProduct):
    "sigmoid": beta_t = sigmoid(W x + b) in (0, 1) (DeltaNet, Gated DeltaNet, leaky LMS, the
    sample weight of weighted RLS); "softplus": delta_t = softplus(W x + b) > 0 (Longhorn's
    delta, turned into beta_t = delta/(1 + delta ||k||^2) by the recipe, Eq. 31)."""

    def __init__(self, d_model: int, n_heads: int, *, kind: str = "sigmoid", n: int = 1,
                 bias: float = 0.0):
        super().__init__()
        if kind not in ("sigmoid", "softplus"):
            raise ValueError(f"kind: expected 'sigmoid' or 'softplus', got {kind!r}")
        self.kind, self.n, self.n_heads = kind, n, n_heads
        self.proj = nn.Linear(d_model, n_heads * n)
        nn.init.constant_(self.proj.bias, bias)

    def forward(self, x, q, k, v, inputs):
        raw = self.proj(x)
        beta = torch.sigmoid(raw) if self.kind == "sigmoid" else F.softplus(raw)
        if self.n > 1:
            beta = beta.view(*x.shape[:2], self.n_heads, self.n)  # [B, T, H, n]
        inputs["beta"] = beta
        return q, k, v, inputs


class InputGate(nn.Module):
    """mLSTM (Beck et al. 2024, Eq. 19-27): the exponential input gate's pre-activation
    i_t = W_i x + b_i per head (the op exponentiates it, stabilized) and the forget gate
    f_t = logsigmoid(W_f x + b_f). Initialization as xLSTM: b_f linearly from 3 to 6 over
    heads (forget gates near 1), b_i ~ N(0, 0.1)."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.i_proj = nn.Linear(d_model, n_heads)
        self.f_proj = nn.Linear(d_model, n_heads)
        nn.init.zeros_(self.i_proj.weight)
        nn.init.normal_(self.i_proj.bias, std=0.1)
        nn.init.zeros_(self.f_proj.weight)
        with torch.no_grad():
            self.f_proj.bias.copy_(torch.linspace(3.0, 6.0, n_heads))

    def forward(self, x, q, k, v, inputs):
        inputs["i"] = self.i_proj(x)  # [B, T, H]
        inputs["f"] = F.logsigmoid(self.f_proj(x))  # [B, T, H]
        return q, k, v, inputs


class InnerModel(nn.Module):
    """TTT (Sun et al. 2024, Sections 2.4-2.7): the inner model's initial weights and layer
    norm (learned by the outer loop; ttr.ops.nonlinear.ttt_params initializes them) and the
    learnable, token-dependent inner learning rate eta_t = base * sigmoid(W x + b) / D.
    `block` is the mini-batch size b of the inner GD."""

    def __init__(self, d_model: int, n_heads: int, d_head: int, *, model: str, base: float,
                 mini_batch: int):
        super().__init__()
        from ttr.ops.nonlinear import ttt_params

        self.model, self.base, self.d_head, self.block = model, base, d_head, mini_batch
        self.params = nn.ParameterDict({name: nn.Parameter(p) for name, p in
                                        ttt_params(n_heads, d_head, model).items()})
        self.proj = nn.Linear(d_model, n_heads)

    def forward(self, x, q, k, v, inputs):
        inputs["eta"] = self.base * torch.sigmoid(self.proj(x)) / self.d_head  # [B, T, H]
        inputs["params"] = dict(self.params)
        return q, k, v, inputs


class NeuralMemory(nn.Module):
    """Titans (Behrouz et al. 2024, Eq. 13-14): the MLP memory's initial weights
    (ttr.ops.titans.titans_params; depth 2, SiLU) and data-dependent learning rate theta_t,
    momentum eta_t and forgetting alpha_t per head, each a sigmoid of a projection of x. The
    learning rate is scaled by `lr_scale` so that the inner steps start small; momentum rests
    near 0.9 and forgetting near 0.02. Stability: within a chunk every step repeats the
    chunk-start gradient and momentum sums them, so with chunks of 16 repeated keys (MQAR)
    overflowed the memory at initialization (zoology, d_model 64, T = 128; T = 512 with another
    seed; float64 too). On that diverging input (float64, T = 128) chunks of 16 reached |W| ~
    1e30, the exact recurrence (chunk_size 1) stayed at |W| 0.55, chunks of 4 at 1.7, and chunks
    of 16 without momentum were finite; hence the catalogue's chunks of 4. A smaller lr_scale
    (0.03) was tried instead: it kept those initializations finite but trained worse (zoology
    T = 64, 13% against 99%) and still diverged in training. `block` is the chunk inside which
    gradients are taken at the chunk's start memory (Titans Section 3.2)."""

    def __init__(self, d_model: int, n_heads: int, d_key: int, d_value: int, *, depth: int,
                 chunk_size: int, lr_scale: float = 0.1):
        super().__init__()
        from ttr.ops.titans import titans_params

        self.lr_scale, self.n_heads, self.block = lr_scale, n_heads, chunk_size
        self.params = nn.ParameterDict({name: nn.Parameter(p) for name, p in
                                        titans_params(n_heads, d_key, d_value, depth).items()})
        self.proj = nn.Linear(d_model, 3 * n_heads)
        with torch.no_grad():
            self.proj.bias.view(3, n_heads)[1] = 2.0
            self.proj.bias.view(3, n_heads)[2] = -4.0

    def forward(self, x, q, k, v, inputs):
        lr, mom, dec = torch.sigmoid(self.proj(x)).chunk(3, dim=-1)  # [B, T, H] each
        inputs.update(lr=self.lr_scale * lr, momentum=mom, decay=dec, params=dict(self.params))
        return q, k, v, inputs


class Temperature(nn.Module):
    """A learned per-head inverse temperature on unit-norm queries (QKNorm, Henry et al. 2020).
    With unit-norm q, k the Gaussian kernel exp(-||k - c q||^2 / b) is proportional to
    exp(2 c q.k / b), so scaling q by c learns the bandwidth of Eq. 51 (b / c)."""

    def __init__(self, n_heads: int, *, init: float):
        super().__init__()
        self.log_scale = nn.Parameter(torch.full((n_heads,), math.log(init)))

    def forward(self, x, q, k, v, inputs):
        return q * self.log_scale.exp().to(q.dtype)[:, None], k, v, inputs

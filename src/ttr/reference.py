"""The oracle: what a `Recipe` computes, solved literally in float64. Slow on purpose.

This module is the specification of the library. For every batch b, head h and time t it
writes down the weighted regression problem of Eq. 8 over the prefix {(k_i, v_i)}_{i<=t},

    m_t = argmin_{m in M} 1/2 sum_{i<=t} gamma_i^(t) ||v_i - m(k_i)||^2,    y_t = m_t(q_t),

and minimizes it the way the recipe's optimizer says, with generic linear algebra (lstsq,
pinv, solve) or with autograd gradients of the loss itself, never with the recurrences the fast
ops in `ttr.ops` are built on. The test suite holds every op to this module, never the other
way round. What each recipe means here:

weights      uniform gamma = 1 (Eq. 10); geometric gamma_i^(t) = exp(sum_{j=i+1}^t g_j) (Eq. 14),
             per-dimension: keys re-weighted elementwise, k_i^(t) = exp(sum_{j=i+1}^t g_j) * k_i
             (only with gd; one step is gated linear attention); local
             gamma_i^(t) = exp(-||k_i - q_t||^2 / bandwidth) (Eq. 48).
             For exact, `beta` multiplies gamma_i^(t) as a per-token sample weight.
exact        min 1/2 sum gamma ||v - M k||^2 + lambda/2 ||M||_F^2: lstsq on sqrt-weighted rows
             with rows sqrt(lambda) I appended; lambda = 0: min-norm solution by pinv (Eq. 11,
             15), over- and underdetermined alike.
gd           M = 0, then `steps` times M <- M - lr * grad, grad by autograd (Eq. 20-24).
sgd          sequential: M' = exp(g_t) M_{t-1} (g = 0 without geometric weights), then `steps`
             steps on L_t(M) = 1/2 ||v_t - M k_t||^2 + wd/2 ||M||^2 from M' (Eq. 26-29, 35-37):
             u <- mu u - step grad, M <- M + u, with u carried across tokens and not decayed
             (mu = 0: plain SGD). step = beta_t (constant), delta_t / (1 + delta_t ||k_t||^2)
             (Longhorn, Eq. 31) or 1 / ||k_t||^2 (NLMS, Eq. 33). Without weight decay and
             momentum, Longhorn steps solve the proximal problem Eq. 30 and NLMS steps the
             constrained problem Eq. 32 literally; with either, they are SGD/momentum steps with
             the rule's step size (for Longhorn + weight decay this is what `recipe.sgd_gates`
             computes).
features     phi (ttr.ops.features) applied to q and k, then as linear (Eq. 3).
kernel       exact: y = V^T S (S k(K,K) S + lambda I)^+ S k(K,q), S = diag(sqrt(beta)) (Eq. 43,
             weighted as the feature-space problem it is); gd (one step): lr V^T k(K,q) (Eq. 45-47).
local        degree-p polynomial in d_i = k_i - q_t fitted by weighted least squares (pinv, so
polynomial   rank-deficient prefixes get the min-norm fit); y_t = the intercept M^[0] (Eq. 48-54);
             ridge on the non-intercept coefficients of the normalized-weight problem.

Inputs are q, k: [B, T, H, Dk], v: [B, T, H, Dv] in any float dtype; g: [B, T, H] (per-dimension
decay: [B, T, H, Dk]); beta: [B, T, H]. Internally everything is float64 in [B, H, T, D], so
that (b, h) are leading batch dimensions of torch.linalg. The solvers that iterate (gd, sgd) loop
over t; the closed-form ones (exact, kernel, local) pose the T prefix problems as one batch in
which pairs outside prefix t have weight 0 (see "weights" below).
"""

from __future__ import annotations

import itertools
import math

import torch

F64 = torch.float64


def solve(recipe, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, g=None, beta=None):
    """y_t = m_t(q_t) with m_t the recipe's solution of Eq. 8 on the prefix; [B, T, H, Dv] f64."""
    # gd and sgd take autograd gradients, which must work even inside the caller's no_grad or
    # inference_mode; _check copies the inputs into ordinary float64 tensors.
    with torch.inference_mode(False), torch.enable_grad():
        q, k, v, g, beta = _check(recipe, q, k, v, g, beta)  # f64 [B, H, T, D], [B, H, T(, Dk)]
        return _solve(recipe, q, k, v, g, beta).detach().transpose(1, 2).contiguous()


def _solve(recipe, q, k, v, g, beta):
    from ttr.recipe import feature_map

    w, f, o = recipe.weights, recipe.function_class, recipe.optimizer
    if f.kind == "local_polynomial":
        bw = w.bandwidth if w.bandwidth is not None else 2.0 * math.sqrt(q.shape[-1])
        y = _local_polynomial(q, k, v, f.degree, bw, o.ridge)
    elif f.kind == "kernel":
        y = _kernel(q, k, v, beta, f, o)
    else:
        q, k = feature_map(recipe, q), feature_map(recipe, k)
        if o.kind == "exact":
            y = _exact(q, k, v, g, beta, o.ridge)
        elif o.kind == "gd":
            y = _gd(q, k, v, g, o.steps, o.lr, per_dim=w.granularity == "dim")
        else:
            y = _sgd(q, k, v, g, beta, o)
    return y  # [B, H, T, Dv]


# -- weights ---------------------------------------------------------------------------------
#
# The solvers without autograd pose all T prefix problems at once, as a batch indexed by t:
# problem t holds every pair i with weight gamma_i^(t) for i <= t and weight 0 for i > t. A row
# of weight 0 does not change a least-squares problem (nor its min-norm solution), so batch
# entry t is exactly the prefix problem of Eq. 8; batching saves a LAPACK call per token.


def _prefix(T: int) -> torch.Tensor:
    """[t, i] = 1 if pair i is in prefix t (i <= t), else 0: [T, T]."""
    return torch.ones(T, T, dtype=F64).tril()


def _log_gamma(g):
    """[b, h, t, i] = log gamma_i^(t) = sum_{j=i+1}^t g_j (Eq. 14) for i <= t, 0 for i > t:
    [B, H, T, T], or [B, H, T, T, Dk] for per-dimension g [B, H, T, Dk]."""
    j = torch.arange(g.shape[2])
    inside = (j[None, :, None] < j[None, None, :]) & (j[None, None, :] <= j[:, None, None])
    return torch.einsum("tij,bhj...->bhti...", inside.to(F64), g)  # [t, i, j]: i < j <= t


def _sample_weights(g, beta, like: torch.Tensor):
    """[b, h, t, i] = gamma_i^(t) beta_i for i <= t, 0 for i > t: [B, H, T, T]."""
    B, H, T, _ = like.shape
    w = _prefix(T).expand(B, H, T, T)
    if g is not None:
        w = w * _log_gamma(g).exp()
    return w if beta is None else w * beta[:, :, None, :]


# -- parametric memories: linear and features ------------------------------------------------


def _exact(q, k, v, g, beta, ridge: float):
    """Weighted (ridge) least squares per prefix (Eq. 11, 15), solved for M_t^T [Dk, Dv]."""
    B, H, T, Dk = k.shape
    sw = _sample_weights(g, beta, k).sqrt().unsqueeze(-1)  # [B, H, T(t), T(i), 1]
    A, rhs = sw * k[:, :, None], sw * v[:, :, None]  # [B, H, T, T, Dk], [B, H, T, T, Dv]
    if ridge > 0:
        eye = math.sqrt(ridge) * torch.eye(Dk, dtype=F64).expand(B, H, T, Dk, Dk)
        A = torch.cat([A, eye], dim=3)
        rhs = torch.cat([rhs, rhs.new_zeros(B, H, T, Dk, rhs.shape[-1])], dim=3)
        Mt = torch.linalg.lstsq(A, rhs).solution  # [B, H, T, Dk, Dv]
    else:
        Mt = torch.linalg.pinv(A) @ rhs  # min-norm solution, any rank (Eq. 11)
    return torch.einsum("bhtkv,bhtk->bhtv", Mt, q)


def _gd(q, k, v, g, steps: int, lr: float, per_dim: bool):
    """`steps` full-batch GD steps from M = 0 on the prefix loss, gradients by autograd (Eq. 20)."""
    B, H, T, Dk = k.shape
    weights = torch.ones(B, H, T, T, dtype=F64) if g is None else _log_gamma(g).exp()
    ys = []
    for t in range(1, T + 1):
        K, V = k[:, :, :t], v[:, :, :t]  # [B, H, t, Dk], [B, H, t, Dv]
        w = weights[:, :, t - 1, :t]  # gamma_i^(t): [B, H, t], per-dimension [B, H, t, Dk]
        if per_dim:
            # Per-dimension decay re-weights each key coordinate, not each sample.
            K, w = w * K, torch.ones_like(K[..., 0])
        M = k.new_zeros(B, H, v.shape[-1], Dk)  # [B, H, Dv, Dk]
        for _ in range(steps):
            M = M.detach().requires_grad_(True)
            resid = V - K @ M.transpose(-1, -2)  # [B, H, t, Dv]
            loss = 0.5 * (w * resid.pow(2).sum(-1)).sum()
            (grad,) = torch.autograd.grad(loss, M)
            M = M.detach() - lr * grad
        ys.append(torch.einsum("bhvk,bhk->bhv", M, q[:, :, t - 1]))
    return torch.stack(ys, dim=2)


def _sgd(q, k, v, g, beta, o):
    """Online SGD on the newest pair, warm-started from the decayed M_{t-1} (Eq. 26-41)."""
    B, H, T, Dk = k.shape
    M = k.new_zeros(B, H, v.shape[-1], Dk)  # [B, H, Dv, Dk]
    u = torch.zeros_like(M)  # momentum buffer, carried across tokens
    literal = o.weight_decay == 0 and o.momentum == 0 and o.step_size != "constant"
    if literal and o.step_size == "nlms":
        k_pinv = torch.linalg.pinv(k.unsqueeze(-1))  # k_t^+ for every t, [B, H, T, 1, Dk]
    ys = []
    for t in range(T):
        kt, vt = k[:, :, t], v[:, :, t]  # [B, H, Dk], [B, H, Dv]
        if g is not None:
            M = g[:, :, t].exp()[..., None, None] * M
        for _ in range(o.steps):
            if literal and o.step_size == "longhorn":
                M = _longhorn_prox(M, kt, vt, beta[:, :, t])
            elif literal:
                M = _nlms_projection(M, kt, vt, k_pinv[:, :, t])
            else:
                ksq = (kt * kt).sum(-1)  # [B, H]
                if o.step_size == "constant":
                    step = beta[:, :, t]
                elif o.step_size == "longhorn":
                    step = beta[:, :, t] / (1 + beta[:, :, t] * ksq)
                else:
                    step = 1.0 / ksq
                M = M.detach().requires_grad_(True)
                resid = vt - torch.einsum("bhvk,bhk->bhv", M, kt)
                loss = 0.5 * resid.pow(2).sum() + 0.5 * o.weight_decay * M.pow(2).sum()
                (grad,) = torch.autograd.grad(loss, M)
                u = o.momentum * u - step[..., None, None] * grad
                M = M.detach() + u
        ys.append(torch.einsum("bhvk,bhk->bhv", M, q[:, :, t]))
    return torch.stack(ys, dim=2)


def _longhorn_prox(M0, kt, vt, delta):
    """Eq. 30: argmin_M 1/2||M - M0||_F^2 + delta/2 ||v - M k||^2, by its normal equations
    (I + delta k k^T) M^T = M0^T + delta k v^T."""
    Dk = kt.shape[-1]
    d = delta[..., None, None]  # [B, H, 1, 1]
    A = torch.eye(Dk, dtype=F64) + d * kt.unsqueeze(-1) * kt.unsqueeze(-2)  # [B, H, Dk, Dk]
    rhs = M0.transpose(-1, -2) + d * kt.unsqueeze(-1) * vt.unsqueeze(-2)  # [B, H, Dk, Dv]
    return torch.linalg.solve(A, rhs).transpose(-1, -2)


def _nlms_projection(M0, kt, vt, kt_pinv):
    """Eq. 32: the smallest change (Frobenius) to M0 with M k = v: Delta = r k^+, r = v - M0 k,
    with k^+ [B, H, 1, Dk] the pseudoinverse of the constraint's matrix k [B, H, Dk, 1]."""
    r = vt - torch.einsum("bhvk,bhk->bhv", M0, kt)  # [B, H, Dv]
    return M0 + r.unsqueeze(-1) @ kt_pinv


# -- nonparametric memories ------------------------------------------------------------------


def _kernel_matrix(name: str, degree, X, Y):
    """k(X, Y) for rows of X [.., n, D] and Y [.., m, D] -> [.., n, m] (FunctionClass)."""
    D = X.shape[-1]
    if name == "exp":
        return torch.exp(X @ Y.transpose(-1, -2) / math.sqrt(D))
    if name == "rbf":
        sq = (X.unsqueeze(-2) - Y.unsqueeze(-3)).pow(2).sum(-1)
        return torch.exp(-sq / (2 * D))
    return (1 + X @ Y.transpose(-1, -2) / math.sqrt(D)) ** degree


def _kernel(q, k, v, beta, f, o):
    """Kernel regression (Eq. 43) or one GD step from zero in feature space (Eq. 45-47)."""
    B, H, T, Dk = k.shape
    kq = _kernel_matrix(f.kernel, f.degree, q, k)  # [b, h, t, i] = k(k_i, q_t), [B, H, T, T]
    if o.kind == "gd":
        return o.lr * (_prefix(T) * kq) @ v
    # Problem t (see "weights" above): S_t = diag(sqrt(beta_i)) over its prefix, 0 outside, so
    # its Gram matrix is blockdiag(S k(K_t, K_t) S + lambda I, lambda I), whose (pseudo)inverse
    # is blockwise: the padding adds nothing to y.
    s = _sample_weights(None, beta, k).sqrt()  # [B, H, T(t), T(i)]
    gram = _kernel_matrix(f.kernel, f.degree, k, k)[:, :, None]  # [B, H, 1, T, T]
    G = s.unsqueeze(-1) * gram * s.unsqueeze(-2) + o.ridge * torch.eye(T, dtype=F64)
    alpha = torch.linalg.pinv(G, hermitian=True) @ (s * kq).unsqueeze(-1)  # [B, H, T, T, 1]
    return torch.einsum("bhti,bhiv->bhtv", s * alpha.squeeze(-1), v)


def _monomials(d: torch.Tensor, degree: int) -> torch.Tensor:
    """All monomials of d [.., Dk] up to `degree` (Eq. 49): [1, d_a, d_a d_b (a <= b), ...]."""
    cols = [torch.ones_like(d[..., 0])]
    for p in range(1, degree + 1):
        for idx in itertools.combinations_with_replacement(range(d.shape[-1]), p):
            cols.append(math.prod(d[..., i] for i in idx))
    return torch.stack(cols, dim=-1)


def _local_polynomial(q, k, v, degree: int, bandwidth: float, ridge: float = 0.0):
    """Local polynomial regression around each query; the intercept is the output (Eq. 48-54).
    ridge acts on the non-intercept coefficients of the normalized-weight problem
    (weights w_i / sum_j w_j), i.e. ridge * sum_j w_j on the raw weights."""
    T = k.shape[2]
    d = k[:, :, None] - q[:, :, :, None]  # [b, h, t, i] = d_i = k_i - q_t, [B, H, T, T, Dk]
    logw = -d.pow(2).sum(-1) / bandwidth  # log s(k_i, q_t), [B, H, T, T]
    logw = logw.masked_fill(_prefix(T) == 0, -math.inf)  # only the prefix i <= t
    # A common factor on all weights of problem t leaves its argmin unchanged, avoids underflow;
    # normalizing them to sum 1 makes the ridge act on the normalized problem.
    w = (logw - logw.amax(-1, keepdim=True)).exp()
    sw = (w / w.sum(-1, keepdim=True)).sqrt().unsqueeze(-1)  # [B, H, T, T, 1]
    X = sw * _monomials(d, degree)  # [B, H, T, T, P]
    Y = sw * v[:, :, None]  # [B, H, T, T, Dv]
    if ridge > 0:  # rows sqrt(ridge) e_j, j >= 1, with target 0
        P = X.shape[-1]
        pen = math.sqrt(ridge) * torch.eye(P, dtype=F64)[1:]  # [P-1, P]
        X = torch.cat([X, pen.expand(*X.shape[:3], P - 1, P)], dim=-2)
        Y = torch.cat([Y, Y.new_zeros(*Y.shape[:3], P - 1, Y.shape[-1])], dim=-2)
    theta = torch.linalg.pinv(X) @ Y  # [B, H, T, P, Dv]
    return theta[..., 0, :]


# -- input checks ----------------------------------------------------------------------------


def _check(recipe, q, k, v, g, beta):
    from ttr.ops.common import check_like, check_log_decay, check_qkv, check_tensor
    from ttr.recipe import Recipe

    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe: expected a ttr.Recipe, got {type(recipe).__name__}")
    B, T, H, Dk, Dv = check_qkv(q, k, v)
    w, f, o = recipe.weights, recipe.function_class, recipe.optimizer
    if f.kind == "mlp":
        raise ValueError("recipe: an MLP memory has no closed-form oracle; its spec is the "
                         "recurrent form of ttr.ops.ttt / ttr.ops.titans")
    need = recipe.needs()
    if need["g"] and g is None:
        raise ValueError("g: geometric weights need a log-decay g, got None")
    if not need["g"] and g is not None:
        raise ValueError(f"g: only geometric weights use a log-decay, got weights={w.kind!r} "
                         "and a g tensor")
    if g is not None:
        per_dim = w.granularity == "dim"
        check_log_decay(g, q, per_dim_ok=per_dim)
        if per_dim and g.ndim != 4:
            raise ValueError(f"g: granularity='dim' needs a per-dimension log-decay "
                             f"[B, T, H, Dk] = {[B, T, H, Dk]}, got {tuple(g.shape)}")
    # beta is a step size / Longhorn's delta for sgd, an optional sample weight for exact.
    beta_ok = need["beta"] or (o.kind == "exact" and f.kind != "local_polynomial")
    if need["beta"] and beta is None:
        raise ValueError(f"beta: the {o.step_size!r} step-size rule needs beta [B, T, H], got None")
    if not beta_ok and beta is not None:
        raise ValueError(f"beta: not used by optimizer={o.kind!r} with function_class="
                         f"{f.kind!r}" + (f", step_size={o.step_size!r}" if o.kind == "sgd"
                                          else "") + "; expected None, got a tensor")
    if beta is not None:
        check_tensor("beta", beta)
        check_like("beta", beta, q, (B, T, H), "[B, T, H]")
        if bool((beta < 0).any()):
            raise ValueError(f"beta: expected values >= 0, got min {beta.min().item():.4g}")

    def to(x):
        return None if x is None else x.detach().to(F64).transpose(1, 2).clone()

    return to(q), to(k), to(v), to(g), to(beta)

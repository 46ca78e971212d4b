"""The paper's identities, checked on `ttr.reference.solve` (the oracle) against formulas
written out independently here. Each test cites the equation it checks."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ttr.recipe import FunctionClass, Optimizer, Recipe, Weights
from ttr.reference import solve
from ttr.testing import assert_close

F64 = torch.float64
TOL = 1e-8  # relative RMSE, float64


def rand(*shape, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=gen, dtype=F64)


def qkv(B=1, T=9, H=2, D=4, Dv=3, seed=0):
    s = 1 / math.sqrt(D)  # ||k|| ~ 1 keeps SGD steps with beta in (0, 1) stable
    return rand(B, T, H, D, seed=seed, scale=s), rand(B, T, H, D, seed=seed + 1, scale=s), \
        rand(B, T, H, Dv, seed=seed + 2)


def log_decay(B, T, H, *rest, seed=7):
    gen = torch.Generator().manual_seed(seed)
    return -(0.05 + 0.9 * torch.rand(B, T, H, *rest, generator=gen, dtype=F64))


def unif(B, T, H, low, high, seed=9):
    gen = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(B, T, H, generator=gen, dtype=F64)


def R(weights, fclass, opt) -> Recipe:
    return Recipe(weights, fclass, opt)


LIN = FunctionClass.linear()


def per_prefix(fn, q, k, v, ts=None):
    """y[b, t-1, h] = fn(K_t [t, Dk], V_t [t, Dv], q_t [Dk], t, b, h) for every b, h, t in ts."""
    B, T, H, _ = q.shape
    y = torch.zeros(B, T, H, v.shape[-1], dtype=F64)
    for b in range(B):
        for h in range(H):
            for t in ts if ts is not None else range(1, T + 1):
                y[b, t - 1, h] = fn(k[b, :t, h], v[b, :t, h], q[b, t - 1, h], t, b, h)
    return y


def gamma(g, t, b, h):
    """diag(gamma_i^(t)) with gamma_i^(t) = prod_{j=i+1}^t exp(g_j) (Eq. 14), [t, t]."""
    return torch.diag(torch.stack([g[b, i + 1 : t, h].sum() for i in range(t)]).exp())


def causal(scores):  # [B, H, T, T] -> lower-triangular part
    T = scores.shape[-1]
    return scores * torch.ones(T, T, dtype=F64).tril()


# -- exact solutions (Vignettes 1-2) ---------------------------------------------------------


def test_eq11_min_norm_over_and_underdetermined():
    """Eq. 11: V^T K (K^T K)^{-1} for t >= Dk, V^T (K K^T)^{-1} K for t < Dk."""
    q, k, v = qkv(B=2, T=11, H=2, D=5)

    def eq11(K, V, qt, t, *_):
        if t >= K.shape[1]:
            return torch.linalg.solve(K.T @ K, K.T @ V).T @ qt
        return (K.T @ torch.linalg.solve(K @ K.T, V)).T @ qt

    y = solve(R(Weights.uniform(), LIN, Optimizer.exact()), q, k, v)
    assert_close(y, per_prefix(eq11, q, k, v), tol=TOL, what="Eq. 11")


def test_eq15_weighted_exact_and_weights_irrelevant_when_underdetermined():
    """Eq. 15: V^T G K (K^T G K)^{-1} for t >= Dk; for t < Dk the weights drop out."""
    B, T, H, D = 1, 10, 2, 5
    q, k, v = qkv(B, T, H, D)
    g = log_decay(B, T, H)
    y_w = solve(R(Weights.geometric(), LIN, Optimizer.exact()), q, k, v, g=g)
    y_u = solve(R(Weights.uniform(), LIN, Optimizer.exact()), q, k, v)
    assert_close(y_w[:, : D - 1], y_u[:, : D - 1], tol=TOL, what="Eq. 15 underdetermined")

    def eq15(K, V, qt, t, b, h):
        G = gamma(g, t, b, h)
        return torch.linalg.solve(K.T @ G @ K, K.T @ G @ V).T @ qt

    want = per_prefix(eq15, q, k, v, ts=range(D, T + 1))
    assert_close(y_w[:, D - 1 :], want[:, D - 1 :], tol=TOL, what="Eq. 15 overdetermined")


def test_ridge_closed_form_with_sample_weights():
    """Ridge of Eq. 15: M = V^T W K (K^T W K + lambda I)^{-1}, W = diag(gamma * beta)."""
    B, T, H, D, lam = 1, 7, 2, 4, 0.3
    q, k, v = qkv(B, T, H, D)
    g, beta = log_decay(B, T, H), unif(B, T, H, 0.2, 2.0)
    y = solve(R(Weights.geometric(), LIN, Optimizer.exact(ridge=lam)), q, k, v, g=g, beta=beta)

    def ridge(K, V, qt, t, b, h):
        W = gamma(g, t, b, h) * beta[b, :t, h]
        return torch.linalg.solve(K.T @ W @ K + lam * torch.eye(D, dtype=F64), K.T @ W @ V).T @ qt

    assert_close(y, per_prefix(ridge, q, k, v), tol=TOL, what="weighted ridge")


def test_ridge_to_zero_is_min_norm():
    """lambda -> 0 of the ridge solution is the min-norm solution of Eq. 11 (both regimes)."""
    q, k, v = qkv(B=1, T=8, H=2, D=5)
    y0 = solve(R(Weights.uniform(), LIN, Optimizer.exact()), q, k, v)
    errs = []
    for lam in (1e-6, 1e-9, 1e-12):
        y = solve(R(Weights.uniform(), LIN, Optimizer.exact(ridge=lam)), q, k, v)
        errs.append(torch.linalg.vector_norm(y - y0).item() / torch.linalg.vector_norm(y0).item())
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] <= TOL, errs


@settings(max_examples=25, deadline=None)
@given(D=st.integers(1, 5), extra=st.integers(0, 6), Dv=st.integers(1, 4),
       seed=st.integers(0, 10_000), scale=st.floats(0.1, 10.0))
def test_eq13_norm_bound(D, extra, Dv, seed, scale):
    """Eq. 13 / Appendix A (Eq. 59-67): ||y_t|| <= ||q_t|| sum ||v_i|| ||k_i|| / lmin(K^T K)."""
    T = D + extra
    q, k, v = qkv(B=1, T=T, H=1, D=D, Dv=Dv, seed=seed)
    k = k * scale
    y = solve(R(Weights.uniform(), LIN, Optimizer.exact()), q, k, v)
    for t in range(D, T + 1):
        K, V = k[0, :t, 0], v[0, :t, 0]
        lmin = torch.linalg.eigvalsh(K.T @ K)[0]
        bound = q[0, t - 1, 0].norm() * (V.norm(dim=-1) * K.norm(dim=-1)).sum() / lmin
        assert y[0, t - 1, 0].norm() <= bound * (1 + 1e-9)


def test_eq25_hessian_preconditioned_step_is_exact():
    """Eq. 25: M0 - grad(M0) H^{-1} from M0 = 0, H = K^T G K, equals the exact solution."""
    B, T, H, D = 1, 9, 2, 4
    q, k, v = qkv(B, T, H, D)
    g = log_decay(B, T, H)
    y = solve(R(Weights.geometric(), LIN, Optimizer.exact()), q, k, v, g=g)

    def newton(K, V, qt, t, b, h):
        G = gamma(g, t, b, h)
        M0 = torch.zeros(V.shape[1], D, dtype=F64)
        grad = (M0 @ K.T - V.T) @ G @ K  # Eq. 19, weighted
        Hess = K.T @ G @ K
        return (M0 - torch.linalg.solve(Hess, grad.T).T) @ qt

    want = per_prefix(newton, q, k, v, ts=range(D, T + 1))
    assert_close(y[:, D - 1 :], want[:, D - 1 :], tol=TOL, what="Eq. 25")


def test_eq3_features_are_linear_regression_on_phi():
    """Eq. 3: the features class is the linear class on phi(k), phi(q)."""
    from ttr.ops.features import FEATURE_MAPS

    q, k, v = qkv(T=7)
    phi = FEATURE_MAPS["elu1"]
    opt = Optimizer.exact(ridge=0.1)
    y = solve(R(Weights.uniform(), FunctionClass.features("elu1"), opt), q, k, v)
    assert_close(y, solve(R(Weights.uniform(), LIN, opt), phi(q), phi(k), v), tol=TOL)


# -- gradient descent (Vignette 3) -----------------------------------------------------------


def test_eq24_one_gd_step_is_linear_attention():
    """Eq. 24: one GD step from 0 with lr 1 gives y_t = sum_{i<=t} v_i k_i^T q_t."""
    q, k, v = qkv(B=2, T=8, H=3)
    y = solve(R(Weights.uniform(), LIN, Optimizer.gd()), q, k, v)
    scores = causal(torch.einsum("bthd,bshd->bhts", q, k))
    assert_close(y, torch.einsum("bhts,bshv->bthv", scores, v), tol=TOL, what="Eq. 24")
    y_half = solve(R(Weights.uniform(), LIN, Optimizer.gd(lr=0.5)), q, k, v)
    assert_close(y_half, 0.5 * y, tol=TOL, what="Eq. 24, lr 0.5")


def test_eq16_one_gd_step_with_decay_is_gated_linear_attention():
    """Eq. 16 (scalar decay) and its per-dimension (GLA) form, as recurrences:
    S_t = diag(exp g_t) S_{t-1} + k_t v_t^T, y_t = S_t^T q_t."""
    B, T, H, D = 1, 8, 2, 4
    q, k, v = qkv(B, T, H, D)
    for weights, g in ((Weights.geometric(), log_decay(B, T, H)),
                       (Weights.geometric("dim"), log_decay(B, T, H, D))):
        y = solve(R(weights, LIN, Optimizer.gd()), q, k, v, g=g)
        decay = g.exp() if g.ndim == 4 else g.exp().unsqueeze(-1).expand(B, T, H, D)
        S = torch.zeros(B, H, D, v.shape[-1], dtype=F64)
        want = []
        for t in range(T):
            S = decay[:, t].unsqueeze(-1) * S + k[:, t].unsqueeze(-1) * v[:, t].unsqueeze(-2)
            want.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t]))
        assert_close(y, torch.stack(want, 1), tol=TOL, what=f"Eq. 16 {weights.granularity}")


def test_eq23_several_gd_steps():
    """Eq. 23: M^(i) = M^(i-1) (I - lr K^T K) + lr V^T K, three steps from 0."""
    q, k, v = qkv(T=6)
    y = solve(R(Weights.uniform(), LIN, Optimizer.gd(steps=3, lr=0.4)), q, k, v)

    def eq23(K, V, qt, t, *_):
        M = torch.zeros(V.shape[1], K.shape[1], dtype=F64)
        for _ in range(3):
            M = M @ (torch.eye(K.shape[1], dtype=F64) - 0.4 * K.T @ K) + 0.4 * V.T @ K
        return M @ qt

    assert_close(y, per_prefix(eq23, q, k, v), tol=TOL, what="Eq. 23")


# -- online SGD (Vignette 3) -----------------------------------------------------------------


def delta_recurrence(q, k, v, step, alpha=None, steps=1):
    """M_t = alpha_t M_{t-1}, then `steps` times M <- M (I - b k k^T) + b v k^T (Eq. 29/41)."""
    B, T, H, D = k.shape
    M = torch.zeros(B, H, v.shape[-1], D, dtype=F64)
    ys = []
    for t in range(T):
        kt, vt, b = k[:, t], v[:, t], step[:, t, :, None, None]
        if alpha is not None:
            M = alpha[:, t, :, None, None] * M
        for _ in range(steps):
            kkT = kt.unsqueeze(-1) * kt.unsqueeze(-2)
            M = M @ (torch.eye(D, dtype=F64) - b * kkT) + b * vt.unsqueeze(-1) * kt.unsqueeze(-2)
        ys.append(torch.einsum("bhvk,bhk->bhv", M, q[:, t]))
    return torch.stack(ys, 1)


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("geometric", [False, True])
def test_eq29_sgd_is_delta_rule(geometric, steps):
    """Eq. 29: one SGD step per token from M_{t-1} is DeltaNet (decayed first with g)."""
    B, T, H = 2, 9, 2
    q, k, v = qkv(B, T, H)
    beta, g = unif(B, T, H, 0.1, 0.9), log_decay(B, T, H)
    w = Weights.geometric() if geometric else Weights.uniform()
    y = solve(R(w, LIN, Optimizer.sgd(steps=steps)), q, k, v, beta=beta,
              g=g if geometric else None)
    want = delta_recurrence(q, k, v, beta, g.exp() if geometric else None, steps=steps)
    assert_close(y, want, tol=TOL, what="Eq. 29")


@pytest.mark.parametrize("geometric", [False, True])
def test_eq31_longhorn_is_sgd_with_adaptive_step(geometric):
    """Eq. 30-31: the proximal step equals SGD with beta = delta / (1 + delta ||k||^2)."""
    B, T, H = 1, 9, 2
    q, k, v = qkv(B, T, H)
    delta, g = unif(B, T, H, 0.05, 2.0), (log_decay(B, T, H) if geometric else None)
    w = Weights.geometric() if geometric else Weights.uniform()
    y = solve(R(w, LIN, Optimizer.sgd("longhorn")), q, k, v, beta=delta, g=g)
    step = delta / (1 + delta * (k * k).sum(-1))
    assert_close(y, solve(R(w, LIN, Optimizer.sgd()), q, k, v, beta=step, g=g), tol=TOL)


def test_eq33_nlms_is_sgd_with_inverse_norm_step_and_longhorn_limit():
    """Eq. 32-33: NLMS = SGD with beta = 1/||k||^2 = Longhorn as delta -> infinity."""
    B, T, H = 1, 9, 2
    q, k, v = qkv(B, T, H)
    y = solve(R(Weights.uniform(), LIN, Optimizer.sgd("nlms")), q, k, v)
    step = 1 / (k * k).sum(-1)
    assert_close(y, solve(R(Weights.uniform(), LIN, Optimizer.sgd()), q, k, v, beta=step),
                 tol=TOL, what="Eq. 33")
    big = torch.full((B, T, H), 1e9, dtype=F64)
    y_lh = solve(R(Weights.uniform(), LIN, Optimizer.sgd("longhorn")), q, k, v, beta=big)
    assert_close(y_lh, y, tol=1e-6, what="Eq. 32 as the delta -> inf limit of Eq. 30")


def test_eq37_leaky_lms_is_gated_deltanet():
    """Eq. 37 -> 41: (alpha, eta, v') = (1 - beta lam, beta / (1 - beta lam), (1 - beta lam) v)."""
    B, T, H, lam = 1, 9, 2, 0.3
    q, k, v = qkv(B, T, H)
    beta = unif(B, T, H, 0.1, 0.9)
    y = solve(R(Weights.uniform(), LIN, Optimizer.sgd(weight_decay=lam)), q, k, v, beta=beta)
    alpha = 1 - beta * lam
    eta, v_prime = beta / alpha, alpha.unsqueeze(-1) * v
    assert_close(y, delta_recurrence(q, k, v_prime, eta, alpha), tol=TOL, what="Eq. 37 -> 41")


def test_eq41_gated_deltanet_is_leaky_lms():
    """Eq. 41 -> 37: (lam, beta, v) = ((1 - alpha) / (alpha eta), alpha eta, v' / alpha)."""
    B, T, H, lam = 1, 9, 2, 0.3
    q, k, v_prime = qkv(B, T, H)
    eta = unif(B, T, H, 0.1, 0.9)
    alpha = 1 / (1 + lam * eta)  # gates of a Gated DeltaNet whose lambda is the constant `lam`
    want = delta_recurrence(q, k, v_prime, eta, alpha)
    lam_t, beta, v = (1 - alpha) / (alpha * eta), alpha * eta, v_prime / alpha.unsqueeze(-1)
    assert_close(lam_t, torch.full_like(lam_t, lam), tol=TOL)
    y = solve(R(Weights.uniform(), LIN, Optimizer.sgd(weight_decay=lam)), q, k, v, beta=beta)
    assert_close(y, want, tol=TOL, what="Eq. 41 -> 37")


def test_momentum_recurrence():
    """Recipe semantics of momentum: u_t = mu u_{t-1} - beta_t grad L_t(M_{t-1}), M_t = M + u_t."""
    B, T, H, mu, lam = 1, 9, 2, 0.6, 0.2
    q, k, v = qkv(B, T, H)
    beta = unif(B, T, H, 0.1, 0.5)
    y = solve(R(Weights.uniform(), LIN, Optimizer.sgd(momentum=mu, weight_decay=lam)), q, k, v,
              beta=beta)
    M = torch.zeros(B, H, v.shape[-1], k.shape[-1], dtype=F64)
    u, want = torch.zeros_like(M), []
    for t in range(T):
        kt, vt = k[:, t], v[:, t]
        grad = (torch.einsum("bhvk,bhk->bhv", M, kt) - vt).unsqueeze(-1) * kt.unsqueeze(-2)
        u = mu * u - beta[:, t, :, None, None] * (grad + lam * M)
        M = M + u
        want.append(torch.einsum("bhvk,bhk->bhv", M, q[:, t]))
    assert_close(y, torch.stack(want, 1), tol=TOL, what="momentum")


# -- nonparametric (Vignette 4) --------------------------------------------------------------


def test_eq47_kernel_gd_is_unnormalized_softmax():
    """Eq. 45-47: one GD step in the exp kernel's feature space = sum_i v_i exp(k_i.q/sqrt D)."""
    q, k, v = qkv(B=2, T=8, H=2, D=4)
    y = solve(R(Weights.uniform(), FunctionClass.kernel_class("exp"), Optimizer.gd(lr=0.7)),
              q, k, v)
    scores = causal(torch.einsum("bthd,bshd->bhts", q, k).div(2.0).exp())  # sqrt(4) = 2
    assert_close(y, 0.7 * torch.einsum("bhts,bshv->bthv", scores, v), tol=TOL, what="Eq. 47")


def test_eq43_exact_kernel_regression():
    """Eq. 43: y = V^T k(K, K)^{-1} k(K, q) (rbf kernel, Gram invertible)."""
    q, k, v = qkv(B=1, T=6, H=2, D=3)
    y = solve(R(Weights.uniform(), FunctionClass.kernel_class("rbf"), Optimizer.exact()), q, k, v)

    def eq43(K, V, qt, t, *_):
        gram = torch.exp(-torch.cdist(K, K).pow(2) / 6)
        return V.T @ torch.linalg.solve(gram, torch.exp(-(K - qt).pow(2).sum(-1) / 6))

    assert_close(y, per_prefix(eq43, q, k, v), tol=TOL, what="Eq. 43")


@pytest.mark.parametrize("ridge", [0.0, 0.2])
def test_eq42_kernel_trick_matches_explicit_features(ridge):
    """Eq. 42-43: the polynomial kernel of degree 1, (1 + k.k'/sqrt D), is the linear class on
    phi(k) = [1, k / D^(1/4)]; the kernel solution (weighted, ridge or min-norm) equals it."""
    B, T, H, D = 1, 8, 2, 4
    q, k, v = qkv(B, T, H, D)
    beta = unif(B, T, H, 0.3, 2.0)
    fc = FunctionClass.kernel_class("polynomial", degree=1)
    y = solve(R(Weights.uniform(), fc, Optimizer.exact(ridge)), q, k, v, beta=beta)

    def phi(x):
        return torch.cat([torch.ones_like(x[..., :1]), x / D**0.25], dim=-1)

    want = solve(R(Weights.uniform(), LIN, Optimizer.exact(ridge)), phi(q), phi(k), v, beta=beta)
    assert_close(y, want, tol=TOL, what="kernel trick")


def test_eq50_51_local_constant_with_unit_norm_is_softmax_attention():
    """Eq. 50-51: p = 0, bandwidth 2 sqrt(D), ||q|| = ||k|| = 1 -> softmax(q k^T / sqrt D) V."""
    q, k, v = qkv(B=2, T=9, H=2, D=4)
    q, k = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
    y = solve(R(Weights.local(), FunctionClass.local_polynomial(0), Optimizer.exact()), q, k, v)
    T = q.shape[1]
    scores = torch.einsum("bthd,bshd->bhts", q, k) / 2.0
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    want = torch.einsum("bhts,bshv->bthv", scores.softmax(-1), v)
    assert_close(y, want, tol=TOL, what="Eq. 51")


def test_eq52_54_local_linear_is_offset_softmax():
    """Eq. 52-54: the local-linear intercept M^[0] = vbar - M^[1] dbar, M^[1] from Eq. 52."""
    B, T, H, D, bw = 1, 10, 2, 3, 1.5
    q, k, v = qkv(B, T, H, D)
    y = solve(R(Weights.local(bw), FunctionClass.local_polynomial(1), Optimizer.exact()), q, k, v)

    def eq54(K, V, qt, t, *_):
        d = K - qt  # [t, D]
        s = torch.exp(-d.pow(2).sum(-1) / bw)
        X = torch.cat([torch.ones(t, 1, dtype=F64), d], dim=1)  # Eq. 53
        W = torch.diag(s)
        theta = torch.linalg.solve(X.T @ W @ X, X.T @ W @ V)  # Eq. 52, [1 + D, Dv]
        M1 = theta[1:].T  # [Dv, D]
        p = s / s.sum()
        return p @ V - M1 @ (p @ d)

    ts = range(D + 1, T + 1)  # prefixes where X^T W X is invertible
    want = per_prefix(eq54, q, k, v, ts=ts)
    assert_close(y[:, D:], want[:, D:], tol=TOL, what="Eq. 54")


@pytest.mark.parametrize("degree", [1, 2])
def test_eq49_local_polynomial_reproduces_polynomials(degree):
    """Eq. 49: a degree-p local fit is exact when v is a degree-p polynomial of k, y_t = v(q_t)."""
    B, T, H, D = 1, 12, 1, 2
    q, k, _ = qkv(B, T, H, D)
    A, c, Q = rand(3, D, seed=3), rand(3, seed=4), rand(3, D, D, seed=5)

    def f(x):
        out = x @ A.T + c
        return out + (torch.einsum("...a,vab,...b->...v", x, Q, x) if degree == 2 else 0)

    y = solve(R(Weights.local(), FunctionClass.local_polynomial(degree), Optimizer.exact()),
              q, k, f(k))
    n_monomials = math.comb(D + degree, degree)
    assert_close(y[:, n_monomials:], f(q)[:, n_monomials:], tol=TOL, what="Eq. 49")


# -- inputs ----------------------------------------------------------------------------------


def test_low_precision_inputs_are_solved_in_float64():
    q, k, v = qkv(T=5)
    r = R(Weights.uniform(), LIN, Optimizer.exact(ridge=0.1))
    y32 = solve(r, q.float(), k.float(), v.float())
    assert y32.dtype == F64
    assert_close(y32, solve(r, q.float().double(), k.float().double(), v.float().double()),
                 tol=TOL)


@pytest.mark.parametrize("recipe, kwargs, name", [
    (R(Weights.uniform(), LIN, Optimizer.sgd()), {}, "beta"),
    (R(Weights.uniform(), LIN, Optimizer.sgd("nlms")), {"beta": 1}, "beta"),
    (R(Weights.uniform(), LIN, Optimizer.gd()), {"beta": 1}, "beta"),
    (R(Weights.local(), FunctionClass.local_polynomial(0), Optimizer.exact()), {"beta": 1},
     "beta"),
    (R(Weights.geometric(), LIN, Optimizer.gd()), {}, "g"),
    (R(Weights.uniform(), LIN, Optimizer.gd()), {"g": 3}, "g"),
    (R(Weights.geometric(), LIN, Optimizer.gd()), {"g": 4}, "g"),
    (R(Weights.geometric("dim"), LIN, Optimizer.gd()), {"g": 3}, "g"),
    (R(Weights.uniform(), LIN, Optimizer.sgd()), {"beta": -1}, "beta"),
    (R(Weights.uniform(), LIN, Optimizer.sgd()), {"beta": 2}, "beta"),
])
def test_bad_inputs_name_the_argument(recipe, kwargs, name):
    B, T, H, D = 1, 4, 2, 3
    q, k, v = qkv(B, T, H, D)
    make = {3: -torch.ones(B, T, H, dtype=F64), 4: -torch.ones(B, T, H, D, dtype=F64),
            1: torch.ones(B, T, H, dtype=F64), -1: -torch.ones(B, T, H, dtype=F64),
            2: torch.ones(B, T, dtype=F64)}
    kw = {n: make[x] for n, x in kwargs.items()}
    if recipe.needs()["beta"] and "beta" not in kw and name != "beta":
        kw["beta"] = make[1]
    with pytest.raises(ValueError, match=name):
        solve(recipe, q, k, v, **kw)


def test_bad_qkv_and_recipe():
    q, k, v = qkv(T=4)
    r = R(Weights.uniform(), LIN, Optimizer.gd())
    with pytest.raises(ValueError, match="q"):
        solve(r, q[:, :3], k, v)
    with pytest.raises(ValueError, match="v"):
        solve(r, q, k, v[:, :3])
    with pytest.raises(TypeError, match="recipe"):
        solve("linear", q, k, v)


def test_autograd_solvers_work_in_inference_mode():
    q, k, v = qkv(T=4)
    beta = unif(1, 4, 2, 0.1, 0.9)
    for r, kw in ((R(Weights.uniform(), LIN, Optimizer.gd(steps=2)), {}),
                  (R(Weights.uniform(), LIN, Optimizer.sgd()), {"beta": beta})):
        want = solve(r, q, k, v, **kw)
        with torch.inference_mode():
            y = solve(r, q.clone(), k.clone(), v.clone(), **kw)
        assert_close(y, want, tol=TOL)

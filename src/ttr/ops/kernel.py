"""Kernel regression: the exact nonparametric memory (Eq. 42-43) and one GD step of it,
unnormalized kernel attention (Eq. 45-47).

Objective (paper Eq. 42; phi is the feature map of a Mercer kernel k(x, y) = phi(x).phi(y),
beta_i >= 0 per-token sample weights, default 1):

    M_t = argmin_M 1/2 sum_{i<=t} beta_i ||v_i - M phi(k_i)||^2 + ridge/2 ||M||_F^2,
    o_t = M_t phi(q_t).

solver="exact", by the kernel trick (Eq. 43, S = diag(sqrt(beta))):

    o_t = V_t^T S (S k(K_t, K_t) S + ridge I)^{-1} S k(K_t, q_t).

solver="gd": one gradient step of size 1 from M = 0, i.e. the crude k(K_t, K_t) ~ I (Eq. 45-47):

    o_t = sum_{i<=t} beta_i k(k_i, q_t) v_i        (exp kernel: unnormalized softmax attention).

Kernels, as in `ttr.reference` and `FunctionClass.kernel_class`: "exp" exp(k.k'/sqrt(Dk)),
"rbf" exp(-||k - k'||^2 / (2 Dk)), "polynomial" (1 + k.k'/sqrt(Dk))^degree.

Every prefix solve from one Cholesky factor. Let G = S k(K, K) S + ridge I over all L keys
and G = L L^T. L is lower triangular, so the leading t x t block of G is L_t L_t^T with L_t the
leading block of L: L_t is the Cholesky factor of the prefix Gram G_t, for every t at once.
Forward substitution only looks up, (L^{-1} x)_{<=t} = L_t^{-1} x_{<=t}, hence

    o_t = (L_t^{-1} S_t V_t)^T (L_t^{-1} S_t k(K_t, q_t)) = sum_{j<=t} W_j z_tj,
    W = L^{-1} S V  [L, Dv],   z_t = L^{-1} S k(K, q_t)  [L],

one triangular system per query and the causal mask j <= t on z_t (its entries j > t are
finite but belong to keys the query must not see).

Scaling. k(x, y) = a(x) a(y) r(x, y) with a(x) = sqrt(k(x, x)) and |r| <= 1. exp: a(x) =
exp(||x||^2 / (2 sqrt(Dk))), r = exp(-||x - y||^2 / (2 sqrt(Dk))), an RBF kernel (so exact
exp-kernel regression is RBF regression on targets v / a(k) with ridge ridge / a(k)^2, times
a(q)); rbf: a = 1; polynomial: a = (1 + ||x||^2 / sqrt(Dk))^(p/2). With A = diag(a(k_i)),
G = A Ghat A and Ghat = S R S + ridge A^{-2} is factored instead: its entries are <= max(beta)
+ ridge whatever the key norms (the raw exp Gram overflows float32 at ||k|| > 19, Dk = 16).
Right-hand sides: zhat_t = Lh^{-1} S r(K, q_t) a(q_t) exp(-m_t), m_t = log a(q_t) +
max_{i<=t} log r(k_i, q_t) (entries <= sqrt(beta)); What = Lh^{-1} S 2^(E - log2 a(K)) V with E
the running minimum over the keys so far of floor(log2 a(k_i)) (entries <= sqrt(beta) |v|);
o_t = exp(m_t) 2^-E sum_{j<=t} What_j zhat_tj, applied in halves (finite when the product is).
E is an integer that only decreases, so every rescale is by a power of two and exact: like
FlashAttention's running max, and no key changes a bit of an earlier query's output.
Limits (exp only): a key whose ||k||^2 / (2 sqrt(Dk)) exceeds the smallest key's by more
than the exp range (87 float32, 708 float64) underflows out of What; o_t overflows when the
answer does (a query far outside the keys: exp-kernel regression extrapolates exponentially).
The gd solver shifts by m_t = max_{i<=t} log k(k_i, q_t): finite when the answer is and
m_t < 177 (float32) / 1419 (float64), else +-inf (NaN where the shifted sum is 0). Polynomial
kernels are computed as is in both solvers.

Ridge. ridge >= 0 (default 1.0); ridge = 0 needs a positive definite weighted Gram matrix:
exp and rbf with distinct keys and beta > 0 (then o_t interpolates: q_t = k_t gives
o_t = v_t), never a polynomial kernel with more keys than C(Dk + p, p). A factorization that
fails, or a pivot below 100 eps of its diagonal entry (rounding level: e.g. a repeated key),
raises ValueError naming `ridge` and the key (also float32 with a tiny ridge).
ttr.reference computes ridge = 0 with pinv, i.e. the min-norm solution also for singular Grams.

Forms
  recurrent  the spec: at every t a fresh LU solve of the raw prefix system of Eq. 43 (gd: the
             sum of Eq. 46). O(T^4); overflows where the raw kernel does.
  blocked    right-looking block Cholesky of Ghat (step 1) carrying the right-hand sides (2),
             `block_size` keys per block J: 3. Lh_JJ = chol(A_JJ), panel Lh_{>J,J} =
             A_{>J,J} Lh_JJ^{-T}, A_{>J,>J} -= panel panel^T (Schur complement); 4. running
             scale E, block J's values enter; 5. forward substitution of [zhat of the unfinished
             queries | What]: X_J = Lh_JJ^{-1} B_J, B_{>J} -= panel X_J; 6. o_t += zhat_tJ^T
             What_J, causal mask in the diagonal block; a query finishes with its own key's
             block. O(L^3) time (~L^3/3 multiply-adds each for 3 and 5), O(L^2 + L T) memory,
             also for autograd (each step saves its panel and solution only). gd: per block of
             queries, the max-shifted kernel row times the values.
  Measured (torch 2.13 CPU, float32, 1 thread, median ms, shared machine, +-20%): [8, n, n]
  triangular factor, 64 right-hand sides, n = 256 / 1024 / 2048: solve_triangular 0.5 / 5.8 /
  22.6, matmul with the inverted factor 0.5 / 17.5 / 75.9 (fwd+bwd ~5 / 150 / 575 either way);
  [8, 64, 64]: cholesky 0.13, inv 0.25, solve_triangular 0.11. End to end (B*H = 4, T = 2048,
  Dk = Dv = 16, exp, fwd interleaved median of 5): this form 1075 (838 with block_size=256),
  one LAPACK cholesky of Ghat + one solve_triangular 1494; fwd+bwd ~5300 both. Hence
  triangular solves, not inverses, and a block loop that beats LAPACK's factorization; its cost
  is the trailing update's memory traffic (in place without autograd). The "~100x slower small
  batched solves" are thread-pool barriers: with 2 threads on this loaded 2-core machine each
  batched LAPACK call slowed 12-500x (cholesky [8, 64, 64] 0.13 -> 6-15 ms, solve_triangular
  with 64 columns 6 -> 72 ms) and a matmul 2x.

State: the KV cache (K [B, Tc, H, Dk], V [B, Tc, H, Dv]) as in `softmax_attention`, with a
third entry beta [B, Tc, H] when any token has a sample weight (a pair means weights 1). The
queries of a call see the cached keys and their own causal prefix. The Cholesky factor is not
carried: each call refactors the cache, O((Tc + T)^3); carrying Lh would make decoding
O(Tc^2) per token and is left for a `step()`.
"""

from __future__ import annotations

import math

import torch

from ttr.ops.common import (
    NumericalError,
    _is_compiling,
    check_cu_seqlens,
    check_form,
    check_like,
    check_qkv,
    check_state,
    compute_dtype,
    computes_in_float32_under_autocast,
)
from ttr.ops.local import _check_cache, split_caches, varlen_caches

KERNELS = ("exp", "rbf", "polynomial")
SOLVERS = ("exact", "gd")
FORMS = ("recurrent", "blocked")


@computes_in_float32_under_autocast
def kernel_regression(q, k, v, beta=None, *, kernel="exp", degree=None, ridge=None,
                      solver="exact", initial_state=None, output_final_state=False,
                      cu_seqlens=None, form="blocked", block_size=64):
    """Causal kernel (ridge) regression memory, Eq. 43, or one GD step of it, Eq. 45-47.

    q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; beta: None or [B, T, H] sample weights >= 0;
    kernel: "exp" | "rbf" | "polynomial" (with an int degree >= 1); ridge: float >= 0 for
    solver="exact" (default 1.0), None for "gd"; initial_state: KV cache (K [B, Tc, H, Dk],
    V [B, Tc, H, Dv]) or (K, V, beta [B, Tc, H]). With cu_seqlens, initial_state is a cache with
    leading dim N or a list of N caches, and the final state a list of N caches.
    Returns o [B, T, H, Dv] (dtype of q) and the final cache or None.
    """
    B, T, H, Dk, Dv = check_qkv(q, k, v)
    check_like("beta", beta, q, (B, T, H), "[B, T, H]")
    _check_nonnegative("beta", beta)
    kern = _check_kernel(kernel, degree)
    ridge = _check_ridge(ridge, solver)
    check_form(form, FORMS)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size: expected a positive int, got {block_size!r}")
    check_cu_seqlens(cu_seqlens, q)
    args = (kern, ridge, solver, form, block_size)
    if cu_seqlens is None:
        _check_kv_cache("initial_state", initial_state, B, H, Dk, Dv, q)
        return _attend(q, k, v, beta, initial_state, output_final_state, *args)

    caches = split_caches(initial_state, cu_seqlens.numel() - 1, H, Dk, Dv, q,
                          check=_check_kv_cache)
    return varlen_caches(lambda cache, q, k, v, beta: _attend(q, k, v, beta, cache, True, *args),
                         cu_seqlens, {"q": q, "k": k, "v": v, "beta": beta}, caches,
                         output_final_state)


# -- validation ------------------------------------------------------------------------------

def _check_kernel(kernel, degree):
    if kernel not in KERNELS:
        raise ValueError(f"kernel: expected one of {list(KERNELS)}, got {kernel!r}")
    if kernel != "polynomial":
        if degree is not None:
            raise ValueError(f"degree: only the polynomial kernel has a degree, got "
                             f"kernel={kernel!r}, degree={degree!r}")
        return (kernel, None)
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
        raise ValueError(f"degree: the polynomial kernel needs an int degree >= 1, "
                         f"got {degree!r}")
    return (kernel, degree)


def _check_ridge(ridge, solver) -> float | None:
    if solver not in SOLVERS:
        raise ValueError(f"solver: expected one of {list(SOLVERS)}, got {solver!r}")
    if solver == "gd":
        if ridge is not None:
            raise ValueError(f"ridge: one GD step from zero (Eq. 45-47) has no ridge; expected "
                             f"None with solver='gd', got {ridge!r}")
        return None
    if ridge is None:
        return 1.0
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)):
        raise TypeError(f"ridge: expected a float >= 0, got {type(ridge).__name__} {ridge!r}")
    if not 0 <= ridge < math.inf:
        raise ValueError(f"ridge: expected a finite value >= 0, got {ridge!r}")
    return float(ridge)


def _check_nonnegative(name, beta) -> None:
    # Negative sample weights make the weighted Gram indefinite: no longer a regression.
    if beta is not None and not _is_compiling() and bool((beta < 0).any()):
        raise ValueError(f"{name}: expected sample weights >= 0, got min {beta.min().item():.4g}")


def _check_kv_cache(name, s, B, H, Dk, Dv, ref) -> None:
    """None, (K, V) or (K, V, beta): [B, Tc, H, Dk], [B, Tc, H, Dv], [B, Tc, H]."""
    if s is None:
        return
    if not isinstance(s, (tuple, list)) or len(s) not in (2, 3):
        raise TypeError(f"{name}: expected a KV cache (K, V) or (K, V, beta), got "
                        f"{type(s).__name__}" + (f" of length {len(s)}"
                                                  if isinstance(s, (tuple, list)) else ""))
    _check_cache(name, tuple(s[:2]), B, H, Dk, Dv, ref)
    if len(s) == 3:
        Tc = s[0].shape[1]
        check_state(f"{name}[2] (beta)", s[2], (B, Tc, H), "[B, Tc, H]", ref)
        _check_nonnegative(f"{name}[2] (beta)", s[2])


# -- the call: cache, layout, dtype ----------------------------------------------------------

def _attend(q, k, v, beta, cache, output_final_state, kern, ridge, solver, form, block_size):
    K, V, w = k, v, beta
    if cache is not None:
        K, V = torch.cat([cache[0].to(k.dtype), k], 1), torch.cat([cache[1].to(v.dtype), v], 1)
        if beta is not None or len(cache) == 3:
            # a cache pair, or a call without beta, means sample weight 1
            w0 = cache[2] if len(cache) == 3 else cache[0].new_ones(cache[0].shape[:3])
            w1 = beta if beta is not None else k.new_ones(k.shape[:3])
            w = torch.cat([w0.to(w1.dtype), w1], 1)  # [B, Tc + T, H]
    Tc = K.shape[1] - q.shape[1]  # cached steps before this call
    B, H = q.shape[0], q.shape[2]
    dt = compute_dtype(q)
    # [B, T, H, D] -> [B*H, T, D]: (batch, head) is one leading batch dim of every matmul
    qf, Kf, Vf = (x.to(dt).transpose(1, 2).flatten(0, 1) for x in (q, K, V))
    wf = None if w is None else w.to(dt).transpose(1, 2).flatten(0, 1)  # [B*H, L]
    if solver == "gd":
        fn = _gd_recurrent if form == "recurrent" else _gd_blocked
        o = fn(qf, Kf, Vf, wf, Tc, kern, block_size)
    else:
        fn = _exact_recurrent if form == "recurrent" else _exact_blocked
        o = fn(qf, Kf, Vf, wf, Tc, kern, ridge, block_size)  # [B*H, T, Dv]
    o = o.unflatten(0, (B, H)).transpose(1, 2).to(q.dtype)  # [B, T, H, Dv]
    if not output_final_state:
        return o, None
    return o, ((K, V) if w is None else (K, V, w))


# -- kernels ---------------------------------------------------------------------------------

def _kernel(kern, X, Y):
    """The raw k(X, Y) for rows of X [.., n, D], Y [.., m, D] -> [.., n, m] (the spec's)."""
    name, degree = kern
    D = X.shape[-1]
    if name == "exp":
        return torch.exp(X @ Y.mT / math.sqrt(D))
    if name == "rbf":
        return torch.exp(_neg_sqdist(X, Y, X.mean(-2, keepdim=True), 1 / (2 * D)))
    return (1 + X @ Y.mT / math.sqrt(D)) ** degree


def _neg_sqdist(X, Y, c, scale):
    """-scale ||x - y||^2 for rows of X [BH, n, D], Y [BH, m, D] -> [BH, n, m], both centered at
    c (the expansion's cancellation is relative to ||x - c||^2, not ||x||^2), one baddbmm."""
    X, Y = X - c, Y - c
    nn = (X * X).sum(-1)[..., :, None] + (Y * Y).sum(-1)[..., None, :]  # [BH, n, m]
    return torch.baddbmm(nn, X, Y.mT, alpha=-2).mul_(-scale).clamp_max_(0)


def _log_scale(kern, X):
    """log a(x) = log sqrt(k(x, x)) [.., n]."""
    name, degree = kern
    D = X.shape[-1]
    if name == "exp":
        return (X * X).sum(-1) / (2 * math.sqrt(D))
    if name == "rbf":
        return X.new_zeros(X.shape[:-1])
    return 0.5 * degree * torch.log1p((X * X).sum(-1) / math.sqrt(D))


def _log_r(kern, X, Y, c):
    """log r(x, y) = log k(x, y) - log a(x) - log a(y) <= 0 for exp and rbf: [.., n, m]."""
    width = 2 * math.sqrt(X.shape[-1]) if kern[0] == "exp" else 2 * X.shape[-1]
    return _neg_sqdist(X, Y, c, 1 / width)


def _poly_r(degree, X, Y):
    """r(x, y) = (cosine of [1, x / Dk^(1/4)] and [1, y / Dk^(1/4)])^degree, in [-1, 1]."""
    s = math.sqrt(X.shape[-1])
    nx, ny = 1 + (X * X).sum(-1) / s, 1 + (Y * Y).sum(-1) / s  # [.., n], [.., m]
    return ((1 + X @ Y.mT / s) / torch.sqrt(nx[..., :, None] * ny[..., None, :])) ** degree


# -- forms: exact ----------------------------------------------------------------------------

def _exact_recurrent(q, K, V, w, Tc, kern, ridge, block_size):
    """Eq. 43 literally: one fresh solve of the prefix system per query."""
    outs = []
    for t in range(q.shape[1]):
        n = Tc + t + 1  # keys visible to query t
        Kt, Vt, qt = K[:, :n], V[:, :n], q[:, t:t + 1]  # [BH, n, Dk], [BH, n, Dv], [BH, 1, Dk]
        s = None if w is None else w[:, :n].sqrt()  # [BH, n]
        G, c = _kernel(kern, Kt, Kt), _kernel(kern, Kt, qt)  # [BH, n, n], [BH, n, 1]
        if s is not None:
            G, c = s[..., :, None] * G * s[..., None, :], s[..., :, None] * c
        G = G + ridge * torch.eye(n, dtype=G.dtype, device=G.device)
        alpha, info = torch.linalg.solve_ex(G, c)  # [BH, n, 1]
        if not _is_compiling() and bool((info > 0).any()):
            raise NumericalError(f"ridge: the kernel Gram matrix S k(K, K) S + ridge I of the "
                                 f"first {n} keys is singular (ridge={ridge}); use ridge > 0")
        if s is not None:
            alpha = s[..., :, None] * alpha
        outs.append((alpha * Vt).sum(1))  # [BH, Dv]
    return torch.stack(outs, 1)  # [BH, T, Dv]


def _exact_blocked(q, K, V, w, Tc, kern, ridge, bs):
    """Right-looking block Cholesky of Ghat with every query's prefix solve riding along."""
    T, L = q.shape[1], K.shape[1]
    dev = q.device
    s = None if w is None else w.sqrt()  # [BH, L]
    # the centre of the distance expansions is the first key: from the past, bitwise causal
    c = K[:, :1]  # [BH, 1, Dk]
    la = _log_scale(kern, K)  # log a(k_i), [BH, L]
    pos = Tc + torch.arange(T, device=dev)  # key index of each query's own key
    keep = torch.arange(L, device=dev)[:, None] <= pos  # [L, T] causal
    # 1. Ghat = S R S + ridge A^{-2}: entries bounded whatever the key norms
    if kern[0] == "polynomial":
        A = _poly_r(kern[1], K, K)  # [BH, L, L]
    else:
        A = torch.exp(_log_r(kern, K, K, c))
    if s is not None:
        A = s[..., :, None] * A * s[..., None, :]
    A = A + torch.diag_embed(ridge * torch.exp(-2 * la))
    dg = A.detach().diagonal(dim1=-2, dim2=-1).clone()  # [BH, L], for the pivot check
    # 2. right-hand sides of the queries, shifted by m_t per column
    if kern[0] == "polynomial":
        Bq = _poly_r(kern[1], K, q).masked_fill(~keep, 0)  # [BH, L, T]
        m = _log_scale(kern, q)  # [BH, T]
    else:
        lr = _log_r(kern, K, q, c).masked_fill(~keep, -math.inf)  # [BH, L, T]
        mx = lr.amax(1)  # finite: every query sees its own key
        Bq = torch.exp(lr - mx[:, None])
        m = _log_scale(kern, q) + mx
    if s is not None:
        Bq = s[..., None] * Bq
    # Bv holds -sum_{I<J} Lh_JI What_I; block J's own values enter when J is reached, scaled
    # by 2^(E - log2 a(k_i)) with E the running min of floor(log2 a): never above |v|. Every
    # rescale is a power of two, hence exact: no key changes a bit of an earlier output.
    lg = la / math.log(2)  # log2 a(k_i), [BH, L]
    nk = lg.detach().floor()  # integer part; the fraction keeps the gradient
    mant = torch.exp2(nk - lg)  # (1/2, 1]
    Bv = V.new_zeros(V.shape)  # [BH, L, Dv]
    inplace = not (torch.is_grad_enabled() and (A.requires_grad or Bq.requires_grad))
    outs, acc, t0, E = [], None, 0, None  # acc: outputs of the active queries t0..
    for a in range(0, L, bs):
        b = min(a + bs, L)
        n = b - a
        # 3. factor the diagonal block, the panel below it, the Schur complement
        Ljj, info = torch.linalg.cholesky_ex(A[:, :n, :n])  # [BH, n, n]
        _check_factor(info, Ljj, dg[:, a:b], a, ridge)
        panel = torch.linalg.solve_triangular(Ljj.mT, A[:, n:, :n], upper=True, left=False)
        # Without autograd the Schur complements overwrite A and Bq in place (BLAS writes into
        # the strided block): half the memory traffic of the update autograd needs.
        if inplace:
            A = A[:, n:, n:].baddbmm_(panel, panel.mT, alpha=-1)  # [BH, L - b, L - b]
        else:
            A = torch.baddbmm(A[:, n:, n:], panel, panel.mT, alpha=-1)
        # 4. running value scale (an online rescale, as FlashAttention's running max)
        E_new = nk[:, a:b].amin(-1, keepdim=True)  # [BH, 1]
        if E is not None:
            E_new = torch.minimum(E, E_new)
            r = torch.exp2(E_new - E)[..., None]  # a power of two <= 1 (exp2 is exact here)
            Bv, acc = r * Bv, r * acc
        E = E_new
        vJ = (mant[:, a:b] * torch.exp2(E - nk[:, a:b]))[..., None] * V[:, a:b]  # [BH, n, Dv]
        if s is not None:
            vJ = s[:, a:b, None] * vJ
        # 5. forward substitution: block J of zhat for the active queries and of What
        X = torch.linalg.solve_triangular(Ljj, torch.cat([Bq[:, :n], Bv[:, :n] + vJ], -1),
                                          upper=False)  # [BH, n, T - t0 + Dv]
        Z, W = X[..., :T - t0], X[..., T - t0:]  # [BH, n, T - t0], [BH, n, Dv]
        # 6. outputs; rows j > t of the diagonal block belong to keys query t does not see
        Zm = Z.masked_fill(~keep[a:b, t0:], 0)
        acc = Zm.mT @ W if acc is None else acc + Zm.mT @ W  # [BH, T - t0, Dv]
        t1 = max(0, b - Tc)  # queries t < t1 have their own key in this block: finished
        outs.append(_rescale(acc[:, :t1 - t0], m[:, t0:t1], E))
        acc = acc[:, t1 - t0:]
        Z = Z[..., t1 - t0:]
        if inplace:
            Bq = Bq[:, n:, t1 - t0:].baddbmm_(panel, Z, alpha=-1)  # [BH, L - b, T - t1]
        else:
            Bq = torch.baddbmm(Bq[:, n:, t1 - t0:], panel, Z, alpha=-1)
        Bv = torch.baddbmm(Bv[:, n:], panel, W, alpha=-1)  # [BH, L - b, Dv]
        t0 = t1
    return torch.cat(outs, 1)  # [BH, T, Dv]


def _rescale(y, m, E):
    """y exp(m) 2^-E for y [BH, Tq, Dv], m [BH, Tq], E [BH, 1] as (h 2^-E1) y (h 2^-E2), with
    h = exp(m/2) and E1 + E2 = E: finite whenever the product is (up to m = twice the exp
    range), and bit-identical under a change of E (powers of two are exact)."""
    h = torch.exp(0.5 * m)[..., None]
    E1 = torch.floor(0.5 * E)[..., None]
    return (h * torch.exp2(-E1)) * y * (h * torch.exp2(E1 - E[..., None]))


def _check_factor(info, Ljj, dg, a, ridge) -> None:
    """A failed factorization, or a pivot below 100 eps of its diagonal entry (a rounding-level
    pivot: the prefix Gram is numerically singular, e.g. a repeated key with ridge 0)."""
    if _is_compiling():
        return
    if bool((info > 0).any()):
        key = a + int(info[info > 0].min()) - 1
    else:
        tiny = Ljj.detach().diagonal(dim1=-2, dim2=-1) ** 2 < 100 * torch.finfo(dg.dtype).eps * dg
        if not bool(tiny.any()):
            return
        key = a + int(tiny.nonzero()[:, -1].min())
    raise NumericalError(f"ridge: the kernel Gram matrix S k(K, K) S + ridge I is not "
                         f"positive definite to working precision at key {key} (ridge={ridge}); "
                         f"use a larger ridge, float64, distinct keys or positive sample weights")


# -- forms: one GD step (unnormalized kernel attention) --------------------------------------

def _gd_recurrent(q, K, V, w, Tc, kern, block_size):
    """Eq. 46 literally: o_t = sum_{i<=t} beta_i k(k_i, q_t) v_i."""
    outs = []
    for t in range(q.shape[1]):
        n = Tc + t + 1
        c = _kernel(kern, K[:, :n], q[:, t:t + 1])[..., 0]  # [BH, n]
        if w is not None:
            c = w[:, :n] * c
        outs.append((c[..., None] * V[:, :n]).sum(1))  # [BH, Dv]
    return torch.stack(outs, 1)


def _gd_blocked(q, K, V, w, Tc, kern, bs):
    """Per block of queries: the kernel row with its max factored out, times the values."""
    T, D = q.shape[1], q.shape[-1]
    Vw = V if w is None else w[..., None] * V  # [BH, L, Dv]
    c = K[:, :1]  # centre of the distance expansion, from the past: bitwise causal
    outs = []
    for a in range(0, T, bs):
        b = min(a + bs, T)
        n = Tc + b  # keys visible to the block's last query
        qb = q[:, a:b]  # [BH, Bq, Dk]
        keep = torch.arange(n, device=q.device) <= Tc + torch.arange(a, b, device=q.device)[:, None]
        if kern[0] == "polynomial":
            kq = ((1 + qb @ K[:, :n].mT / math.sqrt(D)) ** kern[1]).masked_fill(~keep, 0)
            outs.append(kq @ Vw[:, :n])
            continue
        # log k(k_i, q_t): exact exponent for exp, distances centered for rbf
        lk = qb @ K[:, :n].mT / math.sqrt(D) if kern[0] == "exp" else \
            _neg_sqdist(qb, K[:, :n], c, 1 / (2 * D))
        lk = lk.masked_fill(~keep, -math.inf)
        mx = lk.amax(-1, keepdim=True)  # [BH, Bq, 1], finite: the query's own key is visible
        y = torch.exp(lk - mx) @ Vw[:, :n]  # [BH, Bq, Dv]
        outs.append(_rescale(y, mx[..., 0], mx.new_zeros(mx.shape[0], 1)))
    return torch.cat(outs, 1)  # [BH, T, Dv]

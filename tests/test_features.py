"""Feature maps phi (ttr.ops.features): output sizes D_phi, the kernel identity each map promises
(checked numerically), gradients, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ttr.ops.features import (
    FEATURE_MAPS,
    PARAMETRIC_FEATURE_MAPS,
    based,
    cosformer,
    dct_matrix,
    dijiang,
    dijiang_params,
    dpfp,
    elu1,
    favor_plus,
    favor_plus_params,
    gaussian_directions,
    hedgehog,
    hedgehog_params,
    rebased,
    relu,
    rfa,
    rfa_params,
)
from ttr.recipe import FunctionClass
from ttr.testing import assert_close

F64 = torch.float64
EXACT = 1e-12  # float64 identities that hold up to rounding


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed: int = 0, dtype=F64) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=dtype)


# -- sizes -------------------------------------------------------------------------------------

D_PHI = {
    "identity": lambda D: D, "elu1": lambda D: D, "relu": lambda D: D,
    "based": lambda D: 1 + D + D * D,
    "dpfp1": lambda D: 2 * D, "dpfp2": lambda D: 4 * D, "dpfp3": lambda D: 6 * D,
}
# With the creators' defaults (num_features = D).
PARAM_D_PHI = {
    "cosformer": lambda D: 2 * D, "favor_plus": lambda D: D, "rfa": lambda D: 2 * D,
    "dijiang": lambda D: D, "rebased": lambda D: D * D, "hedgehog": lambda D: 2 * D,
}


def test_every_map_has_a_stated_size():
    assert set(D_PHI) == set(FEATURE_MAPS)
    assert set(PARAM_D_PHI) == set(PARAMETRIC_FEATURE_MAPS)


@pytest.mark.parametrize("name", sorted(FEATURE_MAPS))
def test_feature_maps_size_and_recipe(name):
    x = randn(2, 3, 2, 5)
    assert FEATURE_MAPS[name](x).shape == (2, 3, 2, D_PHI[name](5))
    assert FunctionClass.features(name).feature_map == name  # the validator accepts it


@settings(max_examples=25, deadline=None)
@given(lead=st.lists(st.integers(1, 3), max_size=3), D=st.integers(1, 6),
       name=st.sampled_from(sorted(FEATURE_MAPS)))
def test_feature_maps_act_on_the_last_dim_only(lead, D, name):
    x = randn(*lead, D)
    assert FEATURE_MAPS[name](x).shape == (*lead, D_PHI[name](D))


@pytest.mark.parametrize("name", sorted(PARAMETRIC_FEATURE_MAPS))
def test_parametric_maps_calling_convention(name):
    entry = PARAMETRIC_FEATURE_MAPS[name]
    params = entry.make_params(4, dtype=F64)
    assert set(entry.trainable) <= set(params)
    inputs = {"positions": torch.arange(3), "horizon": 3.0} if entry.inputs else {}
    assert set(inputs) == set(entry.inputs)
    assert entry.fn(randn(2, 3, 2, 4), **params, **inputs).shape == (2, 3, 2, PARAM_D_PHI[name](4))


# -- kernel identities -------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [False, True])
def test_based_is_the_second_order_taylor_polynomial_of_exp(symmetric):
    D = 6
    q, k = randn(5, D, seed=1), randn(7, D, seed=2)
    s = q @ k.T / math.sqrt(D)  # [5, 7]
    got = based(q, symmetric=symmetric) @ based(k, symmetric=symmetric).T
    assert_close(got, 1 + s + s**2 / 2, tol=EXACT)
    quad = D * (D + 1) // 2 if symmetric else D * D
    assert based(q, symmetric=symmetric).shape[-1] == 1 + D + quad


@pytest.mark.parametrize("orthogonal", [True, False])
def test_favor_plus_is_positive_and_unbiased_for_exp_qk(orthogonal):
    D, m, draws = 4, 8, 400
    q, k = 0.5 * randn(D, seed=3), 0.5 * randn(D, seed=4)
    g = gen(5)
    est = []
    for _ in range(draws):
        w = favor_plus_params(D, m, orthogonal=orthogonal, generator=g, dtype=F64)["w"]
        pq, pk = favor_plus(q, w), favor_plus(k, w)
        assert bool((pq > 0).all()) and bool((pk > 0).all())
        est.append(pq @ pk)
    est = torch.stack(est)
    exact, se = torch.exp(q @ k), est.std() / math.sqrt(draws)
    assert se < 0.05 * exact  # the test can tell a bias of a few percent
    assert abs(est.mean() - exact) < 4 * se


def test_orthogonal_directions_are_orthogonal_within_blocks():
    w = gaussian_directions(10, 4, generator=gen(0), dtype=F64)  # blocks of 4, 4, 2 rows
    for a, b in [(0, 4), (4, 8), (8, 10)]:
        u = w[a:b] / w[a:b].norm(dim=-1, keepdim=True)
        assert_close(u @ u.T, torch.eye(b - a, dtype=F64), tol=EXACT)


def test_orthogonal_directions_are_marginally_standard_gaussian():
    """|w|^2 ~ chi^2_D: mean D, second moment D (D + 2). Rows of fixed length sqrt(D) (the
    Performer code's other option) would give D^2 = 16 instead of 24, about 10 standard errors
    away; the unbiasedness test alone cannot see that small a bias."""
    D, n = 4, 2000
    r2 = (gaussian_directions(n, D, generator=gen(9), dtype=F64) ** 2).sum(-1)  # [n]
    for moment, want in [(r2, D), (r2**2, D * (D + 2))]:
        assert abs(moment.mean() - want) < 4 * moment.std() / math.sqrt(n)


def test_favor_plus_stabilizers_cancel_in_normalized_attention():
    m = 6
    w = favor_plus_params(4, m, generator=gen(1), dtype=F64)["w"]
    x = 2 * randn(2, 5, 3, 4, seed=2)
    plain = favor_plus(x, w)  # [B, T, H, m]
    tok, seq = favor_plus(x, w, stabilize="token"), favor_plus(x, w, stabilize="sequence")
    r = tok / plain  # one constant per token
    assert_close(r, r[..., :1].expand_as(r), tol=EXACT)
    assert_close(tok.amax(-1), torch.full(tok.shape[:-1], m**-0.5, dtype=F64), tol=EXACT)
    r = seq / plain  # one constant per (batch, head)
    assert_close(r, r[:, :1, :, :1].expand_as(r), tol=EXACT)

    def attn(fq, fk):
        a = torch.einsum("bthm,bshm->bhts", fq, fk)
        return a / a.sum(-1, keepdim=True)

    assert_close(attn(tok, seq), attn(plain, plain), tol=EXACT)
    # Where the plain features underflow to zero (long keys in float32), the stabilized don't.
    big = (30 * x).float()
    assert bool((favor_plus(big, w.float()) == 0).all(-1).any())
    assert bool((favor_plus(big, w.float(), stabilize="token").amax(-1) > 0).all())


@pytest.mark.parametrize("sigma", [1.0, 0.7])
def test_rfa_estimates_the_gaussian_kernel(sigma):
    D, m, draws = 4, 16, 300
    q, k = 0.5 * randn(D, seed=6), 0.5 * randn(D, seed=7)
    exact = torch.exp(-((q - k) ** 2).sum() / (2 * sigma**2))
    g = gen(8)
    est = torch.stack([rfa(q, w) @ rfa(k, w) for w in
                       (rfa_params(D, m, sigma=sigma, generator=g, dtype=F64)["w"]
                        for _ in range(draws))])
    se = est.std() / math.sqrt(draws)
    assert se < 0.02  # sin/cos features: the error does not shrink with the kernel value
    assert abs(est.mean() - exact) < 4 * se
    w = rfa_params(D, 2048, sigma=sigma, orthogonal=True, generator=g, dtype=F64)["w"]
    assert abs(rfa(q, w) @ rfa(k, w) - exact) < 0.08  # one draw, about 5 standard errors


def test_cosformer_scores_are_relu_products_times_cos_of_distance():
    B, T, H, D = 2, 6, 2, 3
    q, k = randn(B, T, H, D, seed=1), randn(B, T, H, D, seed=2)
    pos, M = torch.arange(1, T + 1), float(T)  # cosFormer's choice: positions 1..T, M = T
    got = torch.einsum("bthf,bshf->bhts", cosformer(q, pos, M), cosformer(k, pos, M))
    dist = (pos[:, None] - pos[None, :]).to(F64)  # [t, s]
    want = torch.einsum("bthd,bshd->bhts", relu(q), relu(k)) * torch.cos(math.pi / 2 * dist / M)
    assert_close(got, want, tol=EXACT)
    # Features are per token, so decoding one step at a time gives the same features.
    step = cosformer(q[:, 3:4], pos[3:4], M)
    assert_close(step, cosformer(q, pos, M)[:, 3:4], tol=EXACT)


def dpfp_loop(x: torch.Tensor, nu: int) -> torch.Tensor:
    """Schlag et al.'s definition written out: r_i r_{(i + j) mod 2D}, j = 1..nu."""
    r = torch.cat([x.clamp(min=0), (-x).clamp(min=0)], dim=-1)
    n = r.shape[-1]
    cols = [r[..., i] * r[..., (i + j) % n] for j in range(1, nu + 1) for i in range(n)]
    return torch.stack(cols, dim=-1)


@pytest.mark.parametrize("nu", [1, 2, 3])
def test_dpfp_matches_its_definition_and_is_nonnegative(nu):
    x = randn(3, 2, 5)
    phi = dpfp(x, nu)
    assert_close(phi, dpfp_loop(x, nu), tol=EXACT)
    assert phi.shape[-1] == 2 * 5 * nu and bool((phi >= 0).all())
    assert torch.equal(FEATURE_MAPS[f"dpfp{nu}"](x), phi)


def test_hedgehog_rows_are_two_distributions():
    D, Fd = 4, 6
    p = hedgehog_params(D, Fd, generator=gen(0), dtype=F64)
    p["bias"] = randn(Fd, seed=1)
    phi = hedgehog(randn(2, 3, D, seed=2), **p)
    assert phi.shape == (2, 3, 2 * Fd) and bool((phi > 0).all())
    ones = torch.ones(2, 3, dtype=F64)
    assert_close(phi[..., :Fd].sum(-1), ones, tol=EXACT)
    assert_close(phi[..., Fd:].sum(-1), ones, tol=EXACT)
    x = randn(5, D, seed=3)  # identity initialization when F = D
    want = torch.cat([x.softmax(-1), (-x).softmax(-1)], -1)
    assert_close(hedgehog(x, **hedgehog_params(D, dtype=F64)), want, tol=EXACT)


@pytest.mark.parametrize("symmetric", [False, True])
def test_rebased_kernel_is_the_square_of_affine_layernorm_products(symmetric):
    D = 5
    gamma, beta = 1 + 0.3 * randn(D, seed=1), 0.2 * randn(D, seed=2)
    q, k = randn(4, D, seed=3), randn(6, D, seed=4)

    def z(x):  # LayerNorm written out: biased variance, eps inside the root
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return gamma * (x - mu) / torch.sqrt(var + 1e-5) + beta

    got = rebased(q, gamma, beta, symmetric=symmetric) @ rebased(k, gamma, beta,
                                                                symmetric=symmetric).T
    assert_close(got, (z(q) @ z(k).T) ** 2, tol=EXACT)
    assert rebased(q, gamma, beta, symmetric=symmetric).shape[-1] == (
        D * (D + 1) // 2 if symmetric else D * D)


def test_dct_matrix_is_the_orthonormal_dct2():
    N = 6
    C = dct_matrix(N)
    assert_close(C @ C.T, torch.eye(N, dtype=F64), tol=EXACT)
    # DCT-II through the FFT of the even extension [x, reversed x], derived independently.
    x = randn(N, seed=1)
    V = torch.fft.fft(torch.cat([x, x.flip(0)]))[:N]
    kk = torch.arange(N, dtype=F64)
    X = 0.5 * (torch.exp(-1j * math.pi * kk / (2 * N)) * V).real
    scale = torch.full((N,), math.sqrt(2 / N), dtype=F64)
    scale[0] = math.sqrt(1 / N)
    assert_close(C @ x, scale * X, tol=EXACT)


@pytest.mark.parametrize("m", [6, 4])
def test_dijiang_is_weighted_exp_of_scaled_dct(m):
    D = 6
    p = dijiang_params(D, m, generator=gen(0), dtype=F64)
    C = dct_matrix(D)[:m]  # the m lowest frequencies
    t = (p["proj"] * C).sum(-1)  # rows of C are unit vectors
    assert_close(p["proj"], t[:, None] * C, tol=EXACT)
    # Quasi-Monte-Carlo radii: exactly one normal quantile in each stratum [i/m, (i+1)/m).
    u = torch.special.ndtr(t).sort().values
    i = torch.arange(m, dtype=F64)
    assert bool(((u >= i / m) & (u < (i + 1) / m)).all())
    x = randn(2, 3, 2, D, seed=1)
    phi = dijiang(x, **p)
    assert phi.shape == (2, 3, 2, m) and bool((phi > 0).all() & torch.isfinite(phi).all())
    assert_close(phi, torch.exp(p["log_weight"]) * torch.exp(t * (x @ C.T)), tol=EXACT)


# -- gradients ---------------------------------------------------------------------------------


def grad_case(name: str):
    D = 3
    x = randn(1, 2, 1, D, seed=11).requires_grad_()
    w = favor_plus_params(D, 4, generator=gen(1), dtype=F64)["w"]
    pos = torch.arange(2)
    if name == "dijiang":
        p = dijiang_params(D, generator=gen(2), dtype=F64)
        return (lambda x, lw: dijiang(x, p["proj"], lw)), (x, p["log_weight"].requires_grad_())
    if name == "rebased":
        gb = (1 + 0.3 * randn(D, seed=3), 0.2 * randn(D, seed=4))
        return rebased, (x, *(a.requires_grad_() for a in gb))
    if name == "hedgehog":
        return hedgehog, (x, randn(4, D, seed=5).requires_grad_(),
                          randn(4, seed=6).requires_grad_())
    fn = {
        "elu1": elu1, "based": based, "dpfp2": lambda x: dpfp(x, 2),
        "cosformer": lambda x: cosformer(x, pos, 2.0),
        "favor_plus": lambda x: favor_plus(x, w),
        "favor_plus_token": lambda x: favor_plus(x, w, stabilize="token"),
        "favor_plus_sequence": lambda x: favor_plus(x, w, stabilize="sequence"),
        "rfa": lambda x: rfa(x, w),
    }[name]
    return fn, (x,)


@pytest.mark.parametrize("name", [
    "elu1", "based", "dpfp2", "cosformer", "favor_plus", "favor_plus_token",
    "favor_plus_sequence", "rfa", "dijiang", "rebased", "hedgehog",
])
def test_gradients(name):
    fn, args = grad_case(name)
    assert torch.autograd.gradcheck(fn, args)


# -- bad input ---------------------------------------------------------------------------------

BAD = [
    (lambda: elu1(torch.ones(2, 3, dtype=torch.int64)), TypeError, "x"),
    (lambda: based([1.0, 2.0]), TypeError, "x"),
    (lambda: relu(torch.ones(2, 0)), ValueError, "x"),
    (lambda: favor_plus(randn(2, 4), randn(3, 5)), ValueError, "w"),
    (lambda: favor_plus(randn(2, 4), randn(3, 4, dtype=torch.float32)), TypeError, "w"),
    (lambda: favor_plus(randn(2, 4), randn(3, 4), stabilize="max"), ValueError, "stabilize"),
    (lambda: favor_plus(randn(2, 4), randn(3, 4), stabilize="sequence"), ValueError, "x"),
    (lambda: rfa(randn(2, 4), randn(3, 5)), ValueError, "w"),
    (lambda: dijiang(randn(2, 4), randn(4, 4), randn(3)), ValueError, "log_weight"),
    (lambda: dijiang_params(4, 5), ValueError, "num_features"),
    (lambda: rebased(randn(2, 4), randn(5), randn(4)), ValueError, "gamma"),
    (lambda: hedgehog(randn(2, 4), randn(6, 3)), ValueError, "weight"),
    (lambda: hedgehog(randn(2, 4), randn(6, 4), randn(5)), ValueError, "bias"),
    (lambda: dpfp(randn(2, 4), nu=0), ValueError, "nu"),
    (lambda: cosformer(randn(1, 3, 1, 2), torch.arange(4), 3.0), ValueError, "positions"),
    (lambda: cosformer(randn(1, 3, 1, 2), [0, 1, 2], 3.0), TypeError, "positions"),
    (lambda: cosformer(randn(1, 3, 1, 2), torch.arange(3), 0.0), ValueError, "horizon"),
    (lambda: cosformer(randn(3, 2), torch.arange(3), 3.0), ValueError, "x"),
    (lambda: favor_plus_params(4, 0), ValueError, "num_features"),
    (lambda: rfa_params(4, 8, sigma=-1.0), ValueError, "sigma"),
    (lambda: hedgehog_params(0), ValueError, "D"),
]


@pytest.mark.parametrize("call, exc, name", BAD)
def test_bad_input_names_the_argument(call, exc, name):
    with pytest.raises(exc, match=rf"^{name}:"):
        call()


def test_relu_and_elu1_unchanged():
    x = randn(4, 3)
    assert torch.equal(relu(x), F.relu(x)) and torch.equal(elu1(x), F.elu(x) + 1)
    assert bool((elu1(x) > 0).all())

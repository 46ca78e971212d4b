"""The online-regression task (Eq. 55) and experiment (Section 5, Fig. 2)."""

import csv
import math

import pytest
import torch

from ttr.experiments import online_regression as exp
from ttr.tasks.online_regression import equicorrelation, switching_ar


def _data(n=3, T=16, d=5, seed=0, **kw):
    return switching_ar(n, T, d, generator=torch.Generator().manual_seed(seed), **kw)


def test_shapes_and_indexing():
    n, T, d = 3, 16, 5
    x = _data(n, T, d)
    assert x.keys.shape == (n, T + 2, d)
    for name in ("k", "v", "q", "target"):
        assert getattr(x, name).shape == (n, T, 1, d), name
    keys = x.keys  # row i is k_{i+1}
    unit = keys / keys.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(x.k[:, :, 0], keys[:, :T])  # k_t
    torch.testing.assert_close(x.q[:, :, 0], keys[:, 1 : T + 1])  # q_t = k_{t+1}
    torch.testing.assert_close(x.v, x.q / x.q.norm(dim=-1, keepdim=True))  # v_t = q_t/|q_t|
    torch.testing.assert_close(x.target[:, :-1], x.v[:, 1:])  # target_t = v_{t+1}
    torch.testing.assert_close(x.target[:, -1, 0], unit[:, T + 1])  # v_{T+1} = k_{T+2}/|.|
    assert x.k.dtype == torch.float64


def test_ar_coefficient_switches_at_quarter():
    """Least squares of k_{t+1} on k_t recovers 0.9 before T/4 and 0.999 after, and the
    innovations (k_{t+1} - a k_t) / 0.02 have covariance Sigma."""
    T, d, rho = 64, 8, 0.5
    keys = _data(400, T, d, rho=rho).keys  # [N, T + 2, d], row i is k_{i+1}
    prev, nxt = keys[:, :-1], keys[:, 1:]  # pairs (k_t, k_{t+1}) for t = 1..T+1
    t = torch.arange(1, T + 2)
    for mask, a_true in ((t < T / 4, 0.9), (t >= T / 4, 0.999)):
        x, y = prev[:, mask], nxt[:, mask]
        a = (x * y).sum() / (x * x).sum()  # scalar OLS slope
        se = 0.02 * math.sqrt(1 + rho * (d - 1)) / (x * x).sum().sqrt()  # generous bound
        assert abs(a - a_true) < 5 * se + 1e-4, (a.item(), a_true)
        eps = ((y - a_true * x) / 0.02).reshape(-1, d)
        torch.testing.assert_close(eps.T @ eps / len(eps), equicorrelation(d, rho),
                                   atol=0.06, rtol=0)


def test_first_regime_is_stationary_from_the_start():
    keys = _data(2000, 16, 4).keys
    var = keys[:, :4].var(dim=(0, 2))  # per-step variance of the coordinates, t = 1..4
    expected = 0.02**2 / (1 - 0.9**2)
    torch.testing.assert_close(var, torch.full_like(var, expected), rtol=0.08, atol=0)


def test_determinism_by_seed():
    a, b, c = _data(seed=1), _data(seed=1), _data(seed=2)
    assert torch.equal(a.keys, b.keys)
    assert not torch.equal(a.keys, c.keys)


@pytest.mark.parametrize("kw, match", [
    (dict(n_seqs=0), "n_seqs"),
    (dict(T=0), "T"),
    (dict(rho=1.0), "rho"),
    (dict(rho=-0.5), "rho"),
])
def test_bad_input(kw, match):
    args = dict(n_seqs=2, T=8, d=4) | kw
    with pytest.raises(ValueError, match=match):
        switching_ar(generator=torch.Generator().manual_seed(0), **args)
    with pytest.raises(TypeError, match="generator"):
        switching_ar(2, 8, 4, generator=0)


def test_config_validation():
    with pytest.raises(ValueError, match="T"):
        exp.OnlineRegressionConfig(T=0)
    with pytest.raises(ValueError, match="methods"):
        exp.OnlineRegressionConfig(methods=("nope",))
    with pytest.raises(TypeError):
        exp.OnlineRegressionConfig(bogus=1)
    assert exp.OnlineRegressionConfig.full().seeds > exp.OnlineRegressionConfig.quick().seeds


def test_methods_match_their_definitions():
    """Each registry entry is the regressor the module docstring says, computed directly."""
    x = _data(2, 12, 4)
    q, k, v = x.q[:, :, 0], x.k[:, :, 0], x.v[:, :, 0]  # [N, T, d]
    N, T, d = k.shape
    lam = exp.RIDGE_REL * k[:, :1].square().sum(-1, keepdim=True) / d  # [N, 1, 1]
    h2 = exp.median_bandwidth(x.k)  # [N]
    ys = {name: exp.METHODS[name](x.q, x.k, x.v)[:, :, 0]  # [N, T, d]
          for name in ("linear_attention", "rls", "softmax", "naive")}
    for n in range(N):
        for t in range(T):
            K, V, qt = k[n, : t + 1], v[n, : t + 1], q[n, t]
            la = V.T @ (K @ qt)
            rls = V.T @ K @ torch.linalg.solve(K.T @ K + lam[n] * torch.eye(d), qt)
            w = torch.softmax(-(K - qt).square().sum(-1) / h2[n], 0)
            want = {"linear_attention": la / la.norm(), "rls": rls, "softmax": w @ V,
                    "naive": qt / qt.norm()}
            for name, y in want.items():
                torch.testing.assert_close(ys[name][n, t], y, rtol=1e-7, atol=1e-9, msg=name)


def test_run_writes_documented_files(tmp_path):
    config = exp.OnlineRegressionConfig(T=16, d=4, seeds=3)
    result = exp.run(config, tmp_path, progress=False)
    for name in ("online_regression.csv", "online_regression_summary.csv",
                 "online_regression.png"):
        assert (tmp_path / name).stat().st_size > 0
    with open(tmp_path / "online_regression.csv") as f:
        steps = list(csv.DictReader(f))
    with open(tmp_path / "online_regression_summary.csv") as f:
        summary = list(csv.DictReader(f))
    assert list(steps[0]) == ["method", "t", "loss_mean", "loss_stderr"]
    assert list(summary[0]) == exp.SUMMARY_COLUMNS
    ran = [m for m in config.methods if exp.METHODS[m] is not None]
    assert len(steps) == len(ran) * config.T
    status = {r["method"]: r["status"] for r in summary}
    assert set(status.values()) == {"ok"}
    assert result["not_implemented"] == []

    # The naive forecaster's loss, analytically: |v_{t+1} - v_t|^2 = 2 - 2 cos(k_{t+1}, k_{t+2}).
    keys = switching_ar(3, 16, 4, generator=torch.Generator().manual_seed(config.seed)).keys
    u = keys / keys.norm(dim=-1, keepdim=True)
    loss = 2 - 2 * (u[:, 1:-1] * u[:, 2:]).sum(-1)  # [N, T]
    naive = [float(r["loss_mean"]) for r in steps if r["method"] == "naive"]
    torch.testing.assert_close(torch.tensor(naive, dtype=torch.float64), loss.mean(0))
    row = next(r for r in summary if r["method"] == "naive")
    per_seed = loss[:, : config.T // 4].mean(1)
    assert float(row["loss_first_quarter"]) == pytest.approx(per_seed.mean().item())
    assert float(row["loss_first_quarter_stderr"]) == pytest.approx(
        per_seed.std().item() / math.sqrt(3))

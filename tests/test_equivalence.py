"""The generic equivalence suite: for every recipe an op computes (`recipe.op is not None`),
`ttr.run(recipe, ...)` in each of the op's forms equals `ttr.reference.solve(recipe, ...)`, the
float64 oracle that solves Eq. 8 literally per prefix.

Cases are explicit tables: recipes x awkward sizes (T=1, T=37, T=70 across the default chunk of
64, D=60) x dtypes. Inputs are realistic for a layer: keys and queries ~ N(0, 1)/sqrt(D) (so
||k|| ~ 1 and SGD steps with beta in (0, 1) are stable), log-decays g in [-1, 0), Longhorn's
delta in (0, 2), per-token sample weights in (0.5, 1.5) for exact recipes.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import ttr
from ttr import FunctionClass, Optimizer, Recipe, Weights
from ttr.reference import solve
from ttr.testing import TOLERANCES, assert_close

U, G, GD = Weights.uniform(), Weights.geometric(), Weights.geometric("dim")
LIN, ELU = FunctionClass.linear(), FunctionClass.features("elu1")


def _p(w, f, o, id, beta=None):
    """A recipe case; `beta` names how to draw the beta input when the recipe takes one."""
    return pytest.param(Recipe(w, f, o), beta, id=id)


RECIPES = [
    # One GD step from zero (Eq. 24, 16): linear attention, gated, per-dimension gated.
    *[_p(w, f, Optimizer.gd(lr=lr), f"gd-{wn}-{fn}-lr{lr}")
      for w, wn in ((U, "uniform"), (G, "geometric"))
      for f, fn in ((LIN, "linear"), (ELU, "elu1")) for lr in (1.0, 0.5)],
    _p(GD, LIN, Optimizer.gd(), "gd-geometric_dim-linear"),
    _p(GD, ELU, Optimizer.gd(lr=0.5), "gd-geometric_dim-elu1-lr0.5"),
    # Exact ridge regression (Eq. 11, 15), with and without per-token sample weights.
    *[_p(w, f, Optimizer.exact(ridge=0.1), f"exact-{wn}-{fn}-{bn or 'unweighted'}", bn)
      for w, wn in ((U, "uniform"), (G, "geometric"))
      for f, fn in ((LIN, "linear"), (ELU, "elu1")) for bn in (None, "weight")],
    # Online SGD (Eq. 29, 31, 33, 37-41).
    *[_p(w, LIN, Optimizer.sgd(rule, weight_decay=wd), f"sgd-{rule}-{wn}-wd{wd}",
         {"constant": "step", "longhorn": "delta", "nlms": None}[rule])
      for rule in ("constant", "longhorn", "nlms") for w, wn in ((U, "uniform"), (G, "geometric"))
      for wd in ((0.0, 0.3) if rule != "nlms" else (0.0,))],
    _p(G, ELU, Optimizer.sgd("longhorn", weight_decay=0.3), "sgd-longhorn-geometric-elu1", "delta"),
    _p(U, ELU, Optimizer.sgd("nlms"), "sgd-nlms-uniform-elu1"),
    # Several SGD steps per token (DeltaProduct with the pair repeated) and momentum (Titans).
    *[_p(w, LIN, Optimizer.sgd(rule, steps=3), f"sgd-{rule}-{wn}-steps3",
         {"constant": "step", "longhorn": "delta", "nlms": None}[rule])
      for rule in ("constant", "longhorn", "nlms") for w, wn in ((U, "uniform"), (G, "geometric"))],
    *[_p(w, LIN, Optimizer.sgd(momentum=mu), f"sgd-momentum{mu}-{wn}", "step")
      for mu in (0.5, 0.9) for w, wn in ((U, "uniform"), (G, "geometric"))],
    # Local constant regression = softmax attention (Eq. 50-51).
    _p(Weights.local(), FunctionClass.local_polynomial(0), Optimizer.exact(), "local0-default_bw"),
    _p(Weights.local(1.5), FunctionClass.local_polynomial(0), Optimizer.exact(), "local0-bw1.5"),
    # Local linear regression (p = 1, Eq. 52-54), ridge on the slope.
    _p(Weights.local(), FunctionClass.local_polynomial(1), Optimizer.exact(0.1), "local1-ridge"),
    _p(Weights.local(), FunctionClass.local_polynomial(2), Optimizer.exact(0.1), "local2-ridge"),
    # Kernel regression (Eq. 43) and its one-GD-step approximation (Eq. 45-47).
    _p(U, FunctionClass.kernel_class("exp"), Optimizer.exact(0.5), "kernel-exp", "weight"),
    _p(U, FunctionClass.kernel_class("rbf"), Optimizer.exact(0.5), "kernel-rbf"),
    _p(U, FunctionClass.kernel_class("polynomial", 2), Optimizer.exact(0.5), "kernel-poly2"),
    _p(U, FunctionClass.kernel_class("exp"), Optimizer.gd(lr=0.5), "kernel-exp-gd"),
]

SIZES = [  # (B, T, H, Dk, Dv)
    pytest.param((1, 1, 1, 4, 3), id="T1"),
    pytest.param((2, 37, 3, 8, 5), id="T37"),
    pytest.param((1, 70, 1, 4, 4), id="T70"),
    pytest.param((1, 12, 2, 60, 6), id="D60"),
]

DTYPES = [pytest.param(torch.float64, id="f64"), pytest.param(torch.float32, id="f32")]

# Every form each op offers (its default is one of them), from the op's module.
FORMS = {op: importlib.import_module(f"ttr.ops.{module}").FORMS for op, module in (
    ("linear_attention", "linear"), ("rls", "rls"), ("delta_rule", "delta"),
    ("delta_product", "delta_product"), ("softmax_attention", "local"),
    ("local_linear_attention", "local_linear"), ("kernel_regression", "kernel"))}
FORMS["local_polynomial_attention"] = (None,)  # one form
# Only the recurrent form of the momentum op is exact online SGD; its chunk forms are Titans'
# chunk-start approximation (tested against their own spec in test_momentum.py).
FORMS["momentum_delta_rule"] = ("recurrent",)


def make_inputs(recipe: Recipe, beta_kind, size, dtype, seed=0):
    B, T, H, Dk, Dv = size
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return _round(scale * torch.randn(*shape, generator=gen, dtype=torch.float64))

    def rand(low, high, *shape):
        return _round(low + (high - low) * torch.rand(*shape, generator=gen, dtype=torch.float64))

    def _round(x):
        # float32-representable values: both dtypes then pose the same problem to the oracle.
        return x.to(torch.float32).to(dtype)

    q, k = randn(B, T, H, Dk, scale=Dk**-0.5), randn(B, T, H, Dk, scale=Dk**-0.5)
    v = randn(B, T, H, Dv)
    kw = {}
    if recipe.weights.kind == "geometric":
        per_dim = recipe.weights.granularity == "dim"
        kw["g"] = -rand(1e-3, 1.0, B, T, H, *((Dk,) if per_dim else ()))  # in [-1, 0)
    if beta_kind is not None:
        low, high = {"step": (0.05, 0.95), "delta": (0.05, 2.0), "weight": (0.5, 1.5)}[beta_kind]
        kw["beta"] = rand(low, high, B, T, H)
    return q, k, v, kw


_expected: dict = {}


def expected(case_id, recipe, q, k, v, kw):
    """The oracle's answer, computed once per (recipe, size) and shared by forms and dtypes."""
    if case_id not in _expected:
        _expected[case_id] = solve(recipe, q, k, v, **kw)
    return _expected[case_id]


def _cases():
    for rp in RECIPES:
        recipe, beta_kind = rp.values
        for form in FORMS[recipe.op]:
            yield pytest.param(recipe, beta_kind, form, id=f"{rp.id}-{form}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("recipe, beta_kind, form", list(_cases()))
def test_run_matches_reference(recipe, beta_kind, form, size, dtype):
    assert recipe.op is not None
    if recipe.op == "local_polynomial_attention" and size[3] > 8:
        pytest.skip("degree-2 monomials of D=60 are 1891 columns per query: minutes, no news")
    q, k, v, kw = make_inputs(recipe, beta_kind, size, dtype)
    want = expected((repr(recipe), beta_kind, size), recipe, q, k, v, kw)
    out, state = ttr.run(recipe, q, k, v, form=form, **kw)
    assert state is None
    assert out.shape == want.shape and out.dtype == dtype
    assert_close(out, want, dtype=dtype, tol=TOLERANCES[dtype],
                 what=f"{recipe.op}(form={form}) vs reference")


def test_every_op_recipe_is_covered():
    """The table reaches every op that `Recipe.op` can name."""
    covered = {rp.values[0].op for rp in RECIPES}
    assert covered == set(FORMS), covered


def test_momentum_recipe_refuses_the_approximate_chunk_form():
    recipe = Recipe(Weights.uniform(), FunctionClass.linear(), Optimizer.sgd(momentum=0.5))
    q, k, v, kw = make_inputs(recipe, "step", (1, 5, 1, 3, 2), torch.float64)
    with pytest.raises(ValueError, match="form: the recipe is exact online SGD"):
        ttr.run(recipe, q, k, v, form="chunk", **kw)

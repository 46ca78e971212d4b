"""Recipe axes: every invalid field or combination is rejected with an error naming it; the
Recipe -> op table; recipes are frozen."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ttr.recipe import FunctionClass, Optimizer, Recipe, Weights

U, G, GD, L = Weights.uniform(), Weights.geometric(), Weights.geometric("dim"), Weights.local()
LIN = FunctionClass.linear()

# -- single fields ---------------------------------------------------------------------------

BAD_FIELDS = [
    # (constructor, expected error, text the message must contain)
    (lambda: Weights("exponential"), ValueError, "Weights.kind"),
    (lambda: Weights("geometric", granularity="row"), ValueError, "Weights.granularity"),
    (lambda: Weights("uniform", granularity="dim"), ValueError, "Weights.granularity"),
    (lambda: Weights("local", granularity="dim"), ValueError, "Weights.granularity"),
    (lambda: Weights("uniform", bandwidth=1.0), ValueError, "Weights.bandwidth"),
    (lambda: Weights("geometric", bandwidth=1.0), ValueError, "Weights.bandwidth"),
    (lambda: Weights.local(0.0), ValueError, "Weights.bandwidth"),
    (lambda: Weights.local(-1.0), ValueError, "Weights.bandwidth"),
    (lambda: Weights.local(math.nan), ValueError, "Weights.bandwidth"),
    (lambda: Weights.local("2"), TypeError, "Weights.bandwidth"),
    (lambda: Weights.local(True), TypeError, "Weights.bandwidth"),
    (lambda: FunctionClass("transformer"), ValueError, "FunctionClass.kind"),
    (lambda: FunctionClass("features"), ValueError, "FunctionClass.feature_map"),
    (lambda: FunctionClass("linear", feature_map="elu1"), ValueError, "FunctionClass.feature_map"),
    (lambda: FunctionClass.features("softplus9"), ValueError, "FunctionClass.feature_map"),
    (lambda: FunctionClass("kernel"), ValueError, "FunctionClass.kernel"),
    (lambda: FunctionClass("linear", kernel="exp"), ValueError, "FunctionClass.kernel"),
    (lambda: FunctionClass.kernel_class("laplace"), ValueError, "FunctionClass.kernel"),
    (lambda: FunctionClass.kernel_class("polynomial"), TypeError, "FunctionClass.degree"),
    (lambda: FunctionClass.kernel_class("polynomial", 0), ValueError, "FunctionClass.degree"),
    (lambda: FunctionClass.kernel_class("exp", 2), ValueError, "FunctionClass.degree"),
    (lambda: FunctionClass("local_polynomial"), TypeError, "FunctionClass.degree"),
    (lambda: FunctionClass.local_polynomial(-1), ValueError, "FunctionClass.degree"),
    (lambda: FunctionClass.local_polynomial(1.0), TypeError, "FunctionClass.degree"),
    (lambda: FunctionClass.local_polynomial(True), TypeError, "FunctionClass.degree"),
    (lambda: FunctionClass("linear", degree=1), ValueError, "FunctionClass.degree"),
    (lambda: Optimizer("newton"), ValueError, "Optimizer.kind"),
    (lambda: Optimizer.exact(-0.1), ValueError, "Optimizer.ridge"),
    (lambda: Optimizer.exact("0.1"), TypeError, "Optimizer.ridge"),
    (lambda: Optimizer.exact(math.nan), ValueError, "Optimizer.ridge"),
    (lambda: Optimizer.gd(steps=0), ValueError, "Optimizer.steps"),
    (lambda: Optimizer.gd(steps=2.0), ValueError, "Optimizer.steps"),
    (lambda: Optimizer.gd(steps=True), ValueError, "Optimizer.steps"),
    (lambda: Optimizer.gd(lr=0.0), ValueError, "Optimizer.lr"),
    (lambda: Optimizer.gd(lr=-1.0), ValueError, "Optimizer.lr"),
    (lambda: Optimizer.gd(lr=None), TypeError, "Optimizer.lr"),
    (lambda: Optimizer.sgd("adam"), ValueError, "Optimizer.step_size"),
    (lambda: Optimizer.sgd(weight_decay=-0.1), ValueError, "Optimizer.weight_decay"),
    (lambda: Optimizer.sgd(momentum=-0.1), ValueError, "Optimizer.momentum"),
    (lambda: Optimizer.sgd(momentum=1.5), ValueError, "Optimizer.momentum"),
    # fields that belong to another optimizer kind
    (lambda: Optimizer("gd", ridge=0.1), ValueError, "Optimizer.ridge"),
    (lambda: Optimizer("sgd", ridge=0.1), ValueError, "Optimizer.ridge"),
    (lambda: Optimizer("exact", lr=0.5), ValueError, "Optimizer.lr"),
    (lambda: Optimizer("sgd", lr=0.5), ValueError, "Optimizer.lr"),
    (lambda: Optimizer("exact", steps=2), ValueError, "Optimizer.steps"),
    (lambda: Optimizer("gd", step_size="nlms"), ValueError, "Optimizer.step_size"),
    (lambda: Optimizer("exact", weight_decay=0.1), ValueError, "Optimizer.weight_decay"),
    (lambda: Optimizer("gd", momentum=0.5), ValueError, "Optimizer.momentum"),
    (lambda: Weights(kind="uniform", decay=0.5), TypeError, "decay"),  # unknown keys
    (lambda: Optimizer(kind="sgd", nesterov=True), TypeError, "nesterov"),
]


@pytest.mark.parametrize("make, exc, name", BAD_FIELDS)
def test_bad_field_is_rejected_by_name(make, exc, name):
    with pytest.raises(exc, match=name):
        make()


@pytest.mark.parametrize("make, name", [
    (lambda x: Optimizer.exact(x), "Optimizer.ridge"),
    (lambda x: Optimizer.gd(lr=x), "Optimizer.lr"),
    (lambda x: Optimizer.sgd(weight_decay=x), "Optimizer.weight_decay"),
    (lambda x: Weights.local(x), "Weights.bandwidth"),
])
def test_infinite_values_are_rejected(make, name):
    # An infinite ridge, step or bandwidth turns every output into NaN or a constant.
    with pytest.raises(ValueError, match=name):
        make(math.inf)


finite = dict(allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(x=st.floats(**finite))
def test_numeric_ranges(x):
    """ridge, weight_decay >= 0; lr, bandwidth > 0; momentum in [0, 1]."""
    for make, ok in ((lambda: Optimizer.exact(x), x >= 0),
                     (lambda: Optimizer.sgd(weight_decay=x), x >= 0),
                     (lambda: Optimizer.gd(lr=x), x > 0),
                     (lambda: Weights.local(x), x > 0),
                     (lambda: Optimizer.sgd(momentum=x), 0 <= x <= 1)):
        if ok:
            make()
        else:
            with pytest.raises(ValueError):
                make()


@settings(max_examples=30, deadline=None)
@given(n=st.integers(-5, 10))
def test_integer_ranges(n):
    """steps >= 1; local-polynomial degree >= 0; polynomial-kernel degree >= 1."""
    for make, ok in ((lambda: Optimizer.gd(steps=n), n >= 1),
                     (lambda: Optimizer.sgd(steps=n), n >= 1),
                     (lambda: FunctionClass.local_polynomial(n), n >= 0),
                     (lambda: FunctionClass.kernel_class("polynomial", n), n >= 1)):
        if ok:
            make()
        else:
            with pytest.raises(ValueError):
                make()


# -- combinations ----------------------------------------------------------------------------

BAD_RECIPES = [
    (U, FunctionClass.local_polynomial(0), Optimizer.exact(), "local"),
    (L, LIN, Optimizer.exact(), "local"),
    (L, FunctionClass.kernel_class("exp"), Optimizer.exact(), "local"),
    (L, FunctionClass.local_polynomial(0), Optimizer.gd(), "local polynomial"),
    (L, FunctionClass.local_polynomial(1), Optimizer.sgd(), "local polynomial"),
    (G, FunctionClass.kernel_class("exp"), Optimizer.exact(), "kernel"),
    (U, FunctionClass.kernel_class("rbf"), Optimizer.sgd(), "kernel"),
    (U, FunctionClass.kernel_class("exp"), Optimizer.gd(steps=2), "kernel"),
    (GD, LIN, Optimizer.exact(0.1), "per-dimension"),
    (GD, LIN, Optimizer.sgd(), "per-dimension"),
    (U, LIN, Optimizer.sgd("nlms", weight_decay=0.1), "NLMS"),
]


def test_mlp_memories_need_sgd_and_have_no_recipe_op():
    with pytest.raises(ValueError, match="MLP memory"):
        Recipe(U, FunctionClass.mlp(), Optimizer.exact(0.1))
    assert Recipe(U, FunctionClass.mlp(), Optimizer.sgd()).op is None


def test_local_polynomial_with_ridge_is_rejected():
    with pytest.raises(ValueError, match="Optimizer.ridge"):
        Recipe(L, FunctionClass.local_polynomial(0), Optimizer.exact(0.1))


@pytest.mark.parametrize("w, f, o, name", BAD_RECIPES)
def test_bad_combination_is_rejected(w, f, o, name):
    with pytest.raises(ValueError, match=f"Recipe.*{name}"):
        Recipe(w, f, o)


@pytest.mark.parametrize("field, args", [
    ("weights", ("uniform", LIN, Optimizer.exact())),
    ("function_class", (U, "linear", Optimizer.exact())),
    ("optimizer", (U, LIN, {"kind": "exact"})),
])
def test_axes_must_be_axis_objects(field, args):
    with pytest.raises(TypeError, match=f"Recipe.{field}"):
        Recipe(*args)


# -- which op computes a recipe --------------------------------------------------------------

EL = FunctionClass.features("elu1")
OP_TABLE = [
    (U, LIN, Optimizer.gd(), "linear_attention"),
    (G, EL, Optimizer.gd(lr=0.5), "linear_attention"),
    (GD, LIN, Optimizer.gd(), "linear_attention"),
    (U, LIN, Optimizer.gd(steps=2), None),
    (G, LIN, Optimizer.exact(0.1), "rls"),
    (U, EL, Optimizer.exact(0.1), "rls"),
    (U, LIN, Optimizer.exact(), None),
    (U, LIN, Optimizer.sgd(), "delta_rule"),
    (G, LIN, Optimizer.sgd("longhorn", weight_decay=0.3), "delta_rule"),
    (G, EL, Optimizer.sgd("nlms"), "delta_rule"),
    (U, LIN, Optimizer.sgd(steps=2), "delta_product"),
    (U, LIN, Optimizer.sgd(steps=2, weight_decay=0.1), None),
    (U, LIN, Optimizer.sgd(momentum=0.9), "momentum_delta_rule"),
    (U, LIN, Optimizer.sgd(momentum=0.9, steps=2), None),
    (U, LIN, Optimizer.sgd(momentum=0.9, weight_decay=0.1), None),
    (L, FunctionClass.local_polynomial(0), Optimizer.exact(), "softmax_attention"),
    (Weights.local(3.0), FunctionClass.local_polynomial(0), Optimizer.exact(), "softmax_attention"),
    (L, FunctionClass.local_polynomial(1), Optimizer.exact(), "local_linear_attention"),
    (L, FunctionClass.local_polynomial(1), Optimizer.exact(0.1), "local_linear_attention"),
    (L, FunctionClass.local_polynomial(2), Optimizer.exact(), "local_polynomial_attention"),
    (U, FunctionClass.kernel_class("exp"), Optimizer.exact(), "kernel_regression"),
    (U, FunctionClass.kernel_class("exp"), Optimizer.gd(), "kernel_regression"),
]


@pytest.mark.parametrize("w, f, o, op", OP_TABLE)
def test_op_table(w, f, o, op):
    assert Recipe(w, f, o).op == op


@pytest.mark.parametrize("w, o, needs", [
    (U, Optimizer.gd(), {"g": False, "beta": False}),
    (G, Optimizer.exact(0.1), {"g": True, "beta": False}),
    (G, Optimizer.sgd(), {"g": True, "beta": True}),
    (U, Optimizer.sgd("longhorn"), {"g": False, "beta": True}),
    (U, Optimizer.sgd("nlms"), {"g": False, "beta": False}),
])
def test_needs(w, o, needs):
    assert Recipe(w, LIN, o).needs() == needs


# -- frozen ----------------------------------------------------------------------------------


@pytest.mark.parametrize("obj, field, value", [
    (U, "kind", "geometric"),
    (LIN, "kind", "kernel"),
    (Optimizer.gd(), "lr", 0.5),
    (Recipe(U, LIN, Optimizer.gd()), "optimizer", Optimizer.exact()),
])
def test_frozen(obj, field, value):
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(obj, field, value)

"""A recipe is the paper's three design choices (Section 3): regression weights, function class,
optimizer. Each axis is a small frozen dataclass, validated on construction; `Recipe` combines
them and rejects combinations that do not define a layer.

    >>> r = Recipe(Weights.geometric(), FunctionClass.linear(), Optimizer.sgd())
    >>> r.op                                   # which op in ttr.ops computes it
    'delta_rule'

The per-token quantities a recipe needs come with the data, in the op contract's layout:
  g     [B, T, H] (or [B, T, H, Dk])  log-decay of geometric weights, gamma_t = exp(g_t)
  beta  [B, T, H]                     sgd: step size beta_t (constant rule) or delta_t (Longhorn);
                                      exact: per-token sample weight (default 1)
`ttr.reference.solve(recipe, ...)` is the spec of what a recipe computes; `run(recipe, ...)`
below dispatches it to the fast op, and the test suite checks the two agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

WEIGHT_KINDS = ("uniform", "geometric", "local")
FUNCTION_KINDS = ("linear", "features", "kernel", "local_polynomial", "mlp")
OPTIMIZER_KINDS = ("exact", "gd", "sgd")
STEP_SIZE_RULES = ("constant", "longhorn", "nlms")
KERNELS = ("exp", "rbf", "polynomial")


def _choice(field: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{field}: expected one of {list(allowed)}, got {value!r}")


def _number(field: str, value, *, low: float, low_open: bool = False, high: float | None = None):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{field}: expected a number, got {type(value).__name__} {value!r}")
    bad = value <= low if low_open else value < low
    if bad or (high is not None and value > high) or not math.isfinite(value):
        rng = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'}"
        rng += "]" if high is not None else ")"
        raise ValueError(f"{field}: expected a value in {rng}, got {value!r}")


@dataclass(frozen=True)
class Weights:
    """Axis 1, the weights gamma_i^(t) of Eq. 8.

    uniform    gamma_i^(t) = 1 (Eq. 10).
    geometric  gamma_i^(t) = prod_{j=i+1}^t exp(g_j) (Eq. 14); `granularity="dim"` gives each key
               dimension its own decay (GLA-style; defined for one-step GD, see reference.py).
    local      gamma_i^(t) = s(k_i, q_t) = exp(-||k_i - q_t||^2 / bandwidth) (Eq. 48);
               bandwidth None means 2 sqrt(Dk), the value that makes softmax attention (Eq. 51).
    """

    kind: str = "uniform"
    granularity: str = "scalar"
    bandwidth: float | None = None

    def __post_init__(self):
        _choice("Weights.kind", self.kind, WEIGHT_KINDS)
        _choice("Weights.granularity", self.granularity, ("scalar", "dim"))
        if self.granularity == "dim" and self.kind != "geometric":
            raise ValueError("Weights.granularity: 'dim' needs kind='geometric', "
                             f"got kind={self.kind!r}")
        if self.bandwidth is not None:
            if self.kind != "local":
                raise ValueError(f"Weights.bandwidth: only local weights have a bandwidth, "
                                 f"got kind={self.kind!r}")
            _number("Weights.bandwidth", self.bandwidth, low=0.0, low_open=True)

    @classmethod
    def uniform(cls) -> Weights:
        return cls("uniform")

    @classmethod
    def geometric(cls, granularity: str = "scalar") -> Weights:
        return cls("geometric", granularity=granularity)

    @classmethod
    def local(cls, bandwidth: float | None = None) -> Weights:
        return cls("local", bandwidth=bandwidth)


@dataclass(frozen=True)
class FunctionClass:
    """Axis 2, the class M the regressor m_t is searched in.

    linear            m(k) = M k (Eq. 10).
    features          m(k) = M phi(k) with a named feature map (Eq. 3); q gets the same map.
                      Maps with parameters (PARAMETRIC_FEATURE_MAPS) only run inside a layer.
    kernel            m(k) = M phi(k) with phi implicit in a kernel (Eq. 42): "exp"
                      exp(k.k'/sqrt(Dk)), "rbf" exp(-||k-k'||^2 / (2 Dk)), "polynomial"
                      (1 + k.k'/sqrt(Dk))^degree.
    local_polynomial  locally a degree-p polynomial around the query (Eq. 49); p = 0 is
                      softmax attention (Eq. 50), p = 1 local linear attention (Eq. 52).
    mlp               a nonlinear parametric regressor trained by SGD at test time (Vignette 3:
                      TTT-MLP, Titans); its architecture is the layer's (ttr.ops.nonlinear,
                      ttr.ops.titans), and no closed-form oracle exists.
    """

    kind: str = "linear"
    feature_map: str | None = None
    kernel: str | None = None
    degree: int | None = None

    def __post_init__(self):
        _choice("FunctionClass.kind", self.kind, FUNCTION_KINDS)
        if (self.kind == "features") != (self.feature_map is not None):
            raise ValueError("FunctionClass.feature_map: required for kind='features' and only "
                             f"then, got kind={self.kind!r}, feature_map={self.feature_map!r}")
        if self.feature_map is not None:
            from ttr.ops.features import FEATURE_MAPS, PARAMETRIC_FEATURE_MAPS

            _choice("FunctionClass.feature_map", self.feature_map,
                    (*FEATURE_MAPS, *PARAMETRIC_FEATURE_MAPS))
        if (self.kind == "kernel") != (self.kernel is not None):
            raise ValueError("FunctionClass.kernel: required for kind='kernel' and only then, "
                             f"got kind={self.kind!r}, kernel={self.kernel!r}")
        if self.kernel is not None:
            _choice("FunctionClass.kernel", self.kernel, KERNELS)
        needs_degree = self.kind == "local_polynomial" or self.kernel == "polynomial"
        if needs_degree:
            if isinstance(self.degree, bool) or not isinstance(self.degree, int):
                raise TypeError(f"FunctionClass.degree: expected an int, got {self.degree!r}")
            if self.degree < 0 or (self.kernel == "polynomial" and self.degree < 1):
                raise ValueError(f"FunctionClass.degree: expected >= "
                                 f"{1 if self.kernel else 0}, got {self.degree}")
        elif self.degree is not None:
            raise ValueError(f"FunctionClass.degree: only local polynomials and the polynomial "
                             f"kernel have a degree, got kind={self.kind!r}")

    @classmethod
    def linear(cls) -> FunctionClass:
        return cls("linear")

    @classmethod
    def features(cls, feature_map: str) -> FunctionClass:
        return cls("features", feature_map=feature_map)

    @classmethod
    def kernel_class(cls, kernel: str = "exp", degree: int | None = None) -> FunctionClass:
        return cls("kernel", kernel=kernel, degree=degree)

    @classmethod
    def local_polynomial(cls, degree: int = 0) -> FunctionClass:
        return cls("local_polynomial", degree=degree)

    @classmethod
    def mlp(cls) -> FunctionClass:
        return cls("mlp")


@dataclass(frozen=True)
class Optimizer:
    """Axis 3, how Eq. 8 is minimized.

    exact  the analytical (ridge) solution = one Newton step (Eq. 11, 15, 25); `ridge` is
           lambda in 1/2 sum gamma ||v - M k||^2 + lambda/2 ||M||_F^2; 0 means the min-norm
           solution (Eq. 11), which only the reference computes.
    gd     `steps` steps of full-batch gradient descent from M = 0 with step size `lr`
           (Eq. 20-23); one step with lr = 1 is linear attention (Eq. 24).
    sgd    online SGD on the newest pair, warm-started from M_{t-1} (Eq. 26-29), `steps` steps
           per token; step-size rule "constant" (beta_t given, DeltaNet), "longhorn"
           (beta_t = delta_t / (1 + delta_t ||k_t||^2), Eq. 31) or "nlms" (1/||k_t||^2,
           Eq. 33); `weight_decay` is lambda of the leaky LMS (Eq. 34-37); `momentum` mu
           gives u_t = mu u_{t-1} - beta_t grad, M_t = M_{t-1} + u_t.
    """

    kind: str = "exact"
    ridge: float = 0.0
    steps: int = 1
    lr: float = 1.0
    step_size: str = "constant"
    weight_decay: float = 0.0
    momentum: float = 0.0

    def __post_init__(self):
        _choice("Optimizer.kind", self.kind, OPTIMIZER_KINDS)
        _number("Optimizer.ridge", self.ridge, low=0.0)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"Optimizer.steps: expected an int >= 1, got {self.steps!r}")
        _number("Optimizer.lr", self.lr, low=0.0, low_open=True)
        _choice("Optimizer.step_size", self.step_size, STEP_SIZE_RULES)
        _number("Optimizer.weight_decay", self.weight_decay, low=0.0)
        _number("Optimizer.momentum", self.momentum, low=0.0, high=1.0)
        defaults = Optimizer.__dataclass_fields__
        owners = {"ridge": ("exact",), "lr": ("gd",), "step_size": ("sgd",),
                  "weight_decay": ("sgd",), "momentum": ("sgd",), "steps": ("gd", "sgd")}
        for name, kinds in owners.items():
            if self.kind not in kinds and getattr(self, name) != defaults[name].default:
                raise ValueError(f"Optimizer.{name}: does not apply to kind={self.kind!r} "
                                 f"(only to {list(kinds)})")

    @classmethod
    def exact(cls, ridge: float = 0.0) -> Optimizer:
        return cls("exact", ridge=ridge)

    @classmethod
    def gd(cls, steps: int = 1, lr: float = 1.0) -> Optimizer:
        return cls("gd", steps=steps, lr=lr)

    @classmethod
    def sgd(cls, step_size: str = "constant", *, steps: int = 1, weight_decay: float = 0.0,
            momentum: float = 0.0) -> Optimizer:
        return cls("sgd", steps=steps, step_size=step_size, weight_decay=weight_decay,
                   momentum=momentum)


@dataclass(frozen=True)
class Recipe:
    """Weights x function class x optimizer, checked to define a layer."""

    weights: Weights
    function_class: FunctionClass
    optimizer: Optimizer

    def __post_init__(self):
        for name, cls in (("weights", Weights), ("function_class", FunctionClass),
                          ("optimizer", Optimizer)):
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"Recipe.{name}: expected a {cls.__name__}, "
                                f"got {type(getattr(self, name)).__name__}")
        w, f, o = self.weights, self.function_class, self.optimizer
        # Local weights depend on the query, so there is no single m_t to carry forward: they
        # only make sense with an estimator fitted per query (local polynomials, Eq. 48).
        if (w.kind == "local") != (f.kind == "local_polynomial"):
            raise ValueError(
                f"Recipe: local weights and local-polynomial function classes go together "
                f"(Eq. 48), got weights={w.kind!r} with function_class={f.kind!r}")
        if f.kind == "local_polynomial" and o.kind != "exact":
            raise ValueError(f"Recipe: a local polynomial is fitted exactly per query, got "
                             f"optimizer={o.kind!r}; use Optimizer.exact()")
        if f.kind == "local_polynomial" and f.degree == 0 and o.ridge > 0:
            raise ValueError("Optimizer.ridge: the local-constant fit (softmax, Eq. 50) has no "
                             f"slope to penalize, got ridge={o.ridge}")
        if f.kind == "kernel":
            if w.kind != "uniform":
                raise ValueError(f"Recipe: kernel regression is defined here with uniform "
                                 f"weights (Eq. 42), got weights={w.kind!r}")
            if o.kind == "sgd" or (o.kind == "gd" and o.steps != 1):
                raise ValueError("Recipe: a kernel memory is solved exactly (Eq. 43) or by one "
                                 "GD step from zero (unnormalized softmax, Eq. 45-47), got "
                                 f"optimizer={o.kind!r} with steps={o.steps}")
        if f.kind == "mlp" and o.kind != "sgd":
            raise ValueError(f"Recipe: an MLP memory is trained by SGD at test time (TTT, "
                             f"Titans), got optimizer={o.kind!r}")
        if w.granularity == "dim" and o.kind != "gd":
            raise ValueError("Recipe: per-dimension decay re-weights key coordinates, which "
                             "only one-step GD (gated linear attention) turns into a memory; "
                             f"got optimizer={o.kind!r}")
        if o.kind == "sgd" and o.step_size == "nlms" and o.weight_decay > 0:
            raise ValueError("Recipe: NLMS (Eq. 33) interpolates the newest pair exactly, so an "
                             "L2 penalty does not apply; got weight_decay > 0")

    # -- which op computes the recipe -------------------------------------------------------

    @property
    def op(self) -> str | None:
        """Name of the `ttr.ops` function that computes this recipe, or None if only
        `ttr.reference.solve` does (yet)."""
        f, o = self.function_class, self.optimizer
        if f.kind == "mlp":
            return None  # the layer's own memory (ttr.nn.memory: "ttt", "titans")
        if f.kind == "local_polynomial":
            return {0: "softmax_attention", 1: "local_linear_attention"}.get(
                f.degree, "local_polynomial_attention")
        if f.kind == "kernel":
            return "kernel_regression"
        if o.kind == "gd":
            return "linear_attention" if o.steps == 1 else None
        if o.kind == "exact":
            return "rls" if o.ridge > 0 else None
        if o.momentum > 0:
            # The L2 term would pass through the velocity, so it cannot fold into g (Eq. 39).
            return "momentum_delta_rule" if o.steps == 1 and o.weight_decay == 0 else None
        if o.steps > 1:
            # Several steps on the same pair = DeltaProduct with the pair repeated; a leaky
            # step per sub-step would need a decay per sub-step, which DeltaProduct lacks.
            return "delta_product" if o.weight_decay == 0 else None
        return "delta_rule"

    def needs(self) -> dict[str, bool]:
        """Which per-token inputs the recipe reads: {'g': required?, 'beta': required?}."""
        o = self.optimizer
        return {
            "g": self.weights.kind == "geometric",
            "beta": o.kind == "sgd" and o.step_size in ("constant", "longhorn"),
        }


def feature_map(recipe: Recipe, x: torch.Tensor) -> torch.Tensor:
    """phi applied to keys and queries for `FunctionClass.features`, identity otherwise."""
    if recipe.function_class.kind != "features":
        return x
    from ttr.ops.features import FEATURE_MAPS

    name = recipe.function_class.feature_map
    if name not in FEATURE_MAPS:
        raise ValueError(f"FunctionClass.feature_map: {name!r} has parameters (learned or "
                         "random), which a layer owns; use ttr.nn.Mixer (ttr.nn.FeatureMap) or "
                         "apply the map to q and k and pass FunctionClass.linear()")
    return FEATURE_MAPS[name](x)


def run(recipe: Recipe, q, k, v, *, g=None, beta=None, initial_state=None,
        output_final_state=False, cu_seqlens=None, form=None, causal=True):
    """Compute the recipe's outputs with its op (fast forms), `[B, T, H, Dv]`.

    The same arguments as `ttr.reference.solve`; the generic test suite holds the two equal.
    causal=False (nonparametric memories only) fits every query to the whole sequence.
    """
    from ttr import ops

    name = recipe.op
    if name is None:
        raise ValueError(f"recipe: no op in ttr.ops computes {recipe} yet; "
                         "ttr.reference.solve computes it (slowly, in float64)")
    need = recipe.needs()
    if need["g"] and g is None:
        raise ValueError("g: geometric weights need a log-decay g, got None")
    if not need["g"] and g is not None:
        raise ValueError(f"g: only geometric weights use a log-decay, got weights="
                         f"{recipe.weights.kind!r} and a g tensor")
    o = recipe.optimizer
    kw = dict(initial_state=initial_state, output_final_state=output_final_state,
              cu_seqlens=cu_seqlens)
    if form is not None:
        kw["form"] = form
    if name in ("softmax_attention", "local_linear_attention"):
        _no("beta", beta, "local polynomial regression")
        bw = recipe.weights.bandwidth
        if bw is None:
            bw = 2.0 * q.shape[-1] ** 0.5
        if name == "softmax_attention":
            return ops.softmax_attention(q, k, v, bandwidth=bw, causal=causal, **kw)
        return ops.local_linear_attention(q, k, v, bandwidth=bw, ridge=o.ridge, causal=causal,
                                          **kw)
    if not causal:
        raise ValueError(f"causal: the {name} op computes causal memories only (the non-causal "
                         "read of a parametric memory is its final state: ttr.nn.Mixer)")
    if name == "local_polynomial_attention":
        _no("beta", beta, "local polynomial regression")
        bw = recipe.weights.bandwidth
        return ops.local_polynomial_attention(
            q, k, v, degree=recipe.function_class.degree, ridge=o.ridge,
            bandwidth=bw if bw is not None else 2.0 * q.shape[-1] ** 0.5, **_one_form(kw))
    if name == "kernel_regression":
        f = recipe.function_class
        exact = o.kind == "exact"
        out, state = ops.kernel_regression(q, k, v, beta, kernel=f.kernel, degree=f.degree,
                                           ridge=o.ridge if exact else None,
                                           solver="exact" if exact else "gd", **kw)
        return (out * o.lr if o.lr != 1.0 else out), state
    q, k = feature_map(recipe, q), feature_map(recipe, k)
    if name == "linear_attention":
        _no("beta", beta, "one-step gradient descent")
        out, state = ops.linear_attention(q, k, v, g, **kw)
        return (out * o.lr if o.lr != 1.0 else out), state
    if name == "rls":
        return ops.rls(q, k, v, g, beta, ridge=o.ridge, **kw)
    # online SGD: turn the step-size rule and weight decay into the op's (beta, g, v).
    beta, g, v_scale = sgd_gates(recipe, k, beta, g)
    if v_scale is not None:
        v = v * v_scale.unsqueeze(-1)
    if name == "momentum_delta_rule":
        if kw.get("form", "recurrent") != "recurrent":
            raise ValueError(f"form: the recipe is exact online SGD with momentum, which only "
                             f"form='recurrent' computes; got {kw['form']!r} (the chunk form "
                             "is Titans' chunk-start approximation: call "
                             "ttr.ops.momentum_delta_rule directly)")
        kw["form"] = "recurrent"
        return ops.momentum_delta_rule(q, k, v, beta, o.momentum, g, **kw)
    if name == "delta_product":
        n = o.steps  # the same pair, n times: [B, T, H, n, D]
        rep = lambda x: x.unsqueeze(3).expand(*x.shape[:3], n, *x.shape[3:])
        return ops.delta_product(q, rep(k), rep(v), rep(beta), g, **kw)
    return ops.delta_rule(q, k, v, beta, g, **kw)


def sgd_gates(recipe: Recipe, k: torch.Tensor, beta, g):
    """The delta_rule inputs (beta, g, value scale) of an SGD recipe.

    With geometric weights the memory is first decayed, M' = exp(g_t) M_{t-1}, then one SGD
    step on the newest pair is taken from M' (for g = 0 this is Eq. 29). Step sizes: constant
    -> beta_t as given; Longhorn (Eq. 31) -> delta_t / (1 + delta_t ||k_t||^2); NLMS (Eq. 33)
    -> 1 / ||k_t||^2. Weight decay lambda (leaky LMS, Eq. 37) reparameterizes as Gated DeltaNet
    (Eq. 38-41): alpha = 1 - beta lambda joins the log-decay, the op's step is
    eta = beta / alpha and its value v' = alpha v.
    """
    o = recipe.optimizer
    ksq = (k * k).sum(-1)  # [B, T, H]
    if o.step_size == "constant":
        if beta is None:
            raise ValueError("beta: the constant step-size rule needs beta [B, T, H], got None")
        step = beta
    elif o.step_size == "longhorn":
        if beta is None:
            raise ValueError("beta: Longhorn needs delta_t as beta [B, T, H], got None")
        step = beta / (1 + beta * ksq)
    else:
        _no("beta", beta, "NLMS (its step size is 1/||k||^2)")
        step = 1.0 / ksq
    if o.weight_decay == 0:
        return step, g, None
    alpha = 1 - step * o.weight_decay  # [B, T, H]
    if not bool((alpha > 0).all()):
        raise ValueError(f"Optimizer.weight_decay: expected beta_t * weight_decay < 1 so that "
                         f"alpha = 1 - beta*lambda is a decay, got min alpha "
                         f"{alpha.min().item():.4g}")
    la = torch.log(alpha)
    return step / alpha, (la if g is None else g + la), alpha


def _one_form(kw: dict) -> dict:
    if "form" in kw:
        raise ValueError(f"form: local_polynomial_attention has one form, got {kw['form']!r}")
    return kw


def _no(name: str, x, why: str) -> None:
    if x is not None:
        raise ValueError(f"{name}: not used by {why}; expected None, got a tensor")

"""ttr.nn: the short convolution (Eq. 56) and the Mixer built from a recipe."""

from __future__ import annotations

import pytest
import torch

from ttr.nn import Mixer, MixerConfig, ShortConv
from ttr.nn.gates import SigmoidDecay
from ttr.recipe import FunctionClass, Optimizer, Recipe, Weights
from ttr.testing import assert_close

F64 = torch.float64
LIN = FunctionClass.linear()

RECIPES = [
    pytest.param(Recipe(Weights.uniform(), LIN, Optimizer.gd()), id="linear_attention"),
    pytest.param(Recipe(Weights.uniform(), LIN, Optimizer.exact(ridge=1.0)), id="rls"),
    pytest.param(Recipe(Weights.uniform(), LIN, Optimizer.sgd()), id="delta_rule"),
    pytest.param(Recipe(Weights.geometric(), LIN, Optimizer.sgd()), id="gated_delta_rule"),
    pytest.param(Recipe(Weights.uniform(), LIN, Optimizer.sgd("longhorn")), id="longhorn"),
    pytest.param(Recipe(Weights.geometric("dim"), LIN, Optimizer.gd()), id="gla"),
    pytest.param(Recipe(Weights.geometric(), LIN, Optimizer.gd()), id="mamba2_style"),
    pytest.param(Recipe(Weights.local(), FunctionClass.local_polynomial(0), Optimizer.exact()),
                 id="softmax"),
]

CONFIG = MixerConfig(d_model=12, n_heads=2, conv_q=3, conv_k=2, conv_v=4, qk_norm=True,
                     output_norm="rms", bias=True)


def make(recipe, config=CONFIG, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return Mixer(recipe, config).to(dtype)


def inputs(B=2, T=9, D=12, seed=1, dtype=torch.float32):
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("recipe", RECIPES)
def test_output_shape(recipe):
    y, state = make(recipe)(inputs())
    assert y.shape == (2, 9, 12)
    assert torch.isfinite(y).all()
    assert state.conv_k.shape == (2, 1, 12) and state.conv_v.shape == (2, 3, 12)


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("split", [1, 4, 8])
def test_split_with_carried_state_equals_whole(recipe, split):
    mixer, x = make(recipe, dtype=F64), inputs(dtype=F64)
    whole, _ = mixer(x)
    first, state = mixer(x[:, :split])
    second, _ = mixer(x[:, split:], state)
    assert_close(torch.cat([first, second], dim=1), whole, what="split vs whole")


@pytest.mark.parametrize("recipe", RECIPES)
def test_gradients_reach_every_parameter(recipe):
    mixer = make(recipe, dtype=F64)
    y, _ = mixer(inputs(dtype=F64))
    y.square().mean().backward()
    for name, p in mixer.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_gates_match_the_recipe():
    la = make(RECIPES[0].values[0])
    assert len(la.gates) == 0
    (gla,) = make(RECIPES[5].values[0]).gates
    assert isinstance(gla, SigmoidDecay) and gla.proj.out_features == 2 * 6  # per key dim
    decay, step = make(RECIPES[3].values[0]).gates
    assert decay.proj.out_features == 2 and step.proj.out_features == 2 and step.kind == "sigmoid"
    (longhorn,) = make(RECIPES[4].values[0]).gates
    assert longhorn.kind == "softplus"


def test_no_state_when_not_asked():
    y, state = make(RECIPES[0].values[0])(inputs(), output_state=False)
    assert state is None and y.shape == (2, 9, 12)


def test_bad_input_names_the_argument():
    mixer = make(RECIPES[0].values[0])
    with pytest.raises(ValueError, match="x: expected shape"):
        mixer(torch.randn(2, 9, 11))
    with pytest.raises(TypeError, match="state"):
        mixer(inputs(), state=(1, 2))
    with pytest.raises(TypeError, match="recipe"):
        Mixer("linear_attention", CONFIG)


# -- ShortConv ------------------------------------------------------------------------------


def test_short_conv_is_eq56():
    conv = ShortConv(5, 3).double()
    x = inputs(B=2, T=6, D=5, dtype=F64)
    y, cache = conv(x)
    want = torch.zeros_like(x)
    for t in range(6):
        for i in range(3):
            if t - i >= 0:
                want[:, t] += conv.weight[:, i] * x[:, t - i]  # w_i x_{t-i}
    assert_close(y, want)
    assert_close(cache, x[:, -2:])


@pytest.mark.parametrize("K", [1, 2, 4])
def test_short_conv_step_by_step_equals_full(K):
    conv = ShortConv(7, K).double()
    x = inputs(B=3, T=10, D=7, dtype=F64)
    full, _ = conv(x)
    cache, steps = None, []
    for t in range(10):
        y, cache = conv(x[:, t:t + 1], cache)
        steps.append(y)
    assert_close(torch.cat(steps, dim=1), full)


def test_short_conv_init_and_errors():
    conv = ShortConv(64, 4)
    assert conv.weight.abs().max() <= 0.5  # uniform(-1/sqrt(K), 1/sqrt(K))
    with pytest.raises(ValueError, match="kernel_size"):
        ShortConv(4, 0)
    with pytest.raises(ValueError, match="cache"):
        conv(torch.randn(2, 3, 64), torch.zeros(2, 2, 64))


# -- MixerConfig ------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, field", [
    (dict(d_model=0), "d_model"),
    (dict(d_model=8, n_heads=0), "n_heads"),
    (dict(d_model=10, n_heads=3), "d_key"),
    (dict(d_model=8, d_key=0), "d_key"),
    (dict(d_model=8, d_value=-1), "d_value"),
    (dict(d_model=8, conv_k=-1), "conv_k"),
    (dict(d_model=8, conv_q=1.5), "conv_q"),
    (dict(d_model=8, qk_norm=1), "qk_norm"),
    (dict(d_model=8, output_norm="yes"), "output_norm"),
    (dict(d_model=8, n_heads=4, n_kv_heads=3), "n_kv_heads"),
    (dict(d_model=8, output_gate="relu"), "output_gate"),
    (dict(d_model=True), "d_model"),
])
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises((ValueError, TypeError), match=f"MixerConfig.{field}"):
        MixerConfig(**kwargs)


def test_config_unknown_keys_and_defaults():
    with pytest.raises(ValueError, match="conv_x"):
        MixerConfig.from_dict({"d_model": 8, "conv_x": 2})
    with pytest.raises(TypeError, match="conv_x"):
        MixerConfig(d_model=8, conv_x=2)
    c = MixerConfig(d_model=12, n_heads=3, d_value=5)
    assert (c.dk, c.dv) == (4, 5)
    with pytest.raises(AttributeError):
        c.d_model = 3  # frozen


@pytest.mark.parametrize("recipe, forms", [
    (RECIPES[0].values[0], ("recurrent", "parallel", "chunk")),
    (RECIPES[1].values[0], ("recurrent", "parallel", "chunk")),
])
def test_op_forms_agree_across_chunks(recipe, forms):
    # T = 70 crosses a 64-token chunk boundary; the state is carried mid-chunk.
    x = inputs(T=70, dtype=F64)
    outs = []
    for form in forms:
        mixer = make(recipe, MixerConfig(d_model=12, n_heads=2, conv_k=2, form=form), dtype=F64)
        whole, _ = mixer(x)
        first, state = mixer(x[:, :33])
        second, _ = mixer(x[:, 33:], state)
        assert_close(torch.cat([first, second], dim=1), whole, what=form)
        outs.append(whole)
    for form, out in zip(forms[1:], outs[1:], strict=True):
        assert_close(out, outs[0], what=f"{form} vs {forms[0]}")


def test_gqa_shares_key_value_heads():
    """n_kv_heads=1 with 2 query heads == 2 kv heads whose projections are copies."""
    recipe = RECIPES[0].values[0]
    gqa = make(recipe, MixerConfig(d_model=12, n_heads=2, n_kv_heads=1, conv_k=2), dtype=F64)
    full = make(recipe, MixerConfig(d_model=12, n_heads=2, conv_k=2), dtype=F64)
    with torch.no_grad():
        for name in ("q_proj", "o_proj"):
            getattr(full, name).weight.copy_(getattr(gqa, name).weight)
        for name in ("k_proj", "v_proj"):
            getattr(full, name).weight.copy_(getattr(gqa, name).weight.repeat(2, 1))
        full.k_conv.weight.copy_(gqa.k_conv.weight.repeat(2, 1))
    assert gqa.k_proj.out_features == 6 and full.k_proj.out_features == 12
    x = inputs(dtype=F64)
    assert_close(gqa(x)[0], full(x)[0], dtype=F64)


# -- rotary position embeddings -----------------------------------------------------------------

def test_rotary_keeps_norms_and_sees_relative_positions():
    from ttr.nn.rope import rotary

    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 1, 1, 8, generator=g, dtype=torch.float64) for _ in range(2))
    assert torch.allclose(rotary(q, 5, 100.0).norm(), q.norm())
    # <R_t q, R_i k> depends on t - i only
    dots = [(rotary(q, t, 100.0) * rotary(k, i, 100.0)).sum() for t, i in ((7, 3), (12, 8),
                                                                         (4, 0))]
    assert torch.allclose(torch.stack(dots), dots[0].expand(3))
    assert not torch.allclose((rotary(q, 7, 100.0) * rotary(k, 2, 100.0)).sum(), dots[0])


@pytest.mark.parametrize("name", ["softmax_attention", "gated_deltanet"])
def test_rope_split_and_step_equal_one_pass(name):
    from ttr import catalog

    torch.manual_seed(0)
    m = catalog.get(name, d_model=16, n_heads=2, rope=10000.0).double()
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    y, _ = m(x)
    y1, s = m(x[:, :4])
    y2, s = m(x[:, 4:9], s)
    steps = []
    for t in range(9, 11):
        y_t, s = m.step(x[:, t], s)
        steps.append(y_t)
    assert torch.allclose(torch.cat([y1, y2, torch.stack(steps, 1)], 1), y, atol=1e-10)
    plain = catalog.get(name, d_model=16, n_heads=2).double()
    plain.load_state_dict(m.state_dict())
    assert not torch.allclose(plain(x)[0], y)  # the rotation changes what the memory sees


def test_rope_needs_an_even_key_dimension():
    with pytest.raises(ValueError, match="MixerConfig.rope: rotary"):
        MixerConfig(d_model=12, n_heads=4, rope=10000.0)  # d_key 3
    with pytest.raises(ValueError, match="MixerConfig.rope: expected None or a base"):
        MixerConfig(d_model=16, rope=True)

"""Pure tensor functions, one file per solver family (DESIGN.md, "The op contract")."""

from ttr.ops.common import NumericalError, finite_checks
from ttr.ops.delta import delta_rule, delta_rule_step
from ttr.ops.delta_product import delta_product, delta_product_step
from ttr.ops.kernel import kernel_regression
from ttr.ops.linear import linear_attention, linear_attention_step
from ttr.ops.local import softmax_attention, softmax_attention_step
from ttr.ops.local_linear import local_linear_attention
from ttr.ops.local_poly import local_polynomial_attention
from ttr.ops.mlstm import mlstm, mlstm_step
from ttr.ops.momentum import momentum_delta_rule, momentum_delta_rule_step
from ttr.ops.nonlinear import ttt, ttt_params
from ttr.ops.rls import rls, rls_step
from ttr.ops.rwkv6 import rwkv6, rwkv6_step
from ttr.ops.steps import (
    kernel_regression_step,
    local_linear_attention_step,
    local_polynomial_attention_step,
    titans_step,
    ttt_step,
)
from ttr.ops.titans import titans, titans_params

__all__ = [
    "NumericalError", "finite_checks",
    "delta_rule", "delta_rule_step",
    "delta_product", "delta_product_step",
    "kernel_regression", "kernel_regression_step",
    "linear_attention", "linear_attention_step",
    "local_linear_attention", "local_linear_attention_step",
    "local_polynomial_attention", "local_polynomial_attention_step",
    "mlstm", "mlstm_step",
    "momentum_delta_rule", "momentum_delta_rule_step",
    "rls", "rls_step",
    "rwkv6", "rwkv6_step",
    "softmax_attention", "softmax_attention_step",
    "titans", "titans_params", "titans_step",
    "ttt", "ttt_params", "ttt_step",
]

"""The catalogue of named architectures (ttr.catalog.registry explains an entry):

    linear_family.py   uniform weights, one GD step: linear attention and its feature maps
    decay_family.py    geometric weights, one GD step: RetNet, GLA, Mamba-2, RWKV-6, mLSTM, ...
    sgd_family.py      online SGD: DeltaNet, Longhorn, NLMS, Gated DeltaNet, TTT, Titans, ...
    exact_family.py    exact regression and nonparametric memories: mesa layer, MesaNet,
                       Intention, kernel regression, softmax, local linear attention
"""

from ttr.catalog import decay_family, exact_family, linear_family, sgd_family  # noqa: F401
from ttr.catalog.registry import CATALOG, FAMILIES, Entry, describe, entry, get, names, table

__all__ = ["CATALOG", "FAMILIES", "Entry", "describe", "entry", "get", "names", "table"]

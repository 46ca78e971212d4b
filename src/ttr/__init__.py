"""ttr: test-time regression layers (Wang, Shi & Fox, "Test-time regression: a unifying
framework for designing sequence models with associative memory").

Every sequence layer is an associative memory that fits a regressor to the key-value pairs it
has seen (Eq. 8) and applies it to the query (Eq. 9). A layer is a `Recipe`: regression
weights x function class x optimizer.
"""

from ttr import ops, reference
from ttr.recipe import FunctionClass, Optimizer, Recipe, Weights, run
from ttr.runtime import tune_allocator

__all__ = ["FunctionClass", "Optimizer", "Recipe", "Weights", "ops", "reference", "run",
           "tune_allocator"]
__version__ = "0.1.0"


def __getattr__(name):
    # ttr.hf imports transformers (seconds), so it loads on first use, not with `import ttr`;
    # importing it registers model_type "ttr" with the transformers Auto classes.
    if name == "hf":
        import importlib

        return importlib.import_module("ttr.hf")
    raise AttributeError(f"module 'ttr' has no attribute {name!r}")

"""Test-session settings.

The suite runs thousands of ops on tiny tensors; with more than one thread each op pays a
thread-pool barrier that, on a busy 2-core machine, costs milliseconds (measured: a 60 x 24
matvec took 11 ms with two threads, 0.01 ms with one; the suite 80 s vs 34 s). Results do not
depend on the thread count.
"""

import pytest
import torch

from ttr.testing import assert_close

torch.set_num_threads(1)


@pytest.fixture
def written_out_equals_autograd(monkeypatch):
    """check(function, module, run, tol, rmse=False): run() (outputs and gradients) through
    `function`, an autograd Function with a written-out backward, which must be taken, equals
    run() on the autograd path that `module` takes when compiling (its `_is_compiling` patched
    to True): elementwise to tol, or (rmse) to a relative RMSE of tol."""

    def check(function, module, run, tol, rmse=False):
        taken, apply = [], function.apply
        monkeypatch.setattr(function, "apply", lambda *a: taken.append(1) or apply(*a))
        fast = run()
        assert taken, f"{function.__name__} was not taken"
        monkeypatch.setattr(module, "_is_compiling", lambda: True)
        for i, (x, y) in enumerate(zip(fast, run(), strict=True)):
            assert x.dtype == y.dtype
            if rmse:
                assert_close(x, y, tol=tol, what=f"output {i}")
            else:
                torch.testing.assert_close(x, y, rtol=tol, atol=tol)

    return check

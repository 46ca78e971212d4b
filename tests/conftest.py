"""Test-session settings.

The suite runs thousands of ops on tiny tensors; with more than one thread each op pays a
thread-pool barrier that, on a busy 2-core machine, costs milliseconds (measured: a 60 x 24
matvec took 11 ms with two threads, 0.01 ms with one; the suite 80 s vs 34 s). Results do not
depend on the thread count.
"""

import torch

torch.set_num_threads(1)

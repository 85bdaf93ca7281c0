"""Work-arounds for the library versions this package runs with.

`torch.optim` (2.14) removes its submodules from its namespace after importing them
(`torch.optim.sgd` is in `sys.modules` but is no attribute of `torch.optim`).
dill, which Avalanche's `save_checkpoint` pickles the strategy with, looks a class up
as `getattr(torch.optim, "sgd").SGD`; failing that it pickles the optimizer *class*
by value, and that fails (`Can't pickle sentinel`). So every Avalanche checkpoint of
a strategy whose optimizer has taken a step fails, with or without SI. Putting the
submodules back as attributes, which is what a plain `import torch.optim.sgd` does
for any ordinary package, lets dill find the classes by reference again.
"""

from __future__ import annotations

import sys

import torch.optim


def expose_torch_optim_submodules() -> None:
    """Make `torch.optim.<submodule>` attributes resolvable again (idempotent)."""
    prefix = "torch.optim."
    for name, module in list(sys.modules.items()):
        if name.startswith(prefix) and module is not None:
            head = name[len(prefix):]
            if "." not in head and not hasattr(torch.optim, head):
                setattr(torch.optim, head, module)

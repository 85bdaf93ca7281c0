"""avalanche_si: Synaptic Intelligence (Zenke, Poole & Ganguli, ICML 2017) for Avalanche.

- :class:`SIPlugin`, an Avalanche ``SupervisedPlugin`` for any supervised strategy;
- :mod:`avalanche_si.functional`, the framework-free core: the four functions
  ``si_pre_optim_step``, ``si_post_optim_step``, ``si_compute_importance`` and
  ``si_regularizer`` with state as named buffers on a module.
"""

from ._compat import expose_torch_optim_submodules

expose_torch_optim_submodules()  # so that Avalanche checkpoints can pickle optimizers

from .functional import (  # noqa: E402
    NonFiniteImportanceError,
    fused_kernels_available,
    si_compute_importance,
    si_post_optim_step,
    si_pre_optim_step,
    si_regularizer,
)
from .plugin import CLAMP_MODES, IMPORTANCE_MODES, GroupOptions, ParamGroup, SIPlugin  # noqa: E402
from . import amp  # noqa: E402

__version__ = "0.2.0"

__all__ = [
    "SIPlugin",
    "ParamGroup",
    "GroupOptions",
    "amp",
    "IMPORTANCE_MODES",
    "CLAMP_MODES",
    "NonFiniteImportanceError",
    "si_pre_optim_step",
    "si_post_optim_step",
    "si_compute_importance",
    "si_regularizer",
    "fused_kernels_available",
]

"""avalanche_si: Synaptic Intelligence (Zenke, Poole & Ganguli, ICML 2017) for PyTorch, Avalanche
and Lightning.

- `SynapticIntelligence`, the engine: SI in any PyTorch training loop (four calls
  around the optimizer step);
- `SIPlugin`, an Avalanche `SupervisedPlugin` over the engine, for any supervised
  strategy; `avalanche_si.lightning.SICallback`, a Lightning callback over it;
- `avalanche_si.functional`, the framework-free core: the four functions
  `si_pre_optim_step`, `si_post_optim_step`, `si_compute_importance` and
  `si_regularizer` with state as named buffers on a module.

The names below load their module when first used: importing the package, the engine or the
functional core loads no training framework (Avalanche comes with `SIPlugin`, Lightning
with the callback), and `import avalanche_si` alone loads nothing at all.
"""

from typing import TYPE_CHECKING

__version__ = "0.4.0"

__all__ = [
    "SynapticIntelligence",
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

#: each public name, and the module that holds it (loaded when the name is first used)
_HOME = {
    "SynapticIntelligence": "engine", "GroupOptions": "engine", "SIPlugin": "plugin",
    "ParamGroup": "groups", "IMPORTANCE_MODES": "options", "CLAMP_MODES": "options",
    "NonFiniteImportanceError": "functional", "si_pre_optim_step": "functional",
    "si_post_optim_step": "functional", "si_compute_importance": "functional",
    "si_regularizer": "functional", "fused_kernels_available": "functional",
}

if TYPE_CHECKING:  # for type checkers and IDEs, which do not run __getattr__
    from . import amp
    from .engine import GroupOptions, SynapticIntelligence
    from .functional import (NonFiniteImportanceError, fused_kernels_available,
                             si_compute_importance, si_post_optim_step, si_pre_optim_step,
                             si_regularizer)
    from .groups import ParamGroup
    from .options import CLAMP_MODES, IMPORTANCE_MODES
    from .plugin import SIPlugin


def __getattr__(name: str):
    import importlib

    if name == "amp":
        return importlib.import_module(".amp", __name__)
    if name in _HOME:
        value = getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

r"""Importance estimators: how SI measures each weight's importance, one object each.

| `importance=` | object | per step | at consolidation |
|---|---|---|---|
| `"total"` | `Total()` | ω −= g' ⊙ Δθ (g' as the optimizer used it) | Ω += max(0, ω / (Δ² + ξ)) |
| `"task"` | `Task()` | ω −= g ⊙ Δθ (g without SI's penalty) | the same |
| `"delta_params"` | `DeltaParams()` | ω −= g ⊙ Δθ̂ (the predicted step) | the same |
| `"siu"` | `SIU()` | ω −= g_u ⊙ Δθ (an independent mini-batch) | the same |
| `"sib"` | `SIB()` | ω += (g_u − g) ⊙ Δθ | the same |
| `"sos"` | `SOS()`, `SOS(alpha=1)` | v ← β v + (1 − β) (g − α g_u)² | Ω += √v |
| `"onaf"` | `OnAF()` | a ← a + \|g\| | Ω += a |

`importance=` takes the string or an object (`SOS(alpha=1.0)`, or an `Estimator` of your
own); `make_estimator()` turns either into an object. Each estimator lives in its own module
and declares what it needs (`avalanche_si.estimators.base`); the step code asks it, never
its name.
"""

from __future__ import annotations

from typing import Any

from ..options import IMPORTANCE_MODES, OptionTypeError
from .base import Estimator
from .delta_params import DeltaParams
from .onaf import OnAF
from .path import PathIntegral
from .sib import SIB
from .si import Task, Total
from .siu import SIU
from .sos import SOS

__all__ = ["Estimator", "PathIntegral", "Total", "Task", "DeltaParams", "SIU", "SIB", "SOS",
           "OnAF", "ESTIMATORS", "make_estimator"]

#: the estimator each `importance=` string names (`avalanche_si.options.IMPORTANCE_MODES`
#: lists the same names without importing torch)
ESTIMATORS: dict[str, type[Estimator]] = {
    cls.name: cls for cls in (Total, Task, DeltaParams, SIU, SIB, SOS, OnAF)}


def make_estimator(value: Any) -> Estimator:
    """The estimator `importance=` names: an `Estimator` as it is, a name as a new one."""
    if isinstance(value, Estimator):
        return value
    if isinstance(value, str) and value in ESTIMATORS:
        return ESTIMATORS[value]()
    kind = OptionTypeError if not isinstance(value, str) else ValueError
    raise kind(f"importance must be one of {IMPORTANCE_MODES} or an "
               f"avalanche_si.estimators.Estimator, got {type(value).__name__} {value!r}.")

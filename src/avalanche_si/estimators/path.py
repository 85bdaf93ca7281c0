r"""SI's path integral, shared by every estimator that measures ω along the steps taken:

    ω ← ω + m ⊙ (θ_pre − θ)   after each optimizer step (θ_pre: the weights before it),
    Ω ← Ω + max(0, ω / ((θ − θ_start)² + ξ))   at consolidation,

with m the gradient the estimator measures the step with (Zenke, Poole & Ganguli 2017: the
gradient g, so that `−g ⊙ Δθ` is the loss decrease the weight is credited with). The
estimators differ only in m: `Total`, `Task` (`avalanche_si.estimators.si`), `SIU`, `SIB`.
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor

from ..functional import accumulate_from_pre, path_contribution
from .base import Estimator

__all__ = ["PathIntegral"]


class PathIntegral(Estimator):
    """An estimator whose ω is the path integral of its measure m along the steps taken."""

    weights_before_step = True
    path_length = True

    @staticmethod
    def accumulate(running: Sequence[Tensor], measure: Sequence[Tensor],
                   pre: Sequence[Tensor], params: Sequence[Tensor]) -> None:
        """ω ← ω + m ⊙ (θ_pre − θ) (one pass on the fused CPU path; what a CUDA graph of
        `after_step()` captures)."""
        accumulate_from_pre(running, measure, pre, params)

    def after_step(self, group: Any, measure: Sequence[Tensor]) -> None:
        """ω ← ω + m ⊙ (θ_pre − θ), m the measure `before_step()` returned."""
        self.accumulate(group.pick(group.running), measure, group.pick(group.pre),
                        group.pick(group.params))

    def contribution(self, running, params, start, *, eps: float) -> list[Tensor]:
        """ω / ((θ − θ_start)² + ξ), SI's normalisation by the period's squared path."""
        return path_contribution(running, params, start, eps=eps)

r"""Synaptic Intelligence as a Lightning callback: Lightning's hooks mapped onto the engine.

`SICallback` owns a `SynapticIntelligence`; one
`trainer.fit` is one task:

============================  ===============================================================
Lightning hook                engine call
============================  ===============================================================
`on_train_start`            `bind(module, optimizer, scaler=precision plugin's)`,
                              `start_task()`
`on_before_optimizer_step`  `before_step()`: once per optimizer step, after Lightning's
                              AMP unscaling and gradient accumulation, before its clipping
`on_train_batch_end`        `after_step(loss)`, after a batch whose optimizer step ran
`on_train_end`              `end_task()`: consolidation, by the policy (after each fit by
                              default)
`state_dict`                the engine's, in Lightning checkpoints
============================  ===============================================================

Needs `lightning` (or the older `pytorch_lightning`) 2.x: `pip install
"avalanche-si[lightning]"`. Automatic optimization with one optimizer; with manual
optimization, drive the engine from `training_step` as in a plain loop.
"""

from __future__ import annotations

from typing import Any, Optional

from .engine import SynapticIntelligence

try:  # the unified package, else the standalone one
    from lightning.pytorch import Callback
except ImportError:  # pragma: no cover - depends on what is installed
    try:
        from pytorch_lightning import Callback
    except ImportError as exc:
        raise ImportError("avalanche_si.lightning needs Lightning 2.x: pip install "
                          "\"avalanche-si[lightning]\" (or lightning).") from exc

__all__ = ["SICallback"]


class SICallback(Callback):
    r"""Synaptic Intelligence for a `LightningModule` trained one task per `trainer.fit`.

    Takes the options of `SynapticIntelligence` (`si_lambda`, `eps`,
    `groups`, `importance`, `clamp`, `consolidate`, ...), or an existing engine as
    `engine=`. The penalty's gradient is added in `on_before_optimizer_step`, so
    Lightning's gradient clipping clips it with the task gradient; with
    `accumulate_grad_batches=k` it acts once per optimizer step, and ω counts
    each step once. With `precision="16-mixed"` the precision plugin's `GradScaler` is used:
    steps it skips add nothing.

    Example:
        ```python
        import lightning as L
        from avalanche_si.lightning import SICallback

        si = SICallback(si_lambda=1.0, eps=0.1)
        for task in tasks:  # one fit per task: SI consolidates as each fit ends
            L.Trainer(max_epochs=2, callbacks=[si]).fit(module, task)
        ```
    """

    def __init__(self, *, engine: Optional[SynapticIntelligence] = None, **options: Any):
        super().__init__()
        if engine is not None and options:
            raise TypeError("SICallback takes engine= or the engine's options, not both.")
        if engine is not None and not isinstance(engine, SynapticIntelligence):
            raise TypeError(f"engine must be a SynapticIntelligence, got {type(engine).__name__}.")
        self.engine = engine if engine is not None else SynapticIntelligence(**options)
        self.engine._owner = "SICallback"
        self._stepped = False

    @property
    def state_key(self) -> str:
        return "SICallback"

    def _bind(self, trainer, pl_module) -> None:
        optimizers = trainer.optimizers
        if len(optimizers) != 1:
            raise ValueError(f"SICallback supports one optimizer, the LightningModule has "
                             f"{len(optimizers)}; drive SynapticIntelligence from training_step.")
        if not pl_module.automatic_optimization:
            raise ValueError("SICallback needs automatic optimization; with manual optimization "
                             "call SynapticIntelligence's before_step() and after_step() around "
                             "your optimizer step in training_step.")
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.engine.bind(pl_module, optimizers[0], scaler=scaler)

    def on_train_start(self, trainer, pl_module) -> None:
        self._bind(trainer, pl_module)
        self._stepped = False
        self.engine.start_task()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.engine.before_step()
        self._stepped = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._stepped:  # under accumulate_grad_batches, only the batches that stepped
            self._stepped = False
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            self.engine.after_step(loss if hasattr(loss, "detach") else None)

    def on_train_end(self, trainer, pl_module) -> None:
        self.engine.end_task()

    def state_dict(self) -> dict[str, Any]:
        return self.engine.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.engine.load_state_dict(state_dict)

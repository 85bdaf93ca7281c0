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
`state_dict`                the engine's, in Lightning checkpoints; written during a fit, it
                              is the state at that moment of the fit, whatever callback asks
                              for it first (a step taken is measured), and the fit's last
                              checkpoint holds the fit's consolidation
============================  ===============================================================

Needs `lightning` (or the older `pytorch_lightning`) 2.x: `pip install lightning`.
Automatic optimization with one optimizer; with manual optimization, drive the engine from
`training_step` as in a plain loop. Strategies that train in processes they spawn
(`"ddp_spawn"`) cannot bring SI's state back to the trainer's process: refused; `"ddp"` works.
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
        raise ImportError("avalanche_si.lightning needs Lightning 2.x: pip install lightning "
                          "(or, from a clone of avalanche_si, pip install -e \".[lightning]\")."
                          ) from exc

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

    Args:
        engine: an existing `SynapticIntelligence` to drive (its options and state), instead
            of a new one.
        **options: the options of a new `SynapticIntelligence`, by keyword, each as the
            engine documents it: `si_lambda` (c, default 1.0), `eps` (ξ, default 1e-3),
            `excluded_parameters`, `groups`, `importance` (default `"total"`), `clamp`
            (default `"task"`), `regularize_norm_layers`, `state_dtype`, `consolidate`
            (default: as each fit ends), `scaler` (default: the precision plugin's) and
            `cuda_graphs`. The model and optimizer are the fit's.

    Attributes:
        engine: the `SynapticIntelligence` behind the callback: its options
            (`callback.engine.si_lambda = 5.0`), `importances()`, `penalty`,
            `consolidate_now()`, `record_independent_gradient()`.

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
        self._trainer = None  # during a fit: the trainer fitting

    @property
    def state_key(self) -> str:
        """The key of SI's state in a Lightning checkpoint's ``callbacks`` entry."""
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

    def setup(self, trainer, pl_module, stage: str) -> None:
        """Refuses a strategy that spawns its processes (``ddp_spawn``): SI's state would stay
        in them."""
        launcher = getattr(trainer.strategy, "launcher", None)
        if type(launcher).__name__ == "_MultiProcessingLauncher":
            raise ValueError(
                "SICallback cannot bring SI's state back from the processes that this strategy "
                "spawns (ddp_spawn, or a start_method other than 'popen'): the trainer's process "
                "would keep the state it had before the fit. Use strategy='ddp', which runs "
                "your script on every rank.")

    def on_train_start(self, trainer, pl_module) -> None:
        """Binds the engine to the module, its optimizer and the precision plugin's scaler,
        and starts a task (one ``fit`` is one task)."""
        self._bind(trainer, pl_module)
        self._stepped = False
        self._trainer = trainer
        self.engine.start_task()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        """``before_step()``: the penalty's gradient added, θ before the step recorded (a
        batch that ``training_step`` skipped is skipped here too)."""
        if not any(p.grad is not None for p in pl_module.parameters()):
            # training_step returned None (Lightning's way to skip a batch): nothing to
            # measure, and the optimizer's step moves nothing
            self.engine._skip_step()
            return
        self.engine.before_step()
        self._stepped = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """``after_step(loss)`` for a batch whose optimizer stepped: the path integral."""
        if self._stepped:  # under accumulate_grad_batches, only the batches that stepped
            self._stepped = False
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            self.engine.after_step(loss if hasattr(loss, "detach") else None)

    def on_train_end(self, trainer, pl_module) -> None:
        """``end_task()``: consolidates Ω and θ* (with the default policy)."""
        self._trainer = None
        self.engine.end_task()

    def on_exception(self, trainer, pl_module, exception) -> None:
        """Forgets the fit that died; SI's state stays as the last step left it."""
        self._trainer = None  # a fit that died ends no task; the state stays as it was

    def state_dict(self) -> dict[str, Any]:
        """SI's state, for a Lightning checkpoint. Asked for during a fit (a `ModelCheckpoint`,
        or any callback, in any order), it is the state at that point of the fit: a step the
        optimizer took but this callback has not yet seen end is measured now (unless the
        policy is a `LossPlateau`, which needs the step's loss), and when the fit takes no
        more steps (its last epoch or step is done), the task is ended now, as it would be
        when the fit ends, so that a next task started from this checkpoint starts from the
        consolidated state."""
        trainer = self._trainer
        if trainer is not None:
            if self._stepped and self.engine._step_taken() and \
                    not self.engine.consolidate.needs_loss:
                self._stepped = False
                self.engine.after_step()
            if not self._stepped and _fit_takes_no_more_steps(trainer):
                self.engine.end_task()
        return self.engine.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a `state_dict()` into the engine (checked; see
        `SynapticIntelligence.load_state_dict`)."""
        self.engine.load_state_dict(state_dict)

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__, _trainer=None)


def _fit_takes_no_more_steps(trainer) -> bool:
    """Whether the fit in progress will take no more optimizer steps: its step limit reached,
    or its last epoch's batches all trained, or it was told to stop and may (Lightning's own
    loop state; False where it cannot be read)."""
    try:
        loop = trainer.fit_loop
        epochs = loop.epoch_loop
        if loop.done or (epochs.global_step >= loop.max_steps != -1):
            return True
        last_epoch = loop.max_epochs not in (None, -1) and \
            trainer.current_epoch + 1 >= loop.max_epochs  # (the epoch under way)
        return bool(last_epoch and epochs._num_ready_batches_reached())
    except AttributeError:  # pragma: no cover - another Lightning
        return False

r"""Synaptic Intelligence as an Avalanche plugin: Avalanche's hooks mapped onto the engine.

`SIPlugin` owns a `SynapticIntelligence` and translates
callbacks into its calls; the maths, the state and the options live there:

==========================  =================================================================
Avalanche hook              engine call
==========================  =================================================================
`before_training_exp`     `bind(strategy.model, strategy.optimizer, scaler=...)`,
                            `start_task(strategy.experience)`
`after_backward`          `before_step()` (the penalty's gradient, the weights before the
                            step)
`after_update`            `after_step(strategy.loss)` (the path integral)
`after_training_exp`      `end_task(strategy.experience)` (consolidation, by the policy)
`after_eval`              `invalidate()` if evaluation replaced parameters
==========================  =================================================================

The scaler is the `scaler=` option, else the `torch.amp.GradScaler` the strategy holds
as an attribute.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor
from avalanche.core import SupervisedPlugin

from . import amp
from ._compat import expose_torch_optim_submodules
from .consolidation import ConsolidationPolicy
from .engine import (  # _Group: pickles of version 0.2 name it as avalanche_si.plugin._Group
    CLAMP_MODES,
    IMPORTANCE_MODES,
    GroupOptions,
    ParamGroup,
    SynapticIntelligence,
    _Group,  # noqa: F401
    engine_from_fields,
)
from .estimators import Estimator
from .functional import DEFAULT_EPS
from .groups import Matcher
from .legacy import fields_from_v01
from .options import LIVE_OPTIONS, Strength, positional, refuse_attribute

__all__ = ["SIPlugin", "ParamGroup", "GroupOptions", "IMPORTANCE_MODES", "CLAMP_MODES"]

expose_torch_optim_submodules()  # so that Avalanche checkpoints can pickle optimizers


class SIPlugin(SupervisedPlugin, supports_distributed=True):
    r"""Synaptic Intelligence (Zenke, Poole & Ganguli, ICML 2017) for any Avalanche strategy.

    For every regularized weight `θ_k`:

    - after each optimizer step: `ω_k ← ω_k - g_k Δθ_k`;
    - after each experience: `Ω_k ← Ω_k + max(0, ω_k / ((θ_k - θ*_k)² + ξ))`, `θ*_k ← θ_k`,
      `ω_k ← 0` (`θ*` of the first experience is the
      weights when it starts);
    - from the second experience on the loss gets
      `c Σ_k Ω_k (θ_k - θ*_k)²` (no ½).

    The penalty's gradient `2cΩ ⊙ (θ - θ*)` is added in closed
    form after the backward pass (`after_backward`), so no graph is built for it; its
    value at the last step is `penalty` (computed when read, for logging; it is not
    part of `strategy.loss`). A plugin that rewrites gradients in its own
    `after_backward` sees the penalty's gradient if it comes after this plugin in the
    strategy's list, not if it comes before; after it, it must rewrite them in place (new
    gradient tensors are refused at the step: SI would not measure the step with them).

    Memory: Ω, `θ*`, ω and the weights before the
    step, `4n` numbers for `n` regularized weights (`3n` with
    `importance="delta_params"` or `"sos"`; `"task"` keeps `n` more, the gradient the
    optimizer steps with, reused from step to step), on each parameter's device, in the
    weights' dtype (float32 for 16-bit weights; see `state_dtype`). The state lives in the
    plugin, not in the model: `model.state_dict()` is unchanged.

    The plugin is a thin adapter: the work is done by its `engine`, a
    `SynapticIntelligence`, which a plain PyTorch loop or the Lightning
    callback drive the same way. The arguments are the engine's (see it for each in full);
    an experience is a task, and an index of strengths counts consolidations.

    Args:
        si_lambda: the strength c of the penalty (>= 0; 0 switches the penalty
            off and leaves training bit-identical to training without the plugin). A list
            gives one strength per experience (the last repeats), a callable
            `(experience_index) -> c` computes it, as Avalanche's plugin allows; the index
            counts the consolidations so far (on an ordinary stream: the experiences
            trained; on an online stream: the tasks, not the mini-experiences).
        eps: the damping `ξ > 0` of the consolidation (default 1e-3).
        excluded_parameters: name patterns (see `ParamGroup`) of parameters never
            regularized.
        groups: parameter groups, `{name: ParamGroup(...)}`, each with its own strength
            and damping; default one group holding every trainable parameter.
        importance: `"total"` (default: the gradient the optimizer used times the step
            taken), `"task"` (the gradient without the SI penalty, as this plugin's
            `after_backward` finds it, times the step taken; Zenke et al.'s code) or
            `"delta_params"` (that gradient times the step the optimizer would take from
            it alone; SGD, Adam, AdamW, RMSprop; 3n memory); Benzing's `"siu"`, `"sib"`
            and `"sos"` (the plugin draws their independent mini-batch itself); or an
            estimator object (`avalanche_si.estimators`).
        clamp: where the consolidation's `max(0, ·)` goes: `"task"` (default,
            each experience's contribution), `"total"` (Zenke et al.'s code: the running
            total) or `"none"` (van de Ven's code).
        regularize_norm_layers: also regularize the parameters of `BatchNorm` and
            `InstanceNorm` layers (default False, as Avalanche's
            `SynapticIntelligencePlugin`).
        state_dtype: the dtype of the state; None (default): float32 for 16-bit weights, else
            the weights' dtype.
        consolidate: when to consolidate (`avalanche_si.consolidation`): None (default)
            after each experience, or at the real task boundaries of an online stream that
            shows them (an error on one that hides them); `"experience"` after every
            experience, online ones included; `"boundary"` at task boundaries only; an
            `int` k every k optimizer steps (van de Ven's task-free SI); or a
            `LossPlateau` (Aljundi et al. 2019).
        scaler: the `torch.amp.GradScaler` that scales the loss, for mixed-precision
            training. None (default) uses the strategy's own if it has one as an
            attribute. The plugin unscales the gradients in `after_backward` (as PyTorch
            documents for gradient clipping: plugins after it see unscaled gradients and
            must not unscale again), so the penalty acts at the right scale, ω uses
            unscaled gradients and steps the scaler skips add nothing to ω.
        cuda_graphs: on a GPU, replay each step hook's work as a CUDA graph (one launch
            per hook and group; bit-identical results; n more numbers kept), for
            `importance="total"` and `"task"`. Default False (new; not yet measured on a
            GPU). See `avalanche_si.graphs`.

    `si_lambda`, `eps`, `clamp` and `scaler` may be assigned during training
    (checked like here; the strength applies from the next step, the damping and clamp at
    the next consolidation); so may each group's (`group()`). The other options are
    fixed: assigning them, or an unknown name, raises `AttributeError`.

    Raises:
        ValueError: on a bad option, here; when training starts, on an unsupported
            optimizer for `"delta_params"`, a parameter in two groups, a group that
            matches no parameter, or a state that does not fit the model.
        TypeError: an option of the wrong type.

    Example:
        ```python
        from avalanche.training import Naive
        from avalanche_si import SIPlugin

        si = SIPlugin(si_lambda=1.0, eps=0.1)
        strategy = Naive(model=model, optimizer=optimizer, plugins=[si])
        for experience in benchmark.train_stream:
            strategy.train(experience)
        ```
    """

    @positional("si_lambda")
    def __init__(self, si_lambda: Strength = 1.0, *, eps: float = DEFAULT_EPS,
                 excluded_parameters: Union[str, Sequence[str], None] = None,
                 groups: Optional[Mapping[str, Union[ParamGroup, Matcher]]] = None,
                 importance: Union[str, Estimator] = "total", clamp: str = "task",
                 regularize_norm_layers: bool = False,
                 state_dtype: Optional[torch.dtype] = None,
                 consolidate: Union[None, str, int, ConsolidationPolicy] = None,
                 scaler: Optional[torch.amp.GradScaler] = None,
                 cuda_graphs: bool = False):
        super().__init__()
        self._strategy: Optional[Callable[[], Any]] = None  # the strategy this plugin serves
        self._first_iteration = self._look_for_scaler = False
        self._engine = _adapted(SynapticIntelligence(
            si_lambda=si_lambda, eps=eps, excluded_parameters=excluded_parameters,
            groups=groups, importance=importance, clamp=clamp,
            regularize_norm_layers=regularize_norm_layers, state_dtype=state_dtype,
            consolidate=consolidate, scaler=scaler, cuda_graphs=cuda_graphs))

    @property
    def engine(self) -> SynapticIntelligence:
        """The engine this plugin drives (its options, state and maths)."""
        return self._engine

    # ------------------------------------------------------------------ options

    # The options and read-outs are the engine's, spelt out so that help() and the API pages
    # show each with its docstring.

    @property
    def si_lambda(self) -> Strength:
        """The strength c: a number, a list of them (one per experience; kept as a tuple) or
        a callable."""
        return self._engine.si_lambda

    @si_lambda.setter
    def si_lambda(self, value) -> None:
        self._engine.si_lambda = value

    @property
    def eps(self) -> float:
        """The damping ξ (used at the next consolidation)."""
        return self._engine.eps

    @eps.setter
    def eps(self, value) -> None:
        self._engine.eps = value

    @property
    def clamp(self) -> str:
        """Where the consolidation clamps at 0: `"task"`, `"total"` or `"none"`."""
        return self._engine.clamp

    @clamp.setter
    def clamp(self, value) -> None:
        self._engine.clamp = value

    @property
    def scaler(self) -> Optional[torch.amp.GradScaler]:
        """The GradScaler passed in (None: the strategy's own, found when training starts)."""
        return self._engine.scaler

    @scaler.setter
    def scaler(self, value) -> None:
        self._engine.scaler = value

    @property
    def importance(self) -> str:
        """Which gradient and step measure ω: the estimator's name."""
        return self._engine.importance

    @property
    def estimator(self) -> Estimator:
        """The importance estimator (`avalanche_si.estimators`) that `importance` names."""
        return self._engine.estimator

    @property
    def consolidate(self) -> ConsolidationPolicy:
        """When SI consolidates (a policy)."""
        return self._engine.consolidate

    @property
    def consolidations(self) -> int:
        """How many times SI has consolidated so far (the index a list of strengths is read
        at); on a task-free stream, check that the policy keeps firing."""
        return self._engine.consolidations

    @property
    def excluded_parameters(self) -> tuple[str, ...]:
        """The name patterns never regularized."""
        return self._engine.excluded_parameters

    @property
    def regularize_norm_layers(self) -> bool:
        """Whether normalization layers' parameters are regularized."""
        return self._engine.regularize_norm_layers

    @property
    def state_dtype(self) -> Optional[torch.dtype]:
        """The dtype option of the state."""
        return self._engine.state_dtype

    @property
    def cuda_graphs(self) -> bool:
        """Whether the per-step work is replayed as CUDA graphs where it can be."""
        return self._engine.cuda_graphs

    @property
    def penalty(self) -> Optional[Tensor]:
        """The SI penalty `Σ_g c_g Σ Ω (θ - θ*)²` at the last step, a 0-d tensor (None before
        the first penalized step); computed when read, for logging, and not part of
        `strategy.loss`."""
        return self._engine.penalty

    @property
    def group_names(self) -> list[Optional[str]]:
        """The groups' names (`None` for the default group)."""
        return self._engine.group_names

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_") or name in LIVE_OPTIONS:
            super().__setattr__(name, value)
        else:
            refuse_attribute(type(self), name)

    def group(self, key: Optional[str] = None) -> GroupOptions:
        """The live options of group `key` (None: the default group)."""
        return self._engine.group(key)

    def importances(self, group: Optional[str] = None) -> dict[str, Tensor]:
        r"""The consolidated importances Ω of one group, by parameter name.

        The tensors are the live state: read, do not modify them.
        """
        return self._engine.importances(group)

    def consolidate_now(self) -> None:
        r"""Consolidate now: `Ω += max(0, ω / ((θ - θ*)² + ξ))`, `θ* ← θ`, `ω ← 0`, as the
        engine's `consolidate_now()` (its errors and
        when it does nothing). The `consolidate` policy calls it; a subclass that overrides it
        sees every consolidation."""
        self._engine.consolidate_now()

    def restart_path(self) -> None:
        r"""The weights were moved (re-initialised) since the last consolidation: measure this
        task's path length from here, not from θ*; the engine's `restart_path()`. Call it from
        a plugin's `before_training_exp`, placed after this one in the plugin list."""
        self._engine.restart_path()

    # -------------------------------------------------------------------- the hooks

    def _bind(self, strategy) -> None:
        # one plugin, one run: the state may follow a new model object of the same strategy
        # (GDumb builds one per experience), never one of another strategy
        same_run = self._strategy is None or self._strategy() is strategy
        found = None if self._engine.scaler is not None else amp.find_scaler(strategy)
        self._engine.bind(strategy.model, strategy.optimizer, scaler=found, carry_state=same_run)
        self._strategy = _reference(strategy)

    def reset(self) -> None:
        """Forget everything SI learnt (Ω, θ*, ω, consolidations, the policy's state); the
        options stay. For another run (a new seed) with the same plugin object."""
        self._engine.reset()
        self._strategy = None

    def before_training_exp(self, strategy, **kwargs) -> None:
        """Binds to the strategy's model, optimizer and scaler and starts a task (a policy
        that consolidates on a new task label does so here)."""
        self._bind(strategy)
        self._first_iteration = self._look_for_scaler = True
        self._independent = None  # "siu"/"sib": a loader of this experience, made when needed
        if self._engine._start_task(getattr(strategy, "experience", None)):
            self.consolidate_now()  # a task boundary seen as the next task starts

    def after_eval(self, strategy, **kwargs) -> None:
        """Notes parameters that evaluation replaced (new heads, grown classifiers)."""
        # Evaluation may adapt the model (new heads, grown classifiers): rebuild the
        # lists before the next training step if the parameter objects changed.
        if strategy.model is not self._engine.model:
            self._engine.invalidate()
        else:
            self._engine.parameters_replaced()

    def after_backward(self, strategy, **kwargs) -> None:
        """``before_step()``: the penalty's gradient added to ``.grad``, θ before the step
        recorded (``"siu"``/``"sib"``/``SOS(alpha≠0)``: their independent mini-batch's
        gradient first)."""
        engine = self._engine
        if strategy.model is not engine.model or strategy.optimizer is not engine.optimizer:
            self._bind(strategy)
        elif self._look_for_scaler:  # once per experience: a scaler made at the first backward
            self._look_for_scaler = False
            if engine.scaler is None and engine._binding.scaler is None:
                self._bind(strategy)
        if engine.estimator.independent_gradient:
            engine.record_independent_gradient(self._independent_loss(strategy))
        engine.before_step()

    # ------------------------------------------------ the independent mini-batch (siu, sib)

    _independent: Optional[Iterator] = None

    def _independent_loss(self, strategy) -> Tensor:
        """The strategy's loss on a mini-batch of the current experience drawn independently
        of the step's one, through the strategy's own `forward()` and `criterion()` (so a
        template's autocast or multi-head forward applies), at the weights before the step."""
        saved = strategy.mbatch, strategy.mb_output
        model = strategy.model
        try:
            strategy.mbatch = self._next_independent_batch(strategy)
            if isinstance(model, torch.nn.parallel.DistributedDataParallel):
                strategy.model = model.module  # DDP's hooks are for the step's backward
            strategy.mb_output = strategy.forward()
            return strategy.criterion()
        finally:
            strategy.model = model
            strategy.mbatch, strategy.mb_output = saved

    def _next_independent_batch(self, strategy) -> list:
        """The next mini-batch of this experience's own shuffled loader (the strategy's batch
        size; seeded from torch's initial seed and the experience, so runs repeat), restarted
        when it runs out."""
        if self._independent is None:
            from torch.utils.data import DataLoader

            data = strategy.adapted_dataset
            seed = torch.initial_seed() + 7919 * (self._engine.consolidations + 1)
            loader = DataLoader(data, batch_size=strategy.train_mb_size, shuffle=True,
                                collate_fn=getattr(data, "collate_fn", None),
                                generator=torch.Generator().manual_seed(seed % 2**63))
            self._independent = _cycle(loader)
        return [t.to(strategy.device, non_blocking=True) for t in next(self._independent)]

    def after_training_iteration(self, strategy, **kwargs) -> None:
        """Refuses, at a task's first iteration, a template that never calls
        ``after_backward`` and ``after_update`` (SI would measure nothing)."""
        if self._first_iteration:  # once per experience
            self._first_iteration = False
            steps = self._engine._stepper
            if steps.task_steps == 0 and steps.in_step:
                raise RuntimeError(
                    f"SIPlugin: {type(strategy).__name__}'s template ran after_backward without "
                    "after_update in a training iteration; SIPlugin needs both once per "
                    "optimizer step (call after_update on every iteration, stepping or not).")
            if steps.task_steps == 0:
                raise RuntimeError(
                    f"SIPlugin saw a training iteration in which "
                    f"{type(strategy).__name__}'s template does not call after_backward and "
                    "after_update (MER and LaMAML do not), so SI would measure nothing. Use "
                    "a SupervisedTemplate strategy, or call the engine from your template (see "
                    "the guide 'SI in your own training loop').")

    def after_update(self, strategy, **kwargs) -> None:
        """``after_step(loss)``: the path integral of the step (and a consolidation, if the
        policy says so)."""
        if self._engine._after_step(getattr(strategy, "loss", None)):
            self.consolidate_now()

    def after_training_exp(self, strategy, **kwargs) -> None:
        """``end_task()``: consolidates Ω and θ* (with the default policy)."""
        if strategy.model is not self._engine.model:
            self._bind(strategy)
        if self._engine._end_task(getattr(strategy, "experience", None)):
            self.consolidate_now()

    # ------------------------------------------------------------- saving and loading

    def state_dict(self) -> dict[str, Any]:
        """The plugin's state: every group's buffers and parameter index (tensors cloned),
        the number of consolidations and the consolidation policy's state."""
        return self._engine.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> None:
        """Load a `state_dict()`, checked, as the engine's
        `load_state_dict()` does (nothing changes on an
        error; `strict=False` keeps state for parameters the model lacks unused)."""
        self._engine.load_state_dict(state_dict, strict=strict)

    def __getstate__(self) -> dict[str, Any]:
        # the strategy is bound again when training resumes (a weak reference does not pickle)
        # (nor does a generator: the independent loader starts afresh)
        return dict(self.__dict__, _strategy=None, _independent=None)

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "_store" in state:  # pickled by avalanche_si 0.1 (an older Avalanche checkpoint)
            state = fields_from_v01(state)
        if "_engine" not in state:  # pickled by 0.1 or 0.2: the engine's fields on the plugin
            state = {"_engine": _adapted(engine_from_fields(state))}
        self.__dict__.update({"_strategy": None, "_first_iteration": False,
                              "_look_for_scaler": False, **state})

    def __repr__(self) -> str:
        return repr(self._engine).replace(type(self._engine).__name__, type(self).__name__, 1)


def _reference(strategy) -> Callable[[], Any]:
    """A weak reference to the strategy; a strong one for objects that take none (a
    duck-typed strategy), never an id, which a new object may reuse."""
    try:
        return weakref.ref(strategy)
    except TypeError:
        return lambda: strategy


def _cycle(loader) -> Iterator:
    """The loader's batches, again and again (each pass in a new order)."""
    while True:
        yield from loader


def _adapted(engine: SynapticIntelligence) -> SynapticIntelligence:
    """The engine, with its messages naming the plugin."""
    engine._owner, engine._noun = "SIPlugin", "plugin"
    engine._between_steps = ("the strategy's template ran after_backward without "
                             "after_update; SIPlugin needs both on every iteration")
    return engine

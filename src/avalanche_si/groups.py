r"""Which parameters SI regularizes, under which names, in which group.

State is keyed by parameter *name*, so a name must mean the same weight however the model
is wrapped. `canonical_name()` removes what wrappers add: `module.` of
`DataParallel`/`DistributedDataParallel` and `_orig_mod.` of `torch.compile` (at
the top or on any compiled submodule), so state moves freely between a plain, a compiled
and a distributed model, and patterns match the same names on all of them.

`select()` runs once per experience: it walks the model, drops frozen and excluded
parameters and (by default, as Avalanche's own plugin does) those of normalization layers,
and assigns each remaining parameter to exactly one group.

Nothing here imports Avalanche.
"""

from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch.nn.modules.batchnorm import _NormBase

from .options import OptionTypeError

__all__ = ["ParamGroup", "Matcher", "canonical_name", "select", "unwrap"]

Matcher = Union[str, Sequence[str], Callable[[str, torch.nn.Parameter], bool]]

#: what `torch.compile` inserts in parameter names (`OptimizedModule._orig_mod`)
_COMPILED = "_orig_mod"


@dataclass(frozen=True)
class ParamGroup:
    r"""A set of parameters that carries its own SI.

    Args:
        params: which parameters belong to the group: a name pattern or a list of
            them (`fnmatch` globs such as `"features.*"`; a plain name also
            matches every parameter below it, so `"classifier"` covers
            `"classifier.weight"`), or a callable `(name, parameter) -> bool`.
            Names are those of the plain model (see `canonical_name()`).
        si_lambda: the strength c of this group's penalty (a number, a list with
            one per experience, or a callable of the experience index); `None` follows
            the plugin's `si_lambda`.
        eps: the damping ξ of this group's consolidation; `None` follows the
            plugin's `eps`.
    """

    params: Matcher
    si_lambda: Any = None
    eps: Optional[float] = None


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module under `(Distributed)DataParallel` and `torch.compile` wrappers."""
    wrappers = (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)
    while True:
        if isinstance(model, wrappers):
            model = model.module
        elif isinstance(getattr(model, _COMPILED, None), torch.nn.Module):
            model = getattr(model, _COMPILED)
        else:
            return model


def canonical_name(name: str) -> str:
    """A parameter's name without the `_orig_mod` segments `torch.compile` inserts (on
    the whole model or on any submodule). `module.` of the DDP wrapper never reaches a
    name: `unwrap()` removes that wrapper by type (a submodule that is really called
    `module` keeps its name)."""
    parts = [p for p in name.split(".") if p != _COMPILED]
    return ".".join(parts)


def canonical_pattern(pattern: str) -> str:
    """A pattern written against a compiled model's names matches the plain names too."""
    return canonical_name(pattern) or pattern


def as_patterns(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    try:
        patterns = tuple(value)
    except TypeError:
        raise OptionTypeError(f"{what} must be a name pattern, a list of them or a callable "
                              f"(name, parameter) -> bool, got {value!r}.") from None
    if not all(isinstance(p, str) for p in patterns):
        raise OptionTypeError(f"{what} must hold non-empty strings (name patterns), got "
                              f"{value!r}.")
    if not all(patterns):
        raise ValueError(f"{what} must hold non-empty strings (name patterns), got {value!r}.")
    return tuple(canonical_pattern(p) for p in patterns)


def matches(name: str, patterns: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") or fnmatch.fnmatchcase(name, p)
               for p in patterns)


def norm_layer_parameters(model: torch.nn.Module) -> set[str]:
    """Canonical names of the parameters of normalization layers (torch's `_NormBase`:
    BatchNorm, SyncBatchNorm, InstanceNorm; not LayerNorm or GroupNorm), the ones
    Avalanche's `SynapticIntelligencePlugin` never regularizes."""
    out = set()
    for mod_name, module in model.named_modules():
        if isinstance(module, _NormBase):
            for p_name, _ in module.named_parameters(recurse=False):
                out.add(canonical_name(f"{mod_name}.{p_name}" if mod_name else p_name))
    return out


def sparse_gradient_parameters(model: torch.nn.Module) -> set[str]:
    """Canonical names of parameters that get sparse gradients (`nn.Embedding` and
    `nn.EmbeddingBag` built with `sparse=True`)."""
    out = set()
    for mod_name, module in model.named_modules():
        if getattr(module, "sparse", False) is True:
            for p_name, _ in module.named_parameters(recurse=False):
                out.add(canonical_name(f"{mod_name}.{p_name}" if mod_name else p_name))
    return out


def select(model: torch.nn.Module, groups: Sequence, excluded: Sequence[str], *,
           regularize_norm_layers: bool, check_patterns: bool
           ) -> list[tuple[Any, str, torch.nn.Parameter]]:
    """The regularized parameters, in the model's order, as `(group, name, parameter)`.

    `groups` are objects with a `covers(name, parameter)` method and a `key`. With
    `check_patterns` (the first experience), patterns are checked against every parameter
    name of the model, frozen ones included: a typo must not switch SI off silently.

    Raises:
        ValueError: a parameter is in two groups, a regularized parameter gets sparse
            gradients, or (`check_patterns`) a group covers no parameter of the model.

    Warns:
        UserWarning: (`check_patterns`) an `excluded_parameters` pattern matches no name.
    """
    plain = unwrap(model)
    norms = set() if regularize_norm_layers else norm_layer_parameters(plain)
    named = [(canonical_name(n), p) for n, p in plain.named_parameters()]
    if check_patterns:
        _check_patterns(named, groups, excluded)
    out = []
    for name, p in named:
        if not p.requires_grad or name in norms or matches(name, excluded):
            continue
        hits = [g for g in groups if g.covers(name, p)]
        if len(hits) > 1:
            raise ValueError(f"parameter {name!r} is in SI groups {[g.key for g in hits]}; a "
                             "parameter may be in one group only: narrow the groups' patterns.")
        if hits:
            out.append((hits[0], name, p))
    sparse = sparse_gradient_parameters(plain) & {name for _, name, _ in out}
    if sparse:
        raise ValueError(f"SI needs dense gradients, but {', '.join(map(repr, sorted(sparse)))} "
                         "get sparse ones (an embedding built with sparse=True): build it with "
                         "sparse=False, or leave it out with excluded_parameters=[...].")
    return out


def _check_patterns(named, groups, excluded) -> None:
    examples = ", ".join(repr(n) for n, _ in named[:4]) + (", ..." if len(named) > 4 else "")
    for pattern in excluded:
        if not any(matches(n, (pattern,)) for n, _ in named):
            warnings.warn(f"SIPlugin: excluded_parameters pattern {pattern!r} matches no "
                          f"parameter of the model (names look like {examples}); it excludes "
                          "nothing.", stacklevel=6)
    empty = [g.key for g in groups if not any(g.covers(n, p) for n, p in named)]
    if empty == [None]:
        raise ValueError("SI has no parameter to regularize: the model has none.")
    if empty:
        raise ValueError(f"SI group(s) {', '.join(map(repr, empty))} match no parameter of the "
                         f"model (names look like {examples}), so SI would be off for them: fix "
                         "their patterns, or leave them out.")

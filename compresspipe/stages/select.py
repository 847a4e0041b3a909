"""Layer selectors shared by prune, quantize and factorize: name globs and `type:ClassName`."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from compresspipe.errors import StageConfigError

if TYPE_CHECKING:
    from torch import nn


def matches(name: str, module: nn.Module, pattern: str) -> bool:
    if pattern.startswith("type:"):
        wanted = pattern[5:]
        return any(cls.__name__ == wanted for cls in type(module).__mro__)
    return fnmatch.fnmatchcase(name, pattern)


def select_layers(
    model: nn.Module,
    include: Iterable[str],
    exclude: Iterable[str],
    candidates: tuple[type, ...],
    stage: str,
    allow_empty: bool = False,
) -> dict[str, nn.Module]:
    """Modules of the candidate types matched by include and not by exclude, in model order.

    A name selector that matches no module at all is an error naming it (a typo, most likely); a `type:`
    selector may match nothing, since a recipe shared across architectures names kinds of layers some models
    lack. A selection that ends empty is an error unless `allow_empty` (the stage then leaves the model as is).
    """
    include, exclude = list(include), list(exclude)
    named: list[tuple[str, nn.Module]] = [(n, m) for n, m in model.named_modules() if n]
    for pattern in include + exclude:
        if pattern.startswith("type:"):
            continue
        if not any(matches(n, m, pattern) for n, m in named):
            layer_names = [n for n, m in named if isinstance(m, candidates)]
            shown = ", ".join(layer_names[:12]) + (" ..." if len(layer_names) > 12 else "")
            raise StageConfigError(stage, f"selector {pattern!r} matches no layer; layers here: {shown}")
    chosen = {
        n: m for n, m in named
        if isinstance(m, candidates)
        and any(matches(n, m, p) for p in include)
        and not any(matches(n, m, p) for p in exclude)
    }
    if not chosen and not allow_empty:
        kinds = ", ".join(c.__name__ for c in candidates)
        raise StageConfigError(stage, f"include {include} / exclude {exclude} leave no {kinds} layer to work on")
    return chosen


def classifier_head(model: nn.Module) -> str | None:
    """Name of the last Linear layer (the classifier head protected by default), if any."""
    from torch import nn

    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    return last


def breaks_model(model: nn.Module, replacements: dict[str, nn.Module], io: Any) -> dict[str, str]:
    """The replacements the model's own code cannot run with (e.g. Hugging Face ViT reads its patch projection's
    `.weight.dtype`), each with the error: tried all at once on a copy, then one by one only if that fails."""
    import copy

    import torch

    from compresspipe.metrics.modes import eval_mode, model_device
    from compresspipe.models.inputs import forward, zeros

    def error(names: list[str]) -> str | None:
        trial = copy.deepcopy(model)
        for name in names:
            parent, _, child = name.rpartition(".")
            setattr(trial.get_submodule(parent) if parent else trial, child, copy.deepcopy(replacements[name]))
        try:
            with eval_mode(trial), torch.no_grad():
                forward(trial, zeros(io, 1, device=model_device(trial)))
        except Exception as exc:  # the model's code relies on the layer being what it was
            return f"{type(exc).__name__}: {str(exc).strip()[:160]}"
        return None

    if not replacements or error(list(replacements)) is None:
        return {}
    out = {}
    for name in replacements:
        why = error([name])
        if why is not None:
            out[name] = f"the model's code needs this layer as it is ({why})"
    return out

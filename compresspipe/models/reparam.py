"""The inference form of a model whose blocks train with parallel branches (RepVGG, MobileOne, RepGhost, FastViT).

Such a block trains as several convolutions and BatchNorms added together and folds them into one convolution for
inference (`reparameterize()` in timm, `switch_to_deploy()` in RepVGG's and MMCV's code). The PyTorch model keeps its
training form (a later stage may fine-tune or prune it); the deploy files are written from a folded copy: the same
function, fewer and cheaper nodes, and nothing an int8 file must keep in float (an identity branch's BatchNorm
cannot fold into a convolution).
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

from torch import nn

REPARAM_METHODS = ("reparameterize", "switch_to_deploy")


def _method(module: nn.Module) -> Any:
    """The module's folding method, if it has one that takes no arguments (a VAE's `reparameterize(mu, logvar)`
    samples a latent: not this)."""
    for name in REPARAM_METHODS:
        fn = getattr(module, name, None)
        if not callable(fn):
            continue
        try:
            params = inspect.signature(fn).parameters.values()
        except (TypeError, ValueError):
            continue
        if all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
            return fn
    return None


def reparameterizable(module: nn.Module) -> list[str]:
    """Names of the submodules that can fold their branches (outermost only: a block folds its children)."""
    found: list[str] = []
    for name, sub in module.named_modules():
        if _method(sub) is not None and not any(name.startswith(f + ".") or f == "" for f in found):
            found.append(name)
    return found


def inference_form(module: nn.Module) -> tuple[nn.Module, int]:
    """A copy of `module` with every re-parameterizable block folded, and how many were folded; `module` itself
    when none can be. The copy keeps eval mode; blocks fold with the running statistics of their BatchNorms.
    A block whose folding raises leaves the whole model in its training form (the error propagates: a half-folded
    copy is never returned)."""
    names = reparameterizable(module)
    if not names:
        return module, 0
    folded = copy.deepcopy(module).eval()
    for name in names:
        _method(folded.get_submodule(name))()
    return folded.eval(), len(names)

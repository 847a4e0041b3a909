"""Graph helpers stages share: which convolution feeds which BatchNorm, which activation follows a layer
(torch.fx), and folding a BatchNorm into the convolution before it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS: dict[type, Callable[[torch.Tensor], torch.Tensor]] = {nn.ReLU: F.relu, nn.ReLU6: F.relu6}
ACT_FUNCTIONS: dict[Any, Callable[[torch.Tensor], torch.Tensor]] = {
    F.relu: F.relu, torch.relu: F.relu, F.relu6: F.relu6,
}


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer, with libraries' BatchNorm subclasses (timm's BatchNormAct2d) kept whole, so they are
    found after their convolution instead of being traced into functional calls."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, nn.BatchNorm2d) or super().is_leaf_module(m, module_qualified_name)


def analyse(model: nn.Module, fold: bool) -> tuple[dict[str, str], dict[str, Callable], str | None]:
    """(conv -> BatchNorm to fold, layer -> activation to fuse, why tracing failed or None)."""
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # data-dependent control flow etc.: quantize without folding/fusion
        return {}, {}, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    folds: dict[str, str] = {}
    acts: dict[str, Callable] = {}
    for node in graph.nodes:
        if node.op != "call_module" or calls[node.target] != 1:
            continue
        layer = modules[node.target]
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            continue
        tail = node
        if fold and isinstance(layer, nn.Conv2d) and len(node.users) == 1:
            user = next(iter(node.users))
            bn = modules.get(user.target) if user.op == "call_module" else None
            if (isinstance(bn, nn.BatchNorm2d) and calls[user.target] == 1 and bn.track_running_stats
                    and bn.num_features == layer.out_channels and bn.running_mean is not None
                    and (type(bn).forward is nn.BatchNorm2d.forward or norm_act_parts(bn) is not None)):
                folds[node.target] = user.target
                tail = user
        if len(tail.users) == 1:
            user = next(iter(tail.users))
            act = None
            if user.op == "call_module":
                act = ACTIVATIONS.get(type(modules.get(user.target)))
            elif user.op == "call_function":
                act = ACT_FUNCTIONS.get(user.target)
            elif user.op == "call_method" and user.target == "relu":
                act = F.relu
            if act is not None:
                acts[node.target] = act
    return folds, acts, None


def norm_act_parts(bn: nn.Module) -> nn.Module | None:
    """What follows the normalisation in a library's fused BatchNorm+activation layer (timm's BatchNormAct2d:
    `drop` then `act`), as one module that replaces it once the BatchNorm is folded; None if not such a layer."""
    drop, act = getattr(bn, "drop", None), getattr(bn, "act", None)
    if not isinstance(drop, nn.Module) or not isinstance(act, nn.Module) or type(bn).__name__ != "BatchNormAct2d":
        return None
    return nn.Sequential(drop, act)


def fold_target(bn: nn.Module) -> nn.Module:
    """The module a folded BatchNorm becomes: Identity, or a fused layer's activation (timm's BatchNormAct2d)."""
    return norm_act_parts(bn) or nn.Identity()


def fold_bn(conv: Any, bn: Any) -> None:
    """Fold an eval-mode BatchNorm into the convolution before it (the conv gains a bias)."""
    with torch.no_grad():
        std = torch.sqrt(bn.running_var + bn.eps)
        gamma = bn.weight if bn.affine else torch.ones_like(std)
        beta = bn.bias if bn.affine else torch.zeros_like(std)
        factor = gamma / std
        conv.weight.mul_(factor.reshape(-1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        new_bias = (bias - bn.running_mean) * factor + beta
        conv.bias = nn.Parameter(new_bias.detach().clone())

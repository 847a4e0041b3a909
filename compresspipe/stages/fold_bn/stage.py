"""The fold_bn stage: each conv -> BatchNorm pair becomes one conv with a bias, recorded as `replace` edits."""

from __future__ import annotations

import copy

import torch
from torch import nn

from compresspipe.artifacts.edits import get_submodule, replace_edit
from compresspipe.artifacts.model import ModelState
from compresspipe.errors import StageConfigError
from compresspipe.stages.base import Stage, StagePlan, StageResult
from compresspipe.stages.context import StageContext
from compresspipe.stages.fold_bn import FoldBatchNormConfig
from compresspipe.stages.graph import analyse, fold_bn
from compresspipe.stages.select import select_layers


class FoldBatchNormStage(Stage[FoldBatchNormConfig]):
    def _pairs(self, model: nn.Module, stage: str) -> tuple[dict[str, str], str | None]:
        cfg = self.config
        chosen = select_layers(model, cfg.include, cfg.exclude, (nn.Conv2d,), stage)
        folds, _, why = analyse(model, fold=True)
        return {c: b for c, b in folds.items() if c in chosen and type(chosen[c]) is nn.Conv2d}, why

    def plan(self, state: ModelState, ctx: StageContext) -> StagePlan:
        pairs, why = self._pairs(state.module, ctx.name)
        return StagePlan(layers=dict(pairs), notes=[f"folds {len(pairs)} BatchNorm(s)"
                                                    + (f"; the model does not trace ({why})" if why else "")])

    def run(self, state: ModelState, ctx: StageContext) -> StageResult:
        model = state.module.to("cpu").eval()
        pairs, why = self._pairs(model, ctx.name)
        if not pairs:
            raise StageConfigError(ctx.name, "found no convolution followed by a BatchNorm to fold"
                                             + (f" (the model does not trace with torch.fx: {why})" if why else ""))
        x = torch.cat([x for x, _ in ctx.batches("val", 2)])
        with torch.no_grad():
            before = model(x)
        rows = []
        for conv_name, bn_name in pairs.items():
            conv = copy.deepcopy(get_submodule(model, conv_name))
            fold_bn(conv, get_submodule(model, bn_name))  # the conv gains a bias if it had none
            state.apply(replace_edit(conv_name, conv))
            get_submodule(state.module, conv_name).load_state_dict(conv.state_dict())
            state.apply(replace_edit(bn_name, nn.Identity()))
            rows.append({"conv": conv_name, "batchnorm": bn_name})
        state.module.eval()
        with torch.no_grad():
            diff = float((state.module(x) - before).abs().max())
        scale = float(before.abs().max()) if before.numel() else 0.0
        limit = self.config.atol + self.config.rtol * scale
        if not diff <= limit:
            raise StageConfigError(ctx.name, f"folding changed the outputs by {diff:.3g} > atol {self.config.atol:g} + "
                                             f"rtol {self.config.rtol:g} x the largest |output| {scale:.3g} "
                                             f"(= {limit:.3g})")
        return StageResult(state=state, kind="structural", details={"max_abs_diff": diff,
                                                                    "tables": {"folded": rows}},
                           notes=[f"{len(rows)} BatchNorm(s) folded into the convolution before them; outputs change "
                                  f"by at most {diff:.2g}. ONNX Runtime and XNNPACK fold at load time anyway, so "
                                  "their files gain nothing; PyTorch eager runs one layer fewer per pair"])

"""`fold_bn`: fold each BatchNorm into the convolution before it; the model computes the same with fewer layers.

An eval-mode BatchNorm after a convolution is an affine map per channel, so it can live in the convolution's
weights and bias. The folded model gives the same outputs (up to float rounding) with one layer fewer per pair:
faster in PyTorch eager and in runtimes that do not fold themselves. ONNX Runtime and XNNPACK already fold at
load time, so their files gain nothing (the report shows it). Run it after training: a folded model has no
BatchNorm statistics left to update.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from compresspipe.stages.base import StageConfig
from compresspipe.stages.common import SELECTOR_HELP, Selector


class FoldBatchNormConfig(StageConfig):
    """Fold BatchNorm into the preceding convolution: same outputs, fewer layers."""

    type: Literal["fold_bn"]
    include: Selector = Field(default_factory=lambda: ["*"], description=f"convolutions to fold into; {SELECTOR_HELP}")
    exclude: Selector = Field(default_factory=list, description=SELECTOR_HELP)
    atol: float = Field(1e-4, gt=0, description="largest allowed output change on validation batches, plus rtol "
                                                 "times the largest |output| (else exit 3)")
    rtol: float = Field(1e-4, ge=0, description="allowed change relative to the largest |output| (float32 rounding "
                                                "grows with the outputs' scale); 0 judges by atol alone")

    implementation: ClassVar[str] = "compresspipe.stages.fold_bn.stage:FoldBatchNormStage"
    example: ClassVar[dict[str, Any]] = {"type": "fold_bn"}

"""`factorize`: low-rank factorization of Linear and Conv2d layers (truncated SVD, or Tucker-2 for convolutions).

A weight W (m x n) close to rank r costs r(m + n) parameters as two thin factors instead of mn. Each selected
layer becomes a small `nn.Sequential` of plain torch layers, recorded as a `replace` edit, so the artifact
reloads (and exports) without custom modules. Ranks come from a rule the user states; a layer where the rank
saves nothing (or less than `min_saving`) is kept as it is, and the report says why.

- Linear(n -> m): W = U S V^T truncated to r, then Linear(n, r, bias=False) with sqrt(S) V^T and
  Linear(r, m) with U sqrt(S) and the original bias (the singular values are split between the factors).
- Conv2d, svd: the same on W reshaped to (out, in*kh*kw): a kh x kw conv with r filters (stride, padding and
  dilation of the original) then a 1x1 conv r -> out with the bias.
- Conv2d, tucker: Tucker-2 by HOSVD (SVD of the output- and input-channel unfoldings): 1x1 conv in -> r_in,
  kh x kw conv r_in -> r_out (the core), 1x1 conv r_out -> out with the bias. 1x1 convs and Linear layers use
  svd either way (Tucker-2 of a matrix is its SVD). Grouped convolutions are skipped.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, PositiveInt, model_validator

from compresspipe.recipe.spec import StrictModel
from compresspipe.recipe.training import FinetuneSettings
from compresspipe.stages.base import StageConfig
from compresspipe.stages.common import SELECTOR_HELP, Selector

RULES = ("energy", "ratio", "fixed", "max_accuracy_drop")
# rank ratios a layer's sensitivity is measured at (`compresspipe sensitivity`, rank: {max_accuracy_drop: ...})
SENSITIVITY_RATIOS = (0.1, 0.25, 0.5, 0.75)


class RankRule(StrictModel):
    """How many ranks a layer keeps: exactly one of energy, ratio, fixed or max_accuracy_drop."""

    energy: float | None = Field(
        None, gt=0, le=1, description="smallest rank keeping this fraction of the sum of squared singular values"
    )
    ratio: float | None = Field(None, gt=0, le=1, description="ceil(ratio x full rank) of each layer")
    fixed: PositiveInt | None = Field(None, description="this rank in every layer (must not exceed its full rank)")
    max_accuracy_drop: float | None = Field(
        None, ge=0, le=1, description="each layer gets the smallest rank ratio (of 0.1, 0.25, 0.5, 0.75) that keeps "
                                      "the accuracy drop of the factorized model, before fine-tuning, within this; "
                                      "layers that cannot stay whole")

    @model_validator(mode="after")
    def _exactly_one(self) -> RankRule:
        given = [k for k in RULES if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one rank rule: {energy: 0.9} (keep 90% of the squared singular values), "
                "{ratio: 0.25} (a quarter of each layer's full rank), {fixed: 64} or {max_accuracy_drop: 0.01} (the "
                "smallest ranks within that accuracy drop)"
                + (f" (got {' and '.join(given)})" if given else "")
            )
        return self

    def describe(self) -> str:
        key = next(k for k in RULES if getattr(self, k) is not None)
        return f"{key} {getattr(self, key)}"


class FactorizeConfig(StageConfig):
    """Low-rank factorization: Linear/Conv2d layers become two (svd) or three (tucker) thinner layers."""

    type: Literal["factorize"]
    method: Literal["svd", "tucker"] = Field(
        "svd",
        description="svd: Linear as two Linears, Conv2d as a k x k conv of r filters then a 1x1 conv; "
        "tucker: Conv2d as Tucker-2 (1x1 -> k x k -> 1x1), Linear and 1x1 convs still by svd",
    )
    rank: RankRule = Field(description="rank rule: {energy: 0.9}, {ratio: 0.25}, {fixed: 64} or "
                                       "{max_accuracy_drop: 0.01}")
    include: Selector = Field(default_factory=lambda: ["*"], description=SELECTOR_HELP)
    exclude: Selector = Field(default_factory=list, description=SELECTOR_HELP)
    min_saving: float = Field(
        0.1, ge=0, lt=1, description="skip a layer unless it saves at least this fraction of its parameters"
    )
    finetune: FinetuneSettings | None = Field(None, description="recovery training afterwards (none: no training)")

    implementation: ClassVar[str] = "compresspipe.stages.factorize.stage:FactorizeStage"
    example: ClassVar[dict[str, Any]] = {"type": "factorize", "rank": {"ratio": 0.25}, "finetune": {"epochs": 1}}

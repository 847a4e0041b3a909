"""`prune`: remove weights (magnitude: mask-only) or whole channels (structured/random: layers really shrink).

Structured pruning follows the dependencies between layers (residual additions, concatenations, batch norm,
grouped and depthwise convolutions) with Torch-Pruning's dependency graph, then records a `resize` edit so
the smaller model reloads from its artifact. In transformers it removes whole attention heads (`heads`) and MLP
width; the residual stream (the hidden size) is pruned only with `hidden: true`. Magnitude pruning folds its masks into the weights: no hooks
are left, and the report marks the stage mask-only because shapes, bytes and latency do not change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import Field, PositiveInt, model_validator

from compresspipe.recipe.base import StrictModel
from compresspipe.recipe.training import FinetuneSettings
from compresspipe.stages.base import StageConfig
from compresspipe.stages.common import SELECTOR_HELP, Selector

if TYPE_CHECKING:
    from compresspipe.recipe.spec import Recipe

Amount = Annotated[float, Field(ge=0, lt=1)]
Share = Annotated[float, Field(gt=0, lt=1)]
TARGETS = ("macs", "params", "latency_b1")
# structured pruning ratios a layer's sensitivity curve is measured at (`compresspipe sensitivity`, target allocation)
SENSITIVITY_RATIOS = (0.1, 0.3, 0.5, 0.7, 0.9)

MASK_ONLY_NOTE = ("mask-only: parameters and bytes unchanged, no latency gain expected; "
                  "use method: structured for a smaller/faster model")


class PruneFinetune(FinetuneSettings):
    """Recovery training after each pruning step, optionally distilling from an earlier model."""

    distill: str | None = Field(
        None, description="teacher for knowledge distillation while fine-tuning: baseline or an earlier stage's name"
    )
    temperature: float = Field(4.0, gt=0, description="softmax temperature of the distillation loss")
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the distillation loss; 1 - alpha goes to the labels")


class PruneTarget(StrictModel):
    """What the pruned model must reach instead of an amount: the share of the unpruned model's MACs, parameters or
    batch-1 latency that remains (macs: 0.25 = a quarter of the MACs, 4x fewer). The per-layer amounts follow from
    it and are reported (pruning.json, the per-layer table, `compresspipe plan`)."""

    macs: Share | None = Field(None, description="share of the MACs that remains")
    params: Share | None = Field(None, description="share of the parameters that remains")
    latency_b1: Share | None = Field(
        None, description="share of the batch-1 latency that remains, timed in the deploy runtime (its float file), "
                          "interleaved with the unpruned model")
    allocate: Literal["sensitivity", "global"] = Field(
        "sensitivity", description="sensitivity: every layer loses what keeps its own accuracy drop (one-shot, "
                                   "measured per layer) under one common threshold, raised until the target is met; "
                                   "global: Torch-Pruning's global ranking of channels across the selected layers")
    max_amount: Share = Field(0.9, description="no layer loses more than this fraction of its channels")
    ratios: list[Share] = Field(default_factory=lambda: list(SENSITIVITY_RATIOS), min_length=1,
                                description="allocate: sensitivity: the pruning ratios each layer is measured at")
    samples: PositiveInt = Field(512, description="validation samples the sensitivity is measured on (at most)")

    @model_validator(mode="after")
    def _one_target(self) -> PruneTarget:
        given = [k for k in TARGETS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one target: {macs: 0.25} (a quarter of the MACs remains), {params: 0.5} "
                             "or {latency_b1: 0.5}" + (f" (got {' and '.join(given)})" if given else ""))
        if sorted(set(self.ratios)) != self.ratios:
            raise ValueError(f"ratios must be increasing and distinct (got {self.ratios})")
        return self

    @property
    def metric(self) -> str:
        return next(k for k in TARGETS if getattr(self, k) is not None)

    @property
    def share(self) -> float:
        return float(getattr(self, self.metric))


class PruneConfig(StageConfig):
    """Pruning: magnitude (zeroes weights, mask-only) or structured/random (removes channels, model shrinks)."""

    type: Literal["prune"]
    method: Literal["structured", "magnitude", "random"] = Field(
        "structured",
        description="structured: remove the least important channels (smaller, faster model); random: the same "
                    "with random importance (an ablation baseline); magnitude: zero the smallest weights (mask-only)",
    )
    amount: Amount | None = Field(
        None, description="fraction to remove: of channels (structured/random) or weights (magnitude); or give a target")
    target: PruneTarget | None = Field(
        None, description="instead of amount: what the pruned model must reach, {macs: 0.25}, {params: 0.5} or "
                          "{latency_b1: 0.5}; the per-layer amounts are allocated to meet it")
    scope: Literal["layer", "global"] = Field(
        "layer", description="layer: remove `amount` of every layer; global: rank all selected layers together"
    )
    importance: Literal["l1", "l2", "taylor"] = Field(
        "l2", description="what ranks channels/weights: l1/l2 norm of the weights, or taylor (|weight x gradient| "
                          "on calibration batches); method random ignores it"
    )
    include: Selector = Field(default_factory=lambda: ["*"], description=SELECTOR_HELP)
    exclude: Selector = Field(default_factory=list, description=SELECTOR_HELP)
    protect_head: bool = Field(
        True, description="keep the classifier head (the last Linear) out of the selection; structured pruning "
                          "never removes its outputs (they are the classes)"
    )
    per_layer: dict[str, Amount] = Field(
        default_factory=dict, description="amount overrides by module-name glob, e.g. {'c1': 0.3}; first match wins"
    )
    steps: PositiveInt = Field(1, description="prune gradually in this many steps, fine-tuning after each")
    schedule: Literal["geometric", "linear"] = Field(
        "geometric", description="amount reached after step i of n: geometric 1-(1-amount)^(i/n), linear amount*i/n"
    )
    calibration_batches: PositiveInt = Field(4, description="calibration batches for taylor importance")
    round_to: PositiveInt | None = Field(None, description="structured: keep channel counts a multiple of this")
    heads: Amount | None = Field(
        None, description="transformers: fraction of each attention layer's heads to remove, whole heads (Hugging Face "
                          "BERT-style and ViT, timm ViT, decoder LMs); default: amount"
    )
    hidden: bool = Field(
        False, description="structured: also prune the residual stream (the width every block adds to and LayerNorm "
                           "normalises: a transformer's hidden size, embeddings included). Default: attention heads "
                           "and MLP width only, which keeps the embeddings and every residual addition intact"
    )
    blocks: Amount | None = Field(
        None, description="decoder LMs (Llama/Mistral/Qwen2, GPT-2): fraction of whole decoder blocks to remove, those "
                          "that change their input least on calibration batches (default: none)")
    kv_groups: Literal["whole", "queries"] = Field(
        "whole", description="decoder LMs with grouped-query attention: whole: remove whole key/value groups (a KV "
                             "head with its query heads; the KV cache shrinks too); queries: remove the same number "
                             "of query heads from every group (every KV head stays)")
    finetune: PruneFinetune | None = Field(None, description="recovery training after each step (none: no training)")

    implementation: ClassVar[str] = "compresspipe.stages.prune.stage:PruneStage"
    example: ClassVar[dict[str, Any]] = {"type": "prune", "method": "structured", "amount": 0.5,
                                         "finetune": {"epochs": 1}}

    @model_validator(mode="after")
    def _amount_or_target(self) -> PruneConfig:
        if (self.amount is None) == (self.target is None):
            raise ValueError("give amount (the fraction to remove) or target (what the model must reach), "
                             + ("not both" if self.amount is not None else "e.g. amount: 0.5 or target: {macs: 0.25}"))
        if self.blocks and self.method == "magnitude":
            raise ValueError("blocks removes whole decoder blocks: it needs method structured or random")
        if self.target is not None:
            if self.method == "magnitude":
                raise ValueError("a target needs method structured or random: magnitude pruning zeroes weights and "
                                 "changes neither MACs, parameters nor latency")
            if self.per_layer:
                raise ValueError("a target allocates the per-layer amounts itself: remove per_layer")
            if self.scope == "global":
                raise ValueError("a target allocates the per-layer amounts itself: remove scope: global (for "
                                 "Torch-Pruning's global ranking use target.allocate: global)")
        return self

    def check(self, recipe: Recipe, index: int) -> list[tuple[tuple[str | int, ...], str]]:
        from compresspipe.registry import unknown_message

        teacher = self.finetune.distill if self.finetune is not None else None
        earlier = recipe.stage_names()[:index]
        if teacher is not None and teacher != "baseline" and teacher not in earlier:
            return [(("finetune", "distill"), unknown_message("teacher", teacher, ["baseline", *earlier])
                     + " (the teacher must be the baseline or a stage that runs before this one)")]
        return []


def step_amounts(amount: float, steps: int, schedule: str) -> list[float]:
    """Amount reached after each step, index 0 = before any (Torch-Pruning's scheduler contract)."""
    if schedule == "linear":
        return [amount * i / steps for i in range(steps + 1)]
    return [1 - (1 - amount) ** (i / steps) for i in range(steps + 1)]

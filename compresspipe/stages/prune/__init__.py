"""`prune`: remove weights (magnitude: mask-only) or whole channels (structured/random: layers really shrink).

Structured pruning follows the dependencies between layers (residual additions, concatenations, batch norm,
grouped and depthwise convolutions) with Torch-Pruning's dependency graph, then records a `resize` edit so
the smaller model reloads from its artifact. In transformers it removes whole attention heads (`heads`) and MLP
width; the residual stream (the hidden size) is pruned only with `hidden: true`. Magnitude pruning folds its masks into the weights: no hooks
are left, and the report marks the stage mask-only because shapes, bytes and latency do not change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import Field, PositiveInt

from compresspipe.recipe.training import FinetuneSettings
from compresspipe.stages.base import StageConfig
from compresspipe.stages.common import SELECTOR_HELP, Selector

if TYPE_CHECKING:
    from compresspipe.recipe.spec import Recipe

Amount = Annotated[float, Field(ge=0, lt=1)]

MASK_ONLY_NOTE = ("mask-only: parameters and bytes unchanged, no latency gain expected; "
                  "use method: structured for a smaller/faster model")


class PruneFinetune(FinetuneSettings):
    """Recovery training after each pruning step, optionally distilling from an earlier model."""

    distill: str | None = Field(
        None, description="teacher for knowledge distillation while fine-tuning: baseline or an earlier stage's name"
    )
    temperature: float = Field(4.0, gt=0, description="softmax temperature of the distillation loss")
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the distillation loss; 1 - alpha goes to the labels")


class PruneConfig(StageConfig):
    """Pruning: magnitude (zeroes weights, mask-only) or structured/random (removes channels, model shrinks)."""

    type: Literal["prune"]
    method: Literal["structured", "magnitude", "random"] = Field(
        "structured",
        description="structured: remove the least important channels (smaller, faster model); random: the same "
                    "with random importance (an ablation baseline); magnitude: zero the smallest weights (mask-only)",
    )
    amount: Amount = Field(description="fraction to remove: of channels (structured/random) or weights (magnitude)")
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
                          "BERT-style and ViT, timm ViT); default: amount"
    )
    hidden: bool = Field(
        False, description="structured: also prune the residual stream (the width every block adds to and LayerNorm "
                           "normalises: a transformer's hidden size, embeddings included). Default: attention heads "
                           "and MLP width only, which keeps the embeddings and every residual addition intact"
    )
    finetune: PruneFinetune | None = Field(None, description="recovery training after each step (none: no training)")

    implementation: ClassVar[str] = "compresspipe.stages.prune.stage:PruneStage"
    example: ClassVar[dict[str, Any]] = {"type": "prune", "method": "structured", "amount": 0.5,
                                         "finetune": {"epochs": 1}}

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

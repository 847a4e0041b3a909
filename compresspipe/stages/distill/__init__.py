"""`distill`: knowledge distillation from a frozen teacher into the current model or a new, smaller one.

Loss per batch: ``alpha * KL(softmax(t/T) || softmax(s/T)) * T^2 + (1 - alpha) * CE(s, y)``, plus optional
feature losses (MSE between intermediate outputs, through small learned adapters where widths differ).

How the teacher's outputs are cached: the stage trains on a copy of the data splits whose training
split yields ``(x, [index, label])`` instead of ``(x, label)``. The loss looks the teacher's logits up
by sample index (computed once, in order, before training), and also uses the index to decide whether
a sample's label is one of the ``labels_fraction`` kept. Caching applies when the training split is a
fixed in-memory tensor set (every builtin dataset); other datasets may augment, so the teacher then
runs on every batch. Feature losses need the teacher's intermediate outputs, so they run it too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from compresspipe.recipe.spec import NAME_PATTERN, ModelSpec, StrictModel
from compresspipe.recipe.training import TrainSettings
from compresspipe.stages.base import StageConfig

if TYPE_CHECKING:
    from compresspipe.recipe.spec import Recipe


def _name_or_spec(value: Any) -> str:
    return "spec" if isinstance(value, dict | ModelSpec) else "name"


class FeatureLoss(StrictModel):
    """One intermediate-layer loss: MSE between a student module's output and a teacher module's output."""

    student: str = Field(description="module name in the student, e.g. c2")
    teacher: str = Field(description="module name in the teacher, e.g. c2")
    weight: float = Field(1.0, gt=0, description="weight of this MSE term in the total loss")


TeacherRef = Annotated[
    Annotated[str, Field(pattern=NAME_PATTERN), Tag("name")] | Annotated[ModelSpec, Tag("spec")],
    Discriminator(_name_or_spec),
]
StudentRef = Annotated[
    Annotated[Literal["current"], Tag("name")] | Annotated[ModelSpec, Tag("spec")],
    Discriminator(_name_or_spec),
]


class DistillConfig(StageConfig, TrainSettings):
    """Knowledge distillation: a frozen teacher's softened outputs (and optional features) train the student."""

    type: Literal["distill"]
    teacher: TeacherRef = Field(
        "baseline",
        description="baseline (the uncompressed reference), the name of an earlier stage, or a model spec "
        "with a checkpoint",
    )
    student: StudentRef = Field(
        "current",
        description="current (the model as the previous stage left it) or a model spec trained from scratch",
    )
    temperature: float = Field(4.0, gt=0, description="softens both distributions; the soft loss is scaled by T^2")
    alpha: float = Field(0.7, ge=0, le=1, description="weight of the soft (teacher) loss; 1 - alpha for the labels")
    labels_fraction: float = Field(
        1.0, gt=0, le=1,
        description="share of training labels used by the hard loss (a seeded subset); the rest learn "
        "from the teacher only",
    )
    features: list[FeatureLoss] = Field(
        default_factory=list, description="intermediate-layer losses; adapters are added where widths differ"
    )
    cache_teacher: bool = Field(
        True, description="compute the teacher's logits once per training sample (fixed tensor datasets only)"
    )

    implementation: ClassVar[str] = "compresspipe.stages.distill.stage:DistillStage"
    example: ClassVar[dict[str, Any]] = {"type": "distill", "epochs": 1, "temperature": 2.0, "alpha": 0.5}

    @model_validator(mode="wrap")
    @classmethod
    def _plain_locations(cls, data: Any, handler: Any) -> Any:
        """Drop the union tags (name/spec) pydantic puts in error paths: `teacher.builtin`, not `teacher.spec.builtin`."""
        try:
            return handler(data)
        except ValidationError as exc:
            errors = []
            for err in exc.errors(include_url=False):
                loc = tuple(err["loc"])
                if len(loc) >= 2 and loc[0] in ("teacher", "student") and loc[1] in ("name", "spec"):
                    loc = (loc[0], *loc[2:])
                errors.append({"type": err["type"], "loc": loc, "input": err.get("input"), "ctx": err.get("ctx", {})})
            raise ValidationError.from_exception_data(exc.title, errors) from None  # type: ignore[arg-type]

    @field_validator("teacher")
    @classmethod
    def _teacher_has_weights(cls, value: str | ModelSpec) -> str | ModelSpec:
        if isinstance(value, ModelSpec) and value.checkpoint is None and not isinstance(value.huggingface, str):
            raise ValueError(
                "a teacher given as a model spec needs weights: checkpoint: <file>, or a Hugging Face folder (an "
                "untrained teacher teaches nothing); or name baseline or an earlier stage"
            )
        return value

    def check(self, recipe: Recipe, index: int) -> list[tuple[tuple[str | int, ...], str]]:
        if not isinstance(self.teacher, str) or self.teacher == "baseline":
            return []
        names = recipe.stage_names()
        if self.teacher in names[:index]:
            return []
        if self.teacher == self.name:
            return [(("teacher",), f"{self.teacher!r} is this stage itself; a teacher must be baseline or an "
                                   "earlier stage")]
        if self.teacher in names:
            later = names.index(self.teacher)
            return [(("teacher",), f"stage {self.teacher!r} (stages[{later}]) runs after this one; a teacher "
                                   "must be baseline or an earlier stage")]
        from compresspipe.registry import unknown_message

        return [(("teacher",), unknown_message("teacher stage", self.teacher, ["baseline", *names[:index]]))]

    def teacher_label(self) -> str:
        return self.teacher if isinstance(self.teacher, str) else self.teacher.label

    def student_label(self) -> str:
        if isinstance(self.student, str):
            return "current"
        kwargs = ", ".join(f"{k}={v}" for k, v in self.student.kwargs.items())
        return self.student.label + (f"({kwargs})" if kwargs else "")

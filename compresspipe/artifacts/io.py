"""What a model takes and gives, carried on the model state and saved in model.json (timm's `pretrained_cfg`
idea): the inputs spec, the task, the class names and the preprocessing its inputs need. Export, the manifest,
the deploy runtime and the report read it from the model, never from the recipe. Imports no torch.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field, model_validator

from compresspipe.recipe.spec import InputTensor, StrictModel, Task

MAX_CLASS_NAME = 256


class ModelIO(StrictModel):
    """The model's interface: inputs (names, shapes, dtypes, dynamic axes), task, class names, preprocessing."""

    VERSION: ClassVar[int] = 1

    inputs: list[InputTensor] = Field(min_length=1, max_length=16)
    task: Task = "classification"
    classes: list[str] | None = Field(None, max_length=1_000_000, description="name of each output index")
    preprocessing: dict[str, Any] | None = Field(
        None, description="what a caller must do to raw inputs: mean, std, resize, interpolation, and in words"
    )

    @model_validator(mode="after")
    def _unique(self) -> ModelIO:
        names = [i.name for i in self.inputs]
        if len(set(names)) != len(names):
            raise ValueError(f"input names must be unique (got {names})")
        if self.classes is not None and any(len(c) > MAX_CLASS_NAME for c in self.classes):
            raise ValueError(f"class names are at most {MAX_CLASS_NAME} characters")
        return self

    @classmethod
    def single(cls, shape: tuple[int, ...] | list[int], task: str = "classification") -> ModelIO:
        """One float32 tensor called `input` (the `input_shape` shorthand)."""
        return cls(inputs=[InputTensor(name="input", shape=list(shape))], task=task)  # type: ignore[arg-type]

    @property
    def single_tensor(self) -> bool:
        """Batches are a plain tensor (one input named `input`), else a dict of named tensors."""
        return len(self.inputs) == 1 and self.inputs[0].name == "input"

    @property
    def names(self) -> list[str]:
        return [i.name for i in self.inputs]

"""JSON Schema of the recipe, with every registered dataset and stage (plugins included), for editors."""

from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import Field, create_model

from compresspipe.recipe.spec import Recipe


def recipe_schema() -> dict[str, Any]:
    from compresspipe.data import DATASETS
    from compresspipe.stages import STAGES

    stage_classes = tuple(STAGES.get(n) for n in STAGES.names())
    data_classes = tuple(DATASETS.get(n) for n in DATASETS.names())
    stage_union = Annotated[Union[stage_classes], Field(discriminator="type")]  # type: ignore[valid-type]  # noqa: UP007
    data_union = Annotated[Union[data_classes], Field(discriminator="dataset")]  # type: ignore[valid-type]  # noqa: UP007
    model = create_model(  # type: ignore[call-overload]
        "Recipe",
        __base__=Recipe,
        data=(data_union, ...),
        stages=(list[stage_union], Field(default_factory=list)),
    )
    schema = model.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "compresspipe recipe"
    return schema

"""The recipe layer: YAML with line numbers, pydantic models, overrides and schema. Imports no torch."""

from compresspipe.recipe.loader import load_recipe, validate_recipe_data
from compresspipe.recipe.spec import Recipe

__all__ = ["Recipe", "load_recipe", "validate_recipe_data"]

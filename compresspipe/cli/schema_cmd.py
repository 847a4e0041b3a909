"""`compresspipe schema`: JSON Schema of the recipe for editors (plugin stages included)."""

from __future__ import annotations

import json

from compresspipe.cli.base import app, handle_errors


@app.command()
@handle_errors
def schema() -> None:
    """Print the JSON Schema of a recipe (point your editor's YAML plugin at it)."""
    from compresspipe.recipe.schema import recipe_schema

    print(json.dumps(recipe_schema(), indent=2))

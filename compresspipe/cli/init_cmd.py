"""`compresspipe init`: write a commented starter recipe."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import typer

from compresspipe.cli.base import app, fail, handle_errors


@app.command()
@handle_errors
def init(
    path: Path = typer.Argument(Path("recipe.yaml"), help="Where to write the recipe."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
) -> None:
    """Write a commented starter recipe you can run straight away."""
    if path.exists() and not force:
        fail(f"{path} exists; use --force to overwrite it", 2)
    text = resources.files("compresspipe.recipe").joinpath("starter.yaml").read_text(encoding="utf-8")
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path}; run it with: compresspipe run {path}")

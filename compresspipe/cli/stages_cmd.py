"""`compresspipe stages`: every registered stage with its fields, defaults and docs."""

from __future__ import annotations

from compresspipe.cli import app, handle_errors


def _default(field: object) -> str:
    """The default as YAML the user could paste into a recipe (nested settings as a flow mapping)."""
    import yaml
    from pydantic import BaseModel
    from pydantic_core import PydanticUndefined

    default = getattr(field, "default", PydanticUndefined)
    factory = getattr(field, "default_factory", None)
    if factory is not None:
        default = factory()
    elif default is PydanticUndefined:
        return "(required)"
    if isinstance(default, BaseModel):
        default = default.model_dump(mode="json")
    text = yaml.safe_dump(default, default_flow_style=True, sort_keys=False, width=10_000).strip()
    return text.removesuffix("\n...").strip()


@app.command()
@handle_errors
def stages() -> None:
    """List the stage types a recipe can use, with their fields."""
    from rich.console import Console
    from rich.table import Table

    from compresspipe.cli import _escape as escape
    from compresspipe.stages import STAGES

    console = Console(highlight=False)
    for entry in STAGES.entries():
        try:
            cls = entry.load("stage")
        except Exception as exc:
            console.print(f"[bold red]{entry.name}[/] (unavailable) {escape(str(exc))}")
            continue
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        src = "" if entry.source == "builtin" else f"  [dim]{escape(entry.source)}[/]"
        table = Table(title=f"{entry.name}: {escape(doc)}{src}", title_justify="left", show_edge=False)
        table.add_column("field", no_wrap=True)
        table.add_column("default", overflow="fold")
        table.add_column("description", overflow="fold")
        for name, field in cls.model_fields.items():
            if name == "type":
                continue
            table.add_row(name, escape(_default(field)), escape(field.description or ""))
        console.print(table)
        console.print()

"""`compresspipe stages`: every registered stage with its fields, defaults and docs."""

from __future__ import annotations

from typing import Any

from compresspipe.cli.base import app, handle_errors


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
    """List the stage types a recipe can use, with their fields; then model sources, datasets and metrics."""
    from rich.console import Console
    from rich.table import Table

    from compresspipe.cli.base import escape
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
    _others(console)


def _others(console: object) -> None:
    """The model block's sources, every dataset's fields, and the metric registry (gates can name any)."""
    from rich.markup import escape
    from rich.table import Table

    from compresspipe.data import DATASETS
    from compresspipe.metrics import METRICS
    from compresspipe.recipe.spec import InputTensor, ModelSpec

    blocks: list[tuple[str, Any]] = [("model: builtin | torchvision | timm | huggingface | python", ModelSpec),
                                      ("model.inputs[]: one input of the model", InputTensor)]
    for entry in DATASETS.entries():
        try:
            blocks.append((f"data: {entry.name}", entry.load("dataset")))
        except Exception as exc:  # a plugin that fails to import: name it, keep listing
            console.print(f"[bold red]data: {entry.name}[/] (unavailable) {escape(str(exc))}")  # type: ignore[attr-defined]
    for title, cls in blocks:
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        table = Table(title=f"{escape(title)}: {escape(doc)}", title_justify="left", show_edge=False)
        for col in ("field", "default", "description"):
            table.add_column(col)
        for name, field in cls.model_fields.items():
            if name != "dataset":
                table.add_row(name, escape(_default(field)), escape(field.description or ""))
        console.print(table)  # type: ignore[attr-defined]
        console.print()  # type: ignore[attr-defined]
    table = Table(title="metrics (task: picks the default; gates and expect: can name any)", title_justify="left",
                  show_edge=False)
    for col in ("metric", "better", "tasks", "description"):
        table.add_column(col)
    for entry in METRICS.entries():
        try:
            cls = entry.load("metric")
        except Exception as exc:  # a plugin that fails to import
            table.add_row(entry.name, "", "", f"unavailable: {escape(str(exc))}")
            continue
        table.add_row(entry.name, "higher" if cls.higher_is_better else "lower", ", ".join(sorted(cls.tasks)),
                      escape(cls.description))
    console.print(table)  # type: ignore[attr-defined]

"""A pydantic model of report.json (format `compresspipe.report`, versions 1 and 2), for the readers of reports
(`compare`, and anyone reading a report another machine wrote): a report is checked before any figure in it is
used, so a tampered file is a clear error naming the key, never a wrong comparison or a traceback.

Torch-free. The writer (`report.build`) stays the source of the content; this model pins the types of the figures
readers use and lets every other key through.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from compresspipe.errors import InputError

MAX_COUNT = 10**15  # parameters, bytes, MACs: a larger count is not a model's

Fraction = Annotated[float, Field(strict=True, ge=0, le=1, allow_inf_nan=False)]
Count = Annotated[int, Field(strict=True, ge=0, le=MAX_COUNT)]
Milliseconds = Annotated[float, Field(strict=True, ge=0, allow_inf_nan=False)]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class FileFigures(_Open):
    """One measured file of a row (`stages[].formats[fmt]`)."""

    bytes: Count | None = None
    accuracy: Fraction | None = None
    latency_ms: dict[str, Milliseconds | None] = Field(default_factory=dict)
    timed: str | None = None  # "forward", or "decode step (N tokens cached)" for files with a key/value cache
    decode_tokens_per_s: dict[str, Annotated[float, Field(ge=0, allow_inf_nan=False)]] | None = None
    peak_memory_mib: dict[str, Annotated[float, Field(ge=0, allow_inf_nan=False)]] | None = None


class StageRow(_Open):
    """One row of the report: the figures `compare` and the HTML page read, typed; the rest passes through."""

    name: Annotated[str, Field(min_length=1, max_length=200)]
    type: str | None = None
    accuracy: Fraction | None = None
    params: Count | None = None
    nonzero_params: Count | None = None
    bytes: Count | None = None
    macs: Count | None = None
    sparsity: Fraction | None = None
    latency_ms: dict[str, Milliseconds | None] = Field(default_factory=dict)
    timed: str | None = None
    decode_tokens_per_s: dict[str, Annotated[float, Field(ge=0, allow_inf_nan=False)]] | None = None
    peak_memory_mib: dict[str, Annotated[float, Field(ge=0, allow_inf_nan=False)]] | None = None
    formats: dict[str, FileFigures] = Field(default_factory=dict)


class Report(_Open):
    format: Literal["compresspipe.report"]
    version: Literal[1, 2]
    recipe: str | None = None
    status: str | None = None
    reference: str | None = None
    stages: list[StageRow]


def validate_report(data: Any, file: Path | str) -> Report:
    """The report checked against its format; InputError (exit 2) naming the file and the first bad key."""
    try:
        return Report.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"]).lstrip(".")
        given = repr(first.get("input"))
        raise InputError(f"{file}: {where or 'report'}: {first['msg']} (got {given[:60]}"
                         f"{'...' if len(given) > 60 else ''}); the file is not a report compresspipe wrote, or it "
                         f"was edited ({exc.error_count()} problem(s))") from None

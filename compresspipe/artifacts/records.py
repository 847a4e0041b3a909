"""Hand-offs between stages: typed, versioned records that travel on the model state and in model.json.

A stage that must tell a later one something about the model (the quantize stage: which float model the
int8 runtimes re-quantize, and with which settings) puts a `Record` on the `ModelState`; the later stage reads
it back by type. Record kinds live in one registry, like stages and edit kinds, and a plugin adds one through
the entry-point group ``compresspipe.records``. Loading checks each record's version and fields in one place.
This module imports no torch.
"""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from compresspipe.errors import ArtifactError, RegistryError
from compresspipe.registry import Registry, unknown_message

R = TypeVar("R", bound="Record")


class Record(BaseModel):
    """Base of a record kind: `KIND` names it in model.json, `VERSION` is the newest version this code writes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    KIND: ClassVar[str]
    VERSION: ClassVar[int] = 1

    def to_json(self) -> dict[str, Any]:
        return {"version": self.VERSION, **self.model_dump(mode="json")}


RECORDS: Registry[type[Record]] = Registry("record kind", "compresspipe.records")
RECORDS.register("quantize", "compresspipe.runtimes.handoff:QuantizeRecord")


def record_from_json(kind: str, data: Any) -> Record:
    """A record read from model.json, or ArtifactError naming the kind and what is wrong."""
    if not isinstance(kind, str) or kind not in RECORDS:
        raise ArtifactError(unknown_message("record kind", kind, RECORDS.names()))
    try:
        cls = RECORDS.get(kind)
    except RegistryError as exc:
        raise ArtifactError(str(exc)) from None
    if not isinstance(data, dict):
        raise ArtifactError(f"record {kind!r} must be an object (got {type(data).__name__})")
    version = data.get("version")
    if type(version) is not int or not 1 <= version <= cls.VERSION:
        raise ArtifactError(f"record {kind!r} has version {version!r}; this compresspipe reads versions 1 to "
                            f"{cls.VERSION} of it")
    try:
        return cls.model_validate({k: v for k, v in data.items() if k != "version"})
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        raise ArtifactError(f"record {kind!r}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None


def get_record(records: dict[str, Record], cls: type[R]) -> R | None:
    found = records.get(cls.KIND)
    return found if isinstance(found, cls) else None

"""One rule for every configuration dataclass: built from a dict, unknown keys are errors that
list what is known (minGPT's CfgNode.merge_from_args does the same), never silently dropped."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

C = TypeVar("C")


def from_dict(cls: type[C], d: dict[str, Any]) -> C:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {unknown}; expected some of "
                         f"{sorted(known)}")
    return cls(**d)

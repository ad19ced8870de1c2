"""Reading and checking ``params.yaml``.

Each stage declares the keys of its section as a schema of ``Field``s; a
section is checked whole (unknown keys with a did-you-mean, types, ranges,
choices) before any work starts, and every message names the file and the
dotted key.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from sipa_core.errors import SipaError

_MISSING = object()


@dataclass(frozen=True)
class Field:
    """One parameter: its type(s), default, and optional range or choices."""

    type: type | tuple[type, ...]
    default: Any = _MISSING
    choices: tuple | None = None
    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False
    max_exclusive: bool = False
    nullable: bool = False
    check: Callable[[Any], str | None] | None = None  # returns an error text or None
    help: str = ""

    @property
    def required(self) -> bool:
        return self.default is _MISSING


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SipaError(f"{path}: file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise SipaError(f"{path}: malformed YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SipaError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    return data


def _type_name(t) -> str:
    if isinstance(t, tuple):
        return " or ".join(_type_name(x) for x in t)
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false",
            list: "a list", dict: "a mapping"}.get(t, t.__name__)


def _coerce(value, field: Field, where: str):
    if value is None:
        if field.nullable:
            return None
        raise SipaError(f"{where}: must be {_type_name(field.type)}, got null")
    types = field.type if isinstance(field.type, tuple) else (field.type,)
    # bool is a subclass of int in Python: never accept true/false for a number.
    if isinstance(value, bool) and bool not in types:
        raise SipaError(f"{where}: must be {_type_name(field.type)}, got {value!r}")
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        value = float(value) if int not in types else value
    if not isinstance(value, types):
        raise SipaError(f"{where}: must be {_type_name(field.type)}, got {value!r}")
    if field.choices is not None and value not in field.choices:
        near = difflib.get_close_matches(str(value), [str(c) for c in field.choices], n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise SipaError(f"{where}: {value!r} is not one of {', '.join(map(str, field.choices))}{hint}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value != value:  # NaN
            raise SipaError(f"{where}: must be a number, got NaN")
        if field.min is not None and (value < field.min or (field.min_exclusive and value == field.min)):
            op = ">" if field.min_exclusive else ">="
            raise SipaError(f"{where}: must be {op} {field.min}, got {value}")
        if field.max is not None and (value > field.max or (field.max_exclusive and value == field.max)):
            op = "<" if field.max_exclusive else "<="
            raise SipaError(f"{where}: must be {op} {field.max}, got {value}")
    if field.check is not None:
        problem = field.check(value)
        if problem:
            raise SipaError(f"{where}: {problem}")
    return value


def check_section(values: Mapping | None, schema: Mapping[str, Field], *, file: str | Path, section: str) -> dict:
    """Validate ``values`` against ``schema`` and return it with defaults filled in."""
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise SipaError(f"{file}: {section}: expected a mapping, got {type(values).__name__}")
    for key in values:
        if key not in schema:
            near = difflib.get_close_matches(str(key), list(schema), n=1)
            hint = f" (did you mean {section}.{near[0]}?)" if near else ""
            known = ", ".join(sorted(schema))
            raise SipaError(f"{file}: {section}.{key}: unknown key{hint}; known keys: {known}")
    out = {}
    for key, field in schema.items():
        where = f"{file}: {section}.{key}"
        if key in values:
            out[key] = _coerce(values[key], field, where)
        elif field.required:
            raise SipaError(f"{where}: required key is missing")
        else:
            out[key] = field.default
    return out


def check_sections(data: Mapping, known, *, file, required=()) -> None:
    """The top level of a params file: an unknown section (a misspelt stage name, whose settings
    would otherwise be silently dropped for the defaults) or a missing required one is one line."""
    for key in data:
        if key not in known:
            near = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise SipaError(f"{file}: {key}: unknown section{hint}; known sections: {', '.join(known)}")
    for key in required:
        if key not in data:
            raise SipaError(f"{file}: {key}: required section is missing (dvc.yaml's stages read every "
                            f"section: {', '.join(required)})")


def refuse_keys(values: Mapping, keys, *, file, section: str, why: str) -> None:
    """Keys that would be silently ignored are an error naming the key and what to set instead."""
    for key in keys:
        if key in values:
            raise SipaError(f"{file}: {section}.{key}: {why}")


def raw_section(path: str | Path, section: str) -> dict:
    """The section as written in the file (no defaults): what the user set."""
    value = load_yaml(path).get(section)
    return dict(value) if isinstance(value, Mapping) else {}

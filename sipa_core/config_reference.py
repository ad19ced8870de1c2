"""The configuration reference (``docs/configuration.md``), generated from the stage schemas.

``sipa config-reference > docs/configuration.md`` writes it and ``tests/test_docs.py``
checks that the committed file is current, so it cannot drift from the code.

Nothing here names a stage or a key. The sections are the pipeline's registry
(``sipa_core.pipeline.STAGES``, in pipeline order). Which schema checks which
key is learnt by watching each stage's own ``read_config`` check a params file
that sets nothing: every ``check_section`` call it makes, for its section and
for the mappings nested in it (``search.space``, the recipes, ...), is recorded
with its schema. A schema that several keys share (the training recipe) is
documented once, and each of those keys points to it. So a new stage, key or
nested schema appears here without a change to this module.
"""

from __future__ import annotations

import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import yaml

from sipa_core.errors import SipaError
from sipa_core.params import Field, check_section
from sipa_core.pipeline import SETTINGS, STAGES

COMMAND = "sipa config-reference > docs/configuration.md"

_TYPE_NAMES = {int: "integer", float: "number", str: "string", bool: "boolean", list: "list", dict: "mapping"}


@dataclass(frozen=True)
class Checked:
    """One ``check_section`` call a stage made: the dotted section and the schema checking it."""

    section: str
    schema: Mapping[str, Field]


def checked_sections(stage) -> list[Checked]:
    """The sections ``stage.read_config`` checks (its own first, then the nested ones), in the
    order it checks them, when the params file sets nothing (every default)."""
    calls: list[Checked] = []
    code = check_section.__code__

    def profile(frame, event, arg):
        if event == "call" and frame.f_code is code:
            section, schema = frame.f_locals.get("section"), frame.f_locals.get("schema")
            if isinstance(section, str) and (section == stage.name or section.startswith(stage.name + ".")) \
                    and not any(c.section == section for c in calls):
                calls.append(Checked(section, schema))

    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "params.yaml"
        empty.write_text("{}\n")
        previous = sys.getprofile()
        sys.setprofile(profile)
        try:
            stage.read_config(str(empty))
        except SipaError:
            pass  # a key without a default: its section was recorded before the check failed
        finally:
            sys.setprofile(previous)
    if not calls or calls[0].section != stage.name:
        raise RuntimeError(f"{stage.name}: its read_config checked no '{stage.name}' section with check_section")
    return calls


def _schema_home(schema):
    """(module, name): where a schema is defined as a module-level name (``RECIPE_SCHEMA`` in
    ``sipa_core.train.recipe``, not where it is re-exported); None when no module names it."""
    package = __name__.split(".")[0]
    found = sorted((name, attr) for name, module in list(sys.modules.items())
                   if module is not None and (name == package or name.startswith(package + "."))
                   for attr, value in list(vars(module).items()) if value is schema)
    for name, attr in found:
        source = Path(getattr(sys.modules[name], "__file__", None) or "").read_text() \
            if getattr(sys.modules[name], "__file__", None) else ""
        if re.search(rf"^{re.escape(attr)}\s*(:[^=\n]*)?=", source, flags=re.M):
            return sys.modules[name], attr
    return (sys.modules[found[0][0]], found[0][1]) if found else None


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _code(value) -> str:
    return f"`{_md(value)}`"


def _yaml(value) -> str:
    """A value as it is written in params.yaml (one line)."""
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**6).strip().removesuffix("\n...")


def _type(field: Field) -> str:
    types = field.type if isinstance(field.type, tuple) else (field.type,)
    return " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)


def _range(field: Field) -> str:
    parts = []
    if field.choices is not None:
        parts.append(", ".join(_code(_yaml(c)) for c in field.choices))
    lo, hi = field.min, field.max
    if lo is not None and hi is not None:
        parts.append(f"{'(' if field.min_exclusive else '['}{lo}, {hi}{')' if field.max_exclusive else ']'}")
    elif lo is not None:
        parts.append(f"{'>' if field.min_exclusive else '>='} {lo}")
    elif hi is not None:
        parts.append(f"{'<' if field.max_exclusive else '<='} {hi}")
    if field.check is not None:
        parts.append("custom check")
    return "; ".join(parts)


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading made of lowercase words, dots, underscores and spaces."""
    return "".join(c for c in heading.lower().replace(" ", "-") if c.isalnum() or c in "-_")


def _table(section: str, schema: Mapping[str, Field], links: Mapping[str, str]) -> list[str]:
    lines = ["| key | type | default | range / choices | nullable | help |",
             "|---|---|---|---|---|---|"]
    for key, field in schema.items():
        default = "required" if field.required else _code(_yaml(field.default))
        help_ = _md(field.help)
        dotted = f"{section}.{key}"
        if dotted in links:
            help_ = "; ".join(filter(None, [help_, f"keys: [{links[dotted]}](#{_anchor(links[dotted])})"]))
        lines.append(f"| {_code(key)} | {_type(field)} | {default} | {_md(_range(field))} | "
                     f"{'yes' if field.nullable else ''} | {help_} |")
    return lines


def _summary(doc: str | None) -> str:
    """The first paragraph of a docstring, on one line."""
    paragraph = (doc or "").strip().split("\n\n")[0]
    return " ".join(paragraph.split()).replace("``", "`")


def configuration_reference() -> str:
    """The Markdown of ``docs/configuration.md``."""
    checked = {name: checked_sections(stage) for name, stage in STAGES.items()}
    users: dict[int, list[Checked]] = {}
    for calls in checked.values():
        for c in calls[1:]:
            users.setdefault(id(c.schema), []).append(c)
    shared = {key: cs for key, cs in users.items() if len(cs) > 1}
    shared_title = {}
    for key, cs in shared.items():
        home = _schema_home(cs[0].schema)
        name = home[1].lower().removesuffix("_schema") if home else cs[0].section.rsplit(".", 1)[-1]
        shared_title[key] = f"shared {name} keys"

    links = {}
    for calls in checked.values():
        for c in calls[1:]:
            links[c.section] = shared_title.get(id(c.schema), c.section)

    out = ["# Configuration reference", "",
           f"<!-- Generated by `{COMMAND}`; do not edit by hand. -->", "",
           f"Generated from the stages' schemas by `{COMMAND}`; do not edit it by hand "
           "(`tests/test_docs.py` fails when it is out of date).", "",
           "`params.yaml` has a section of settings for the whole pipeline, then one section per stage, in the order "
           "below. A key left out takes its "
           "default; an unknown key, a wrong type or a value out of range stops the stage before any work "
           "(`sipa check-params` checks a whole file). Try a value without editing the file with "
           "`dvc exp run -S <section>.<key>=<value>` (a key the file does not write: "
           "`dvc exp run -S +<section>.<key>=<value>`).", "",
           "Ranges: `[a, b]` includes both ends, `(a, b]` excludes a. \"custom check\": the stage checks "
           "more than type and range (see the help; `sipa check-params` says what is wrong).", ""]
    out += [f"- [{name}](#{_anchor(name)})" for name in list(SETTINGS) + list(checked)]
    out += [f"- [{title}](#{_anchor(title)})" for title in shared_title.values()]
    for name, (doc, schema) in SETTINGS.items():
        out += ["", f"## {name}", "", _summary(doc), ""] + _table(name, schema, {})
    for name, calls in checked.items():
        out += ["", f"## {name}", "", _summary(STAGES[name].doc), ""]
        out += _table(name, calls[0].schema, links)
        for c in calls[1:]:
            if id(c.schema) not in shared:
                out += ["", f"### {c.section}", ""]
                out += _table(c.section, c.schema, links)
    for key, cs in shared.items():
        home = _schema_home(cs[0].schema)
        intro = _summary(home[0].__doc__) if home else ""
        out += ["", f"## {shared_title[key]}", ""] + ([intro, ""] if intro else [])
        out += ["Used by " + ", ".join(_code(c.section) for c in cs) + ": each of these keys takes a mapping of "
                "the keys below and sets only the ones it changes (its help says what it starts from).", ""]
        out += _table("", cs[0].schema, {})
    return "\n".join(out) + "\n"


def check_file(path: str | Path) -> str | None:
    """None when ``path`` holds the current reference, else a one-line problem."""
    path = Path(path)
    fix = f"regenerate it with `sipa config-reference > {path}`"
    if not path.is_file():
        return f"{path}: not found; {fix}"
    if path.read_text() != configuration_reference():
        return f"{path}: out of date with the stage schemas; {fix}"
    return None

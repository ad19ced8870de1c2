"""Which user network modules may be imported: those the params (or the command line) name.

A network from ``file.py:function`` or ``package.module:function``
(``sipa_core/models/sources.py``) is imported only when trusted here: the
stage runner trusts the entry points its params file names in
``search.preset`` and ``improve.arch``, ``sipa score`` the one given to
``--arch``. A checkpoint records its network's entry point but never causes
the import by itself. Kept apart from the networks so that every stage can
call it without importing them.
"""

from __future__ import annotations

import re
from pathlib import Path

from sipa_core.errors import SipaError
from sipa_core.params import load_yaml

SOURCE_PREFIXES = ("torchvision", "timm")  # a prefix names its family; anything else is an entry point
SOURCE_PATTERN = re.compile(r"^(?P<target>[^()]+?)\s*(?:\((?P<args>.*)\))?\s*$")  # target(key=value, ...)
NETWORK_KEYS = (("search", "preset"), ("improve", "arch"))  # where the params name a network
NETWORKS_DIR = Path("networks")  # the user's network files: a DVC dependency of every stage that builds one
_TRUSTED: set[str] = set()


def is_source(value) -> bool:
    """A source string (``prefix:name`` or an entry point), as opposed to a registered name or a file."""
    return isinstance(value, str) and ":" in value and not value.endswith((".yaml", ".yml", ".pt", ".pth"))


def is_trusted(entry_point: str) -> bool:
    return entry_point in _TRUSTED


def trust_entry_point(entry_point: str) -> None:
    """Allow ``entry_point`` to be imported: the params name it (stage_runner calls this)."""
    _TRUSTED.add(entry_point)


def entry_point_of(value) -> str | None:
    """The entry point (``file.py:function``, ``package.module:function``) a value names, or None."""
    match = SOURCE_PATTERN.match(value) if is_source(value) else None
    if match is None:
        return None
    target = match["target"].strip()
    return None if target.rpartition(":")[0] in SOURCE_PREFIXES else target


def named_entry_point(value, where: str) -> str | None:
    """The entry point a params value names (None for any other value). A file must lie under
    networks/, the folder every network-building stage declares to DVC, so an edit re-runs them."""
    target = entry_point_of(value)
    if target is None:
        return None
    where_ = target.rpartition(":")[0]
    if where_.endswith(".py"):
        inside = Path(where_).resolve().is_relative_to(NETWORKS_DIR.resolve())
        if Path(where_).is_absolute() or not inside:
            raise SipaError(f"{where}: {where_} is outside {NETWORKS_DIR}/, the folder DVC tracks for your networks "
                            f"(dvc.yaml); move the file there and name it as {NETWORKS_DIR}/<file>.py:<function>")
    return target


def trust_named_entry_points(params_file) -> None:
    """Trust the entry points the params file names (``NETWORK_KEYS``); nothing else is ever imported."""
    raw = load_yaml(params_file)
    for section, key in NETWORK_KEYS:
        values = raw.get(section) if isinstance(raw.get(section), dict) else {}
        entry_point = named_entry_point(values.get(key), f"{params_file}: {section}.{key}")
        if entry_point:
            trust_entry_point(entry_point)

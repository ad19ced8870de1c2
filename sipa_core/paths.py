"""The pipeline's paths, from ``sipa_core/paths.yaml`` (the one place they are
written; dvc.yaml reads the same file as ``vars``)."""

from __future__ import annotations

from pathlib import Path

import yaml

from sipa_core.params import Field, check_sections, load_yaml

PATHS_FILE = Path(__file__).with_name("paths.yaml")
PATHS: dict[str, dict[str, str]] = yaml.safe_load(PATHS_FILE.read_text())["paths"]
SECTIONS = ("distributed", *PATHS)  # a params file's sections: the shared settings, then one per stage


def read_params(path, *, complete: bool = False) -> dict:
    """A params file, its sections checked: none unknown; ``complete``: every one present (the
    pipeline's params file, whose every section a stage of dvc.yaml reads)."""
    data = load_yaml(path)
    check_sections(data, SECTIONS, file=path, required=SECTIONS if complete else ())
    return data


def path_fields(stage: str, **inputs: tuple[str, str]) -> dict[str, Field]:
    """Schema fields for ``stage``'s outputs, and for its ``inputs`` (key -> (producer, producer's key)),
    with their defaults from paths.yaml. Library callers and tests may point them elsewhere; the
    pipeline's params files leave them alone (``tests/test_structure.py``)."""
    fields = {key: Field(str, value, help=f"path (default from {PATHS_FILE.name})")
              for key, value in PATHS[stage].items()}
    for key, (producer, name) in inputs.items():
        fields[key] = Field(str, PATHS[producer][name], help=f"input: the {producer} stage's {name}")
    return fields

"""One source for every path and default, one stage registry, and the layout."""

import ast
import re
from pathlib import Path

import yaml

from sipa_core.params import load_yaml
from sipa_core.paths import PATHS
from sipa_core.pipeline import STAGES

ROOT = Path(__file__).resolve().parents[1]
PATH_KEYS = {"out", "out_arch", "state", "metrics", "table", "pareto", "live", "rounds_table", "layers_table",
             "risk_coverage", "summary", "table_csv", "metrics_dir", "data", "model", "arch", "compare"}


def test_params_yaml_is_exactly_the_schema_defaults(tmp_path):
    """The quick profile's values are the schemas' defaults: what params.yaml says is what runs,
    and a key left out of it runs the same value."""
    empty = tmp_path / "params.yaml"
    empty.write_text("{}\n")
    for name, stage in STAGES.items():
        assert stage.read_config(str(ROOT / "params.yaml")) == stage.read_config(str(empty)), name


def test_no_params_file_writes_a_path():
    """Paths live in sipa_core/paths.yaml only (dvc.yaml reads it as vars)."""
    for path in [ROOT / "params.yaml", *sorted((ROOT / "profiles").glob("*.yaml"))]:
        for section, values in load_yaml(path).items():
            assert not PATH_KEYS & set(values or {}), f"{path.name}: {section} sets a path"
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    assert dvc["vars"] == ["sipa_core/paths.yaml"]
    for name, stage in dvc["stages"].items():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                path = entry if isinstance(entry, str) else next(iter(entry))
                assert path.startswith("${paths."), f"dvc.yaml: {name}.{kind}: {path} is written out, not from vars"


def test_schema_path_defaults_come_from_paths_yaml():
    for name, stage in STAGES.items():
        cfg = stage.read_config(str(ROOT / "params.yaml"))
        for key, value in PATHS[name].items():
            if key in cfg:
                assert cfg[key] == value, f"{name}.{key}"
    assert STAGES["prune"].read_config(str(ROOT / "params.yaml"))["model"] == PATHS["improve"]["out"]
    assert STAGES["accelerate"].read_config(str(ROOT / "params.yaml"))["model"] == PATHS["prune"]["out"]


def test_one_registry_serves_the_scripts_and_check_params():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    assert list(STAGES) == list(dvc["stages"])
    for name in STAGES:
        tree = ast.parse((ROOT / "stages" / f"{name}.py").read_text())
        imported = {(node.module, alias.name) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                    for alias in node.names}
        module = STAGES[name].run.__module__
        assert (module, "STAGE") in imported, f"stages/{name}.py does not run {module}.STAGE"


def test_each_sipa_stage_is_a_package_with_its_method_and_its_stage():
    for name in ("search", "improve", "prune", "accelerate", "quantize"):
        folder = ROOT / "sipa_core" / name
        assert (folder / "stage.py").is_file() and (folder / "__init__.py").is_file(), name
        assert len(list(folder.glob("*.py"))) >= 3, f"sipa_core/{name}: method code beside the stage"


def _function_lengths():
    for path in sorted((ROOT / "sipa_core").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield node.end_lineno - node.lineno + 1, f"{path.relative_to(ROOT)}:{node.name}"


def test_no_function_is_longer_than_sixty_lines():
    long = [(n, where) for n, where in _function_lengths() if n > 60]
    assert not long, f"functions over 60 lines: {sorted(long, reverse=True)}"


def _module_graph() -> dict[str, set[str]]:
    """module -> the package modules it names in an import (anywhere in the file)."""
    def module_of(path: Path) -> str:
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    files = {module_of(p): p for p in (ROOT / "sipa_core").rglob("*.py")}
    graph = {}
    for module, path in files.items():
        named = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sipa_core"):
                subs = {f"{node.module}.{a.name}" for a in node.names} & set(files)
                named |= subs or {node.module}
            elif isinstance(node, ast.Import):
                named |= {a.name for a in node.names if a.name in files}
        graph[module] = named - {module}
    return graph


def test_no_import_cycles():
    graph, state, cycles = _module_graph(), {}, []

    def visit(module, trail):
        state[module] = "open"
        for nxt in sorted(graph.get(module, ())):
            if state.get(nxt) == "open":
                cycles.append(trail[trail.index(nxt):] + [nxt] if nxt in trail else [module, nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, f"import cycles: {cycles}"


def test_each_stage_file_only_reads_calls_and_publishes():
    """A stage's method lives in modules named for what they do; its stage.py stays short."""
    for path in sorted((ROOT / "sipa_core").glob("*/stage.py")):
        lines = len(path.read_text().splitlines())
        assert lines <= 250, f"{path.relative_to(ROOT)}: {lines} lines"


def _layout_named() -> set[str]:
    """The files docs/development.md's layout tree names, as paths under sipa_core/."""
    text = (ROOT / "docs/development.md").read_text()
    block = text.split("## Layout", 1)[1].split("```text", 1)[1].split("```", 1)[0]
    named, package = set(), None
    for line in block.splitlines()[1:]:  # below "sipa_core/"
        indent, words = len(line) - len(line.lstrip()), line.split()
        if not words:
            continue
        if indent == 0:  # another top-level folder (stages/): not sipa_core's
            package = "outside"
        elif indent == 2:
            package = words[0].rstrip("/") if words[0].endswith("/") else None
        if package == "outside":
            continue
        for name in re.findall(r"\b([a-z_]+\.(?:py|yaml))\b", line):
            named.add(f"{package}/{name}" if package else name)
    return named


def test_the_documented_layout_names_every_module_and_no_other():
    modules = {str(p.relative_to(ROOT / "sipa_core")) for p in (ROOT / "sipa_core").rglob("*")
               if p.suffix in (".py", ".yaml") and p.name != "__init__.py" and "__pycache__" not in p.parts}
    named = _layout_named()
    assert not modules - named, f"docs/development.md's layout omits {sorted(modules - named)}"
    assert not named - modules, f"docs/development.md's layout names {sorted(named - modules)}, which do not exist"

"""DVC's view of the code matches the code: every stage's ``deps`` in dvc.yaml
cover exactly the files of ``sipa_core`` its script imports (the import
closure, lazy imports inside functions included, plus the package
``__init__`` files that importing runs, plus sipa_core/paths.yaml read by
paths.py), so a change to any of them re-runs the stage and a change
elsewhere does not.

``python tests/test_dvc_deps.py`` prints the deps each stage should list.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "sipa_core"
# Files a module reads when imported, or (networks/) the user's network modules it imports when the params name one.
DATA_FILES = {"sipa_core/paths.py": ["sipa_core/paths.yaml"], "sipa_core/models/sources.py": ["networks"]}
USER_CODE = {"networks"}


def _module_file(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _with_parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _imports(path: Path) -> set[str]:
    """Modules of the package that ``path`` imports anywhere (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] == PACKAGE:
                found.update(m for m in _with_parents(name) if _module_file(m) is not None)
    return found


def closure(script: Path) -> set[str]:
    """Repository-relative paths of every package file ``script`` runs when imported."""
    seen: set[str] = set()
    todo = list(_imports(script))
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo.extend(_imports(_module_file(module)) - seen)
    files = {str(_module_file(m).relative_to(ROOT)) for m in seen}
    for module_file, data in DATA_FILES.items():
        if module_file in files:
            files.update(data)
    return files


def _package_files(folder: str) -> set[str]:
    return {str(p.relative_to(ROOT)) for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".yaml")
            and "__pycache__" not in p.parts}


def covered(deps: list[str]) -> set[str]:
    """Package files that a deps list covers (a folder covers every file under it)."""
    out = set()
    for dep in deps:
        if dep in USER_CODE:
            out.add(dep)
        if not dep.startswith(PACKAGE):
            continue
        out |= _package_files(dep) if (ROOT / dep).is_dir() else {dep}
    return out


def suggested_deps(files: set[str]) -> list[str]:
    """The shortest list: a folder when every file under it is needed, else the files."""
    deps, done = [], set()
    folders = sorted({str(Path(f).parent) for f in files if Path(f).parent != Path(PACKAGE)}, key=len)
    for folder in folders:
        if any(folder.startswith(d + "/") for d in deps):
            continue
        if _package_files(folder) <= files:
            deps.append(folder)
            done |= _package_files(folder)
    deps += sorted(files - done)
    return sorted(deps)


def stage_scripts() -> dict[str, Path]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: ROOT / stage["cmd"].split()[-1] for name, stage in stages.items()}


def test_every_stage_depends_on_exactly_the_code_it_imports():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, script in stage_scripts().items():
        deps = stages[name]["deps"]
        rel = str(script.relative_to(ROOT))
        assert rel in deps, f"dvc.yaml: stage {name} does not depend on its own script {rel}"
        need, have = closure(script), covered(deps)
        assert not need - have, f"dvc.yaml: stage {name} misses {sorted(need - have)} (it imports them)"
        assert not have - need, f"dvc.yaml: stage {name} lists {sorted(have - need)}, which it never imports"


def test_the_closure_sees_lazy_imports_and_package_inits(tmp_path):
    files = closure(ROOT / "stages" / "prune.py")
    assert "sipa_core/__init__.py" in files and "sipa_core/prune/__init__.py" in files
    assert "sipa_core/checkpoint.py" in files  # imported by prune/stage.py
    lazy = tmp_path / "lazy.py"  # an import inside a function counts as much as one at the top
    lazy.write_text("def f():\n    from sipa_core.prune.masks import sparsity\n")
    assert _imports(lazy) == {"sipa_core", "sipa_core.prune", "sipa_core.prune.masks"}
    assert "sipa_core/io.py" in files and "sipa_core/params.py" in files and "sipa_core/paths.yaml" in files
    assert not any(f.startswith("sipa_core/search/") for f in files)
    assert "sipa_core/cli.py" not in files and "sipa_core/pipeline.py" not in files


def test_only_the_prepare_stage_runs_the_data_sources():
    """An edit to a data source's reader (an image folder, the CIFAR files) re-runs the prepare
    stage only: the other stages import the prepared-data format alone."""
    for name, script in stage_scripts().items():
        readers = sorted(f for f in closure(script) if f.startswith("sipa_core/data/")
                         and f not in ("sipa_core/data/__init__.py", "sipa_core/data/prepared.py"))
        assert bool(readers) == (name == "prepare"), (name, readers)


def test_no_earlier_stage_runs_quantization_code():
    """An edit to quantization-aware training or to loading a quantized checkpoint re-runs the
    quantizing stage only: no earlier stage imports sipa_core/quantize (nor lists it in dvc.yaml),
    so a user's cached search, improving and pruning (hours on a real data set) stay valid."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name in ("search", "improve", "prune", "accelerate"):
        imported = [f for f in closure(stage_scripts()[name]) if f.startswith("sipa_core/quantize")]
        assert not imported, (name, imported)
        assert not [d for d in stages[name]["deps"] if d.startswith("sipa_core/quantize")], name


if __name__ == "__main__":
    for stage, script in stage_scripts().items():
        print(f"{stage}:")
        for dep in suggested_deps(closure(script)):
            print(f"  - {dep}")
    sys.exit(0)

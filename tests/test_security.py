"""Params never reach eval or a shell, and nothing is imported by name except the user's network
module that the params (or the command line) name, in one place: a scan of the library's source.
That a checkpoint never causes that import by itself is tested in test_network_sources.py."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMPORTS_BY_NAME = ROOT / "sipa_core" / "models" / "sources.py"  # the user's module, once the params name it
FORBIDDEN = {
    r"(?<![.\w])eval\(": "eval",
    r"(?<![.\w])exec\(": "exec",
    r"shell\s*=\s*True": "a shell",
    r"\bos\.system\(": "a shell",
    r"\bos\.popen\(": "a shell",
    r"\bimportlib\b": "an import by name",
    r"__import__\(": "an import by name",
    r"pickle\.loads?\(": "unpickling",
    r"weights_only\s*=\s*False": "an unsafe torch.load",
}


def test_library_has_no_dynamic_code_paths():
    sources = list((ROOT / "sipa_core").rglob("*.py")) + list((ROOT / "stages").glob("*.py"))
    assert len(sources) > 20
    found = []
    for path in sources:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            for pattern, what in FORBIDDEN.items():
                if what == "an import by name" and path == IMPORTS_BY_NAME:
                    continue
                if re.search(pattern, code):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {what}: {line.strip()}")
    assert not found, "\n".join(found)


def test_every_torch_load_is_weights_only():
    for path in (ROOT / "sipa_core").rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path}:{number}: {line.strip()}"

"""Params never reach eval, a shell, or an import by name: a scan of the library's source."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
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
                if re.search(pattern, code):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {what}: {line.strip()}")
    assert not found, "\n".join(found)


def test_every_torch_load_is_weights_only():
    for path in (ROOT / "sipa_core").rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path}:{number}: {line.strip()}"

"""benchmarks/gpu_check.sh cannot rot: its dry mode runs on the CPU (tiny sizes, the paper's
recipe, every variant that runs there; the compiled ones are built and parsed, not run)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # a bash script running several trainings


def test_gpu_check_dry_mode_runs_on_the_cpu():
    out = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_check.sh"), "--dry"], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, "PYTHON": sys.executable}, timeout=600)
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("| eager")]
    assert [r.split("|")[1].strip() for r in rows] == ["eager", "eager, no policy"]
    assert "| sipa_cifar100 |" in rows[0] and "| none |" in rows[1]  # the paper's policy, then without it
    assert out.stdout.count('"recipe_ok": true') == 2 and '"compile_mode": "reduce-overhead"' in out.stdout

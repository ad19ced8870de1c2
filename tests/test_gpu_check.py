"""benchmarks/gpu_check.sh cannot rot: its dry mode runs on the CPU (the paper profile's whole
pipeline at tiny sizes under dvc repro; the throughput variants with the paper's recipe, every
one that runs there; the compiled ones are built and parsed, not run)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # a bash script running several trainings


def test_gpu_check_dry_mode_runs_on_the_cpu():
    out = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_check.sh"), "--dry"], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, "PYTHON": sys.executable}, timeout=900)
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("| eager")]
    assert [r.split("|")[1].strip() for r in rows] == ["eager", "eager, no policy"]
    assert "| sipa_cifar100 |" in rows[0] and "| none |" in rows[1]  # the paper's policy, then without it
    assert out.stdout.count('"recipe_ok": true') == 2 and '"compile_mode": "reduce-overhead"' in out.stdout
    pipeline = [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{"check": "pipeline"')]
    assert [r.get("stage") for r in pipeline] == ["prepare", "search", "improve", "prune", "accelerate",
                                                  "quantize", None]
    assert pipeline[-1]["ok"] and pipeline[-1]["onnx"] == ["models/quantize_onnx/full.onnx"]
    assert all(r["device"] == "cpu" and r["processes"] == 1 for r in pipeline[:-1])
    quantize = pipeline[-2]
    assert quantize["onnx_integer_layers"] > 0 and quantize["onnx_float_layers"] == 0
    assert all(r["images_trained"] > 0 for r in pipeline[1:-1])  # every model stage trained
    assert pipeline[3]["rounds"] == 2  # the paper's first and last pruning rounds


def test_the_gpu_profile_is_planned_in_minutes_and_runs_end_to_end_on_the_cpu(tmp_path):
    """profiles/gpu-cifar100.yaml: at most 7 minutes of training on one H100 by `sipa plan` at the
    throughput it is planned with (sipa_baseline at 63 px with the authors' policy, bf16: 10,600
    images/s), and its whole pipeline at toy scale under dvc repro on the CPU."""
    plan = subprocess.run([sys.executable, "-m", "sipa_core.cli", "plan", "profiles/gpu-cifar100.yaml",
                           "--throughput", "10600", "--json"], cwd=ROOT, capture_output=True, text=True)
    assert plan.returncode == 0, plan.stderr
    planned = json.loads(plan.stdout)
    assert planned["data"] == {"classes": 100, "train": 45_000, "val": 5_000, "test": 10_000}
    assert planned["estimated_seconds"] <= 7 * 60
    assert all(r["resolution"] == 63 for r in planned["trainings"])
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/toy_pipeline.py"), "--profile",
                          str(ROOT / "profiles/gpu-cifar100.yaml"), "--workdir", str(tmp_path / "toy"), "--dry"],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{"check": "pipeline"')]
    assert [r.get("stage") for r in rows] == ["prepare", "search", "improve", "prune", "accelerate", "quantize",
                                              None]
    assert rows[-1]["ok"] and rows[-1]["profile"] == "gpu-cifar100.yaml"
    assert all(r["images_trained"] > 0 for r in rows[1:-1])

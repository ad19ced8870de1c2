"""Networks from elsewhere through all seven stages at toy scale (the slow tier of the contract
over sources; tests/test_network_sources.py is the fast one): the user's own module from a file
and torchvision's MobileNetV2, each searched (preset), improved, filter-pruned, given an exit after
a named stage, quantized to an integer ONNX graph and reported. torchvision's ResNet-18 runs the
same way with ``benchmarks/toy_pipeline.py --preset`` (docs/networks.md); at toy scale it takes
4 minutes here, too long for the suite."""

import csv
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from sipa_core.accelerate.stage import STAGE as ACCELERATE
from sipa_core.checkpoint import load_model, read_checkpoint
from sipa_core.data.prepare import STAGE as PREPARE
from sipa_core.improve.stage import STAGE as IMPROVE
from sipa_core.models import split
from sipa_core.prune.stage import STAGE as PRUNE
from sipa_core.quantize.stage import STAGE as QUANTIZE
from sipa_core.report import STAGE as REPORT
from sipa_core.search.stage import STAGE as SEARCH
from sipa_core.stage_runner import stage_main

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from toy_pipeline import toy_params  # noqa: E402

pytestmark = pytest.mark.slow
STAGES = (PREPARE, SEARCH, IMPROVE, PRUNE, ACCELERATE, QUANTIZE, REPORT)


def _project(tmp_path: Path, preset: str, positions: list) -> Path:
    shutil.copytree(ROOT / "datasets", tmp_path / "datasets")
    shutil.copytree(ROOT / "tests" / "networks", tmp_path / "networks")  # the user's folder of networks
    shutil.copy(ROOT / "networks" / "example_cnn.py", tmp_path / "networks" / "example_cnn.py")
    params = toy_params(yaml.safe_load((ROOT / "params.yaml").read_text()), 4, True, 1)
    params["search"].update(method="preset", preset=preset)
    params["improve"].update(greedy=False, adopt=["swish"])  # a structural technique, recorded in the spec
    params["prune"].update(granularity="filter", round_to=4, schedule=[0.3])
    params["accelerate"].update(positions=positions, compare_loss=False)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return tmp_path


@pytest.mark.parametrize("preset, positions, exit_after", [
    ("networks/example_cnn.py:build(width=8)", [0, "stage2"], {"stem", "stage2"}),
    ("torchvision:mobilenet_v2(width_mult=0.25)", ["features.3"], {"features.3"}),
])
def test_a_network_from_elsewhere_runs_all_seven_stages(tmp_path, monkeypatch, capsys, preset, positions,
                                                        exit_after):
    monkeypatch.chdir(_project(tmp_path, preset, positions))
    for stage in STAGES:
        stage_main(stage, ["--params", "params.yaml"])
    out = capsys.readouterr().out
    assert "accelerate: exit after block" in out or "passes through" in out
    improved = read_checkpoint("models/improve.pt").arch
    assert improved["name"] == preset.split("(")[0] and improved["activation"] == "swish"
    pruned = read_checkpoint("models/prune.pt").arch
    assert pruned["resized"], "filter pruning recorded no resized layer"
    metrics = yaml.safe_load(Path("metrics/quantize.json").read_text())
    assert metrics["onnx_float_layers"] == 0 and metrics["onnx_integer_layers"] > 0
    assert metrics["onnx_integer_mac_share"] >= 0.95
    with open("plots/accelerate_exits.csv") as f:
        trained = {int(row["position"]) for row in csv.DictReader(f)}
    blocks = split.boundaries(load_model("models/prune.pt")[0])
    assert {blocks[p].name for p in trained} == exit_after  # names and indices both name blocks
    assert "| Quantizing" in Path("reports/table1.md").read_text()

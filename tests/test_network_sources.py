"""Network sources (sipa_core/models/sources.py): registered names, torchvision:, timm:, and the
user's own module, each built, forwarded, counted and round-tripped through a checkpoint."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch_pruning as tp
from torch import nn
from torchvision.models import get_model_weights

from sipa_core.checkpoint import load_model, save_model
from sipa_core.errors import SipaError
from sipa_core.models import create_model, create_spec, list_architectures
from sipa_core.entry_points import named_entry_point, trust_entry_point
from sipa_core.models.sources import resized_layers
from sipa_core.scoring import count
from sipa_core.scoring.counter import UncountedOperator

ROOT = Path(__file__).resolve().parents[1]
USER = "tests/networks/user_cnn.py"
EXAMPLE = "networks/example_cnn.py:build"  # the worked example of docs/networks.md
SOURCES = [*list_architectures(), "torchvision:mobilenet_v2(width_mult=0.5, small_input=true)",
           "torchvision:resnet18(small_input=true)", f"{USER}:build(width=4)"]


@pytest.fixture(autouse=True)
def _from_the_root(monkeypatch):
    monkeypatch.chdir(ROOT)
    trust_entry_point(f"{USER}:build")
    trust_entry_point(EXAMPLE)


@pytest.mark.parametrize("source", SOURCES)
def test_every_source_builds_forwards_counts_and_round_trips(source, tmp_path):
    torch.manual_seed(0)
    model = create_model(create_spec(source, num_classes=10, image_size=32)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 10)
    result = count(model, (3, 32, 32))
    convs = sum(o.mults for o in result.ops_list if o.op == "conv")
    values = sum(t.numel for t in result.tensors)  # every parameter, BatchNorm folded to one bias per channel
    expected = sum(p.numel() for p in model.parameters()) - _bn_affine(model) + _bn_bias_count(model)
    assert convs > 0 and values == expected
    save_model(tmp_path / "m.pt", model, stage="test")
    loaded, ckpt = load_model(tmp_path / "m.pt")
    assert ckpt.arch["name"] == model.spec["name"]
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), y)


def _bn_affine(model):  # folded BatchNorm: its scale joins the conv, its shift stays as a bias
    return sum(m.weight.numel() + m.bias.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def _bn_bias_count(model):
    return sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet18"])
def test_score_at_224_matches_torchvisions_own_count(name):
    """torchvision's weights metadata (``_ops``, GFLOPS as multiply-adds of its convolutions and
    linear layers, rounded to 3 decimals) is the independent count."""
    model = create_model(create_spec(f"torchvision:{name}", num_classes=1000, image_size=224))
    result = count(model, (3, 224, 224))
    macs = sum(o.mults for o in result.ops_list if o.op in ("conv", "linear"))
    reference = get_model_weights(name).DEFAULT.meta["_ops"] * 1e9
    assert macs == pytest.approx(reference, rel=0.01)


def test_small_input_is_the_stem_stride_and_pool():
    resnet = create_model(create_spec("torchvision:resnet18(small_input=true)", num_classes=10))
    assert resnet.conv1.stride == (1, 1) and isinstance(resnet.maxpool, nn.Identity)
    plain = create_model(create_spec("torchvision:resnet18", num_classes=10))
    assert plain.conv1.stride == (2, 2) and isinstance(plain.maxpool, nn.MaxPool2d)
    mobile = create_model(create_spec("torchvision:mobilenet_v2(small_input=true)", num_classes=10))
    assert mobile.features[0][0].stride == (1, 1)


def test_activation_swap_is_recorded_and_rebuilt(tmp_path):
    model = create_model(create_spec("torchvision:mobilenet_v2(activation=swish)", num_classes=10))
    assert not any(isinstance(m, nn.ReLU6) for m in model.modules())
    assert any(isinstance(m, nn.SiLU) for m in model.modules())


def test_filter_pruned_layers_are_recorded_and_rebuilt(tmp_path):
    model = create_model(create_spec(f"{USER}:build", num_classes=10)).eval()
    example = torch.randn(1, 3, 32, 32)
    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=0.5, ignored_layers=[model.fc])
    pruner.step()
    fresh = create_model(create_spec(f"{USER}:build", num_classes=10))
    model.spec = {**model.spec, "resized": resized_layers(model, fresh)}
    assert model.spec["resized"]["conv1"] == {"in_channels": 3, "out_channels": 4, "groups": 1}
    save_model(tmp_path / "p.pt", model)
    loaded, _ = load_model(tmp_path / "p.pt")
    with torch.no_grad():
        assert torch.equal(loaded.eval()(example), model(example))


def test_unknown_names_are_one_clear_error():
    with pytest.raises(SipaError, match="torchvision has no model 'mobilenet_v9'.*mobilenet_v2"):
        create_spec("torchvision:mobilenet_v9")
    with pytest.raises(SipaError, match="arguments are key=value"):
        create_spec("torchvision:resnet18(7)")
    with pytest.raises(SipaError, match="resnet18.*unexpected keyword argument 'width'"):
        create_model(create_spec("torchvision:resnet18(width=3)"))
    with pytest.raises(SipaError, match="no function 'nope'"):
        trust_entry_point(f"{USER}:nope")
        create_model(create_spec(f"{USER}:nope"))
    with pytest.raises(SipaError, match="returned str, not a torch.nn.Module"):
        trust_entry_point(f"{USER}:build_not_a_module")
        create_model(create_spec(f"{USER}:build_not_a_module"))


@pytest.mark.slow  # a subprocess
def test_a_checkpoint_never_imports_an_entry_point_by_itself(tmp_path):
    model = create_model(create_spec(f"{USER}:build", num_classes=10))
    save_model(tmp_path / "m.pt", model)
    code = ("import sys; from sipa_core.checkpoint import load_model; from sipa_core.errors import SipaError\n"
            "try:\n    load_model(sys.argv[1])\nexcept SipaError as e:\n    print(e); sys.exit(2)")
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.pt")], capture_output=True, text=True,
                         cwd=ROOT)
    assert run.returncode == 2 and "params do not name" in run.stdout and USER in run.stdout


def test_the_counter_names_the_operator_it_cannot_count():
    trust_entry_point(f"{USER}:build_uncountable")
    with pytest.raises(UncountedOperator, match="cumsum"):
        count(create_model(create_spec(f"{USER}:build_uncountable", num_classes=10)), (3, 32, 32))


@pytest.mark.slow  # a subprocess
def test_sipa_score_names_the_operator_it_cannot_count():
    run = subprocess.run([sys.executable, "-m", "sipa_core.cli", "score", "--arch", f"{USER}:build_uncountable",
                          "--num-classes", "10"], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 2 and "cumsum" in run.stderr and len(run.stderr.strip().splitlines()) == 1


def test_params_name_network_files_under_networks_only(tmp_path, monkeypatch):
    assert named_entry_point("networks/example_cnn.py:build(width=8)", "p") == "networks/example_cnn.py:build"
    assert named_entry_point("torchvision:resnet18", "p") is None
    assert named_entry_point("models/search/arch.yaml", "p") is None
    with pytest.raises(SipaError, match="p: tests/networks/user_cnn.py is outside networks/"):
        named_entry_point(f"{USER}:build", "p")


def test_without_timm_a_timm_source_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(SipaError, match=r"timm: networks are not installed \(pip install timm\)"):
        create_spec("timm:resnet18")


@pytest.mark.slow  # a subprocess
def test_sipa_score_counts_a_user_checkpoint_once_the_entry_point_is_named(tmp_path):
    model = create_model(create_spec(f"{EXAMPLE}(width=8)", num_classes=10))
    save_model(tmp_path / "m.pt", model)
    cli = [sys.executable, "-m", "sipa_core.cli", "score", "--checkpoint", str(tmp_path / "m.pt"), "--json"]
    refused = subprocess.run(cli, capture_output=True, text=True, cwd=ROOT)
    assert refused.returncode == 2 and "params do not name" in refused.stderr
    counted = subprocess.run(cli + ["--arch", EXAMPLE], capture_output=True, text=True, cwd=ROOT)
    assert counted.returncode == 0, counted.stderr
    assert json.loads(counted.stdout)["params"] == count(model, (3, 32, 32)).summary()["params"]

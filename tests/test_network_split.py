"""Any network split for an early exit where its blocks end, and its BatchNorm folded for
quantizing, found by tracing (sipa_core/models/split.py, quantize/qat.py); the sources are those
of tests/test_network_sources.py."""

import pytest
import torch
from torch import nn

from sipa_core.accelerate.exits import EarlyExitNetwork, exit_config, exit_cost
from sipa_core.entry_points import trust_entry_point
from sipa_core.errors import SipaError
from sipa_core.models import create_model, create_spec, split
from sipa_core.quantize.qat import fold_batchnorm
from sipa_core.quantize.quantizers import quantization_targets
from sipa_core.scoring import count
from test_network_sources import EXAMPLE, ROOT, USER


@pytest.fixture(autouse=True)
def _from_the_root(monkeypatch):
    monkeypatch.chdir(ROOT)
    trust_entry_point(f"{USER}:build")
    trust_entry_point(EXAMPLE)


@pytest.mark.parametrize("source", ["torchvision:resnet18(small_input=true)", "torchvision:mobilenet_v2", EXAMPLE])
def test_any_network_splits_for_an_exit_where_its_stages_end(source):
    model = create_model(create_spec(source, num_classes=10)).eval()
    blocks = split.boundaries(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
        for position in sorted({0, len(blocks) // 2, len(blocks) - 2}):  # the first, a middle and the last
            h = split.features(model, x, position)
            assert h.shape[1:] == (blocks[position].out_channels, blocks[position].out_size,
                                   blocks[position].out_size)
            assert torch.allclose(split.rest(model, h, position), y, atol=1e-5)


def test_stages_found_by_tracing_are_the_networks_own():
    resnet = create_model(create_spec("torchvision:resnet18", num_classes=10))
    assert [b.name for b in split.boundaries(resnet)] == ["conv1", "layer1", "layer2", "layer3", "layer4"]
    mobile = create_model(create_spec("torchvision:mobilenet_v2", num_classes=10))
    assert [b.name for b in split.boundaries(mobile)] == [f"features.{i}" for i in range(19)]
    example = create_model(create_spec(EXAMPLE, num_classes=10))
    assert [b.name for b in split.boundaries(example)] == ["stem", "stage1", "stage2", "stage3"]
    user = create_model(create_spec(f"{USER}:build", num_classes=10))  # conv3's output is added to conv2's
    with pytest.raises(SipaError, match="no stages found in TinyCNN"):  # conv1 and conv2 only
        split.boundaries(user)


def test_an_exit_after_a_named_stage_is_counted_on_the_path_to_it():
    model = create_model(create_spec("torchvision:resnet18(small_input=true)", num_classes=10))
    net = EarlyExitNetwork(model, exit_config(model, 1))
    cost = exit_cost(net, (3, 32, 32))
    full = count(model, (3, 32, 32))
    stem_and_layer1 = sum(o.mults for o in full.ops_list if o.module.startswith(("conv1", "bn1", "relu", "maxpool",
                                                                                   "layer1")))
    assert cost.path_mults == pytest.approx(stem_and_layer1)
    assert net.exit_cfg.channels == 64 and net.exit_cfg.width == 512  # the classifier's input width


@pytest.mark.parametrize("source", ["torchvision:resnet18", f"{USER}:build"])
def test_batchnorm_is_folded_wherever_the_forward_puts_it(source):
    """torchvision's ResNet keeps conv1 / bn1 as attributes (no Sequential): tracing finds them."""
    model = create_model(create_spec(source, num_classes=10)).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
        folded = fold_batchnorm(model)
        assert folded == sum(isinstance(m, nn.Identity) for m in model.modules()) > 0
        assert torch.allclose(model(x), y, atol=1e-4)


def test_a_conv_subclass_with_its_own_forward_is_an_error_not_a_float_layer():
    class PaddedConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(torch.nn.functional.pad(x, (1, 0, 1, 0)))

    model = nn.Sequential(PaddedConv(3, 4, 2), nn.ReLU())
    with pytest.raises(SipaError, match="layer 0 is a PaddedConv"):
        quantization_targets(model)

"""The block-string decoder, the EfficientNet builder and the registry."""

import pytest
import torch

from sipa_core.errors import SipaError
from sipa_core.models import (create_model, decode_block, efficientnet_spec, create_spec, list_architectures,
                              round_filters)
from sipa_core.models.layers import same_padding

# The searched baseline as the authors' public code builds it (Lee-Gihun/MicroNet_OSI-AI):
# (kernel, stride, expand, in, out, SE width, residual, out size).
BASELINE_TABLE = [
    (3, 1, 1, 24, 16, 4, False, 31),
    (3, 1, 6, 16, 24, 3, False, 31),
    (3, 2, 6, 24, 40, 4, False, 15),
    (3, 1, 6, 40, 40, 8, True, 15),
    (3, 1, 6, 40, 48, 8, False, 15),
    (3, 1, 6, 48, 64, 9, False, 15),
    (3, 1, 6, 64, 64, 12, True, 15),
    (3, 2, 6, 64, 80, 12, False, 7),
    (3, 1, 6, 80, 80, 16, True, 7),
    (3, 1, 6, 80, 96, 16, False, 7),
]


def test_block_string_round_trip():
    b = decode_block("r2_k3_s2_e6_i24_o40_se0.2")
    assert (b.repeats, b.kernel, b.stride, b.expand, b.in_ch, b.out_ch, b.se_ratio) == (2, 3, 2, 6, 24, 40, 0.2)
    assert b.encode() == "r2_k3_s2_e6_i24_o40_se0.2"
    assert decode_block("r1_k5_s22_e6_i24_o40_se0.25").stride == 2  # EfficientNet's two-digit strides
    assert decode_block("r1_k3_s1_e1_i8_o8_noskip").skip is False
    assert decode_block("r1_k3_s1_e1_i8_o8").se_ratio is None


@pytest.mark.parametrize("bad", ["", "r2_k3_s2_e6_i24", "r2_k3_s2_e6_i24_o40_x5", "r0_k3_s1_e6_i8_o8",
                                 "r1_kx_s1_e6_i8_o8", "r1_k3_s1_e6_i8_o8_se1.5", "r1_k3_s1_s2_e6_i8_o8",
                                 "r1_k1_s2_e6_i8_o8_sefoo"])
def test_malformed_block_strings_raise(bad):
    with pytest.raises(SipaError, match="block string"):
        decode_block(bad)


def test_round_filters_matches_efficientnet():
    assert [round_filters(c, 0.9) for c in (24, 16, 40, 56, 72, 88, 104, 150)] == [24, 16, 40, 48, 64, 80, 96, 136]
    assert round_filters(32, 1.0) == 32 and round_filters(3, 1.0) == 8


def test_same_padding_as_if_32_pixels():
    assert same_padding(3, 2, 32) == (0, 1)  # stride-2 3x3: 0 left/top, 1 right/bottom
    assert same_padding(3, 1, 32) == (1, 1)
    assert same_padding(5, 2, 16) == (1, 2)


def test_sipa_baseline_matches_the_authors_table():
    model = create_model("sipa_baseline").eval()
    assert model.input_size == 63
    stem_conv = model.stem[0]
    assert (stem_conv.in_channels, stem_conv.out_channels, stem_conv.stride) == (3, 24, (2, 2))
    assert stem_conv.bias is None
    assert len(model.blocks) == len(BASELINE_TABLE)
    for block, info, row in zip(model.blocks, model.boundaries(), BASELINE_TABLE):
        k, s, e, cin, cout, se, residual, size = row
        dw = block.depthwise[0]
        assert dw.kernel_size == (k, k) and dw.stride == (s, s) and dw.groups == cin * e
        assert (block.expand is None) == (e == 1)
        assert block.project[0].in_channels == cin * e and block.project[0].out_channels == cout
        assert block.se.reduce.out_channels == se and block.se.reduce.in_channels == cin * e
        assert block.se.reduce.bias is not None and block.se.expand.bias is not None
        assert block.residual == residual
        assert (info.out_channels, info.out_size) == (cout, size)
    assert model.head[0].in_channels == 96 and model.head[0].out_channels == 136
    assert (model.classifier.in_features, model.classifier.out_features) == (136, 100)
    assert model.dropout.p == 0.2
    assert [round(b.drop_rate, 3) for b in model.blocks] == [round(0.2 * i / 10, 3) for i in range(10)]

    shapes = []
    x = model.forward_stem(torch.zeros(1, 3, 32, 32))
    shapes.append(tuple(x.shape[1:]))
    for block in model.blocks:
        x = block(x)
        shapes.append(tuple(x.shape[1:]))
    assert shapes[0] == (24, 31, 31)
    assert shapes[1:] == [(row[4], row[7], row[7]) for row in BASELINE_TABLE]
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 100)
    n = sum(p.numel() for name, p in model.named_parameters() if not isinstance(
        model.get_submodule(name.rsplit(".", 1)[0]), torch.nn.BatchNorm2d))
    assert n == 470_776  # weights and biases, before folding BatchNorm


def test_forward_in_pieces_equals_forward():
    model = create_model("sipa_baseline_32", num_classes=10).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        mid = model.forward_blocks(model.forward_stem(x), 0, 5)
        split = model.forward_head(model.forward_blocks(mid, 5))
        assert torch.equal(split, model(x))


def test_wrn28_10_and_registry():
    assert {"sipa_baseline", "sipa_baseline_32", "wrn28_10"} <= set(list_architectures())
    model = create_model("wrn28_10")
    assert sum(p.numel() for p in model.parameters()) == 36_536_884
    with pytest.raises(SipaError, match="did you mean 'sipa_baseline'"):
        create_spec("sipa_baselin")


def test_impossible_shapes_are_clear_errors():
    with pytest.raises(SipaError, match="leaves no pixels"):
        create_model(efficientnet_spec(["r1_k3_s2_e1_i8_o8"] * 3, resolution=0.1))  # a 4x4 input
    with pytest.raises(SipaError, match="takes 16 channels"):
        create_model(efficientnet_spec(["r1_k3_s1_e1_i8_o8", "r1_k3_s1_e1_i16_o8"]))
    with pytest.raises(SipaError, match="activation"):
        efficientnet_spec(["r1_k3_s1_e1_i8_o8"], activation="wiggle")
    with pytest.raises(SipaError, match="width"):
        efficientnet_spec(["r1_k3_s1_e1_i8_o8"], width=0)


def _convs(model):
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    depthwise = [m for m in convs if m.groups == m.in_channels > 1]
    pointwise = [m for m in convs if m.kernel_size == (1, 1) and m.groups == 1 and m.out_channels >= 64]
    assert depthwise and pointwise
    return depthwise, pointwise


def test_init_rule_efficientnet_is_he_normal_over_fan_out_per_group():
    """``init: efficientnet``: depthwise convs start at the scale of a 3x3 single-channel filter
    (std sqrt(2/9)), not divided again by their channel count."""
    torch.manual_seed(0)
    depthwise, pointwise = _convs(create_model("sipa_baseline", init="efficientnet"))
    for conv in depthwise:
        kh, kw = conv.kernel_size
        assert conv.weight.std().item() == pytest.approx((2 / (kh * kw)) ** 0.5, rel=0.25), conv
    for conv in pointwise:
        assert conv.weight.std().item() == pytest.approx((2 / conv.out_channels) ** 0.5, rel=0.25), conv


def test_default_init_is_pytorchs_and_the_rule_is_a_checked_spec_key():
    """The default (``init: pytorch``) is each layer's own reset_parameters: kaiming_uniform with
    a=sqrt(5), i.e. uniform over +-1/sqrt(fan_in), std 1/sqrt(3 fan_in)."""
    torch.manual_seed(0)
    model = create_model("sipa_baseline")
    assert model.spec["init"] == "pytorch"
    depthwise, pointwise = _convs(model)
    for conv in depthwise + pointwise:
        fan_in = conv.weight[0].numel()
        assert conv.weight.abs().max().item() <= 1 / fan_in ** 0.5 + 1e-6
        assert conv.weight.std().item() == pytest.approx((1 / (3 * fan_in)) ** 0.5, rel=0.25), conv
    with pytest.raises(SipaError, match="init must be one of pytorch, efficientnet"):
        efficientnet_spec(["r1_k3_s1_e1_i8_o8"], init="xavier")

"""ReLUs folded into the integer layer before them (quantize.fuse_relu, sipa_core/quantize/relus.py):
which ReLUs qualify, what QAT builds for them, the record, and onnxruntime running the network
without a ReLU or a float conversion left between its layers."""

from dataclasses import replace

import numpy as np
import pytest
import torch
import torchvision
import yaml

from helpers import tiny_model
from sipa_core.latency import integer_share, kernel_macs
from sipa_core.quantize.activations import QuantReLU
from sipa_core.quantize.config import inactive, read_config
from sipa_core.quantize.export import OnnxNetwork, export_network
from sipa_core.quantize.onnx_integer import integer_kernel_counts
from sipa_core.quantize.qat import calibrate, float_twin, fold_batchnorm, quantize_modules
from sipa_core.quantize.quantizers import FusedRelu, Quantizers, fitted_quantizers
from sipa_core.quantize.relus import fusable_relus
from sipa_core.scoring import BitWidths, count

SHAPE = (3, 16, 16)
# The tiny ReLU network: the stem's, the depthwise convs' (pooled and gated by SE) and the head's
# (pooled) ReLUs are read by something other than one layer; the expansion's and the SE blocks'
# ReLUs feed one conv each.
TINY_RELUS = (FusedRelu("stem.2", "stem.0", None),
              FusedRelu("blocks.0.depthwise.2", "blocks.0.depthwise.0", None),
              FusedRelu("blocks.0.se.act", "blocks.0.se.reduce", "blocks.0.se.expand"),
              FusedRelu("blocks.1.expand.2", "blocks.1.expand.0", "blocks.1.depthwise.0"),
              FusedRelu("blocks.1.depthwise.2", "blocks.1.depthwise.0", None),
              FusedRelu("blocks.1.se.act", "blocks.1.se.reduce", "blocks.1.se.expand"),
              FusedRelu("head.2", "head.0", None))


def _quantized(fuse: bool, bits: int = 8):
    model = tiny_model(activation="relu").eval()
    torch.manual_seed(0)
    batches = [torch.randn(16, *SHAPE)]
    quantizers = fitted_quantizers(model, batches, "fitted", "stats", outputs=8)
    quantizers = replace(quantizers, relus=fusable_relus(model) if fuse else ())
    fold_batchnorm(model)
    quantize_modules(model, BitWidths(bits, bits), quantizers)
    calibrate(model, batches)
    return model.eval()


def test_the_relus_that_read_a_layer_alone_and_what_reads_them():
    assert fusable_relus(tiny_model(activation="relu")) == TINY_RELUS
    assert fusable_relus(tiny_model(activation="swish")) == ()
    # torchvision's ResNet: each block calls one ReLU module twice, the second after the addition;
    # only the stem's ReLU (read by the max pool) qualifies
    assert fusable_relus(torchvision.models.resnet18()) == (FusedRelu("relu", "conv1", None),)


def test_a_fused_relu_takes_its_layers_output_quantizer():
    model = _quantized(fuse=True)
    modules = dict(model.named_modules())
    for relu, layer, reader in TINY_RELUS:
        assert not modules[layer].output_quant.is_quant_enabled, layer
        # read by one layer: that layer's unsigned input quantizer quantizes it; else its own
        assert isinstance(modules[relu], QuantReLU) == (reader is None), relu
    own = [m.output_quant for m in model.modules() if isinstance(m, QuantReLU)]
    assert own and all(q.zero_point.item() == 0 and q.act_scale.item() > 0 for q in own)
    assert modules["blocks.0.project.0"].output_quant.is_quant_enabled  # no ReLU after it
    unfused = _quantized(fuse=False)
    assert all(dict(unfused.named_modules())[layer].output_quant.is_quant_enabled for _, layer, _ in TINY_RELUS)
    # the quantizers are not counted: both networks score the same, their float twins plain ReLUs
    twin = float_twin(model)
    assert not any(isinstance(m, QuantReLU) for m in twin.modules())
    assert count(twin, SHAPE, bits=BitWidths(8, 8)).summary() == count(float_twin(unfused), SHAPE,
                                                                       bits=BitWidths(8, 8)).summary()


# QuantizeLinear nodes left when fused: the image's, and the requantizations between two quantizers
# (block 0's projection output into block 1's shifted input; at 4 bits the stem ReLU's 8-bit output
# into block 0's 4-bit input too)
@pytest.mark.parametrize("bits, quantize_nodes", [(8, 2), (4, 3)])
def test_onnxruntime_folds_every_fused_relu_into_its_layers_kernel(tmp_path, bits, quantize_nodes):
    """Fused: no ReLU left, no conversion around one, all multiply-adds in integer kernels, the
    logits as PyTorch computes them. Unfused: a conversion to float and back around every ReLU."""
    x = torch.randn(64, *SHAPE)
    kernels = {}
    for fuse in (True, False):
        model = _quantized(fuse, bits)
        files = export_network(model, None, SHAPE, tmp_path / str(fuse))
        assert integer_share(kernel_macs(files["full"])) == 1.0
        kernels[fuse] = integer_kernel_counts(files["full"])
        out = OnnxNetwork.load(files).logits(x.numpy(), False)[0]
        with torch.no_grad():
            ref = model(x).numpy()
        assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.98
        assert np.abs(out - ref).max() <= 2 * np.abs(ref).max() / 127
    assert "Relu" not in kernels[True] and kernels[True]["QuantizeLinear"] == quantize_nodes, kernels[True]
    # unfused, a ReLU read by one layer is dropped too, leaving its conversions (DequantizeLinear ->
    # QuantizeLinear, a requantization in float); one read by pooling or two nodes runs between them
    assert kernels[False]["Relu"] == sum(r.reader is None for r in TINY_RELUS), kernels[False]
    assert kernels[False]["QuantizeLinear"] >= quantize_nodes + len(TINY_RELUS), kernels[False]


def test_the_record_keeps_the_fused_relus_and_older_records_have_none():
    quantizers = Quantizers({"head.0": "unsigned"}, "stats", 8, TINY_RELUS)
    assert Quantizers.from_record(quantizers.as_record()) == quantizers
    older = {"inputs": {"head.0": "unsigned"}, "weight_scale": "stats", "outputs": 8}
    assert Quantizers.from_record(older).relus == () and "relus" not in replace(quantizers, relus=()).as_record()


@pytest.mark.parametrize("section, line", [
    ({}, None),
    ({"output_bits": None}, "quantize.fuse_relu: output_bits is null (no output quantizer to move)"),
    ({"act_quantizers": "signed"}, "quantize.fuse_relu: act_quantizers is signed (onnxruntime folds a ReLU "
                                   "only into an unsigned quantizer)"),
])
def test_fuse_relu_without_output_quantizers_or_fitted_inputs_is_shown_inactive(tmp_path, section, line):
    params, raw = tmp_path / "params.yaml", {"fuse_relu": True, **section}
    params.write_text(yaml.safe_dump({"quantize": raw}))
    assert inactive(read_config(params), raw) == ([line] if line else [])

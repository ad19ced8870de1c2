"""Where onnxruntime runs a network's multiply-adds, and interleaved speed measurement:
the float graph counted layer by layer, the output-quantized integer graph in QLinear kernels,
the graph without output quantizers in ConvInteger, and the timing's interleaving."""

import time

import numpy as np
import pytest
import torch

from helpers import tiny_model
from sipa_core.latency import integer_share, kernel_macs, measure
from sipa_core.quantize.activations import OutputQuant, QuantSqueezeExcite, QuantSwish
from sipa_core.quantize.onnx_integer import integer_kernel_counts
from sipa_core.quantize.export import OnnxNetwork, export_network
from sipa_core.quantize.qat import calibrate, fold_batchnorm, quantize_modules
from sipa_core.quantize.quantizers import Quantizers
from sipa_core.scoring import BitWidths

SHAPE = (3, 16, 16)


def _layer_macs(model) -> float:
    """Multiply-adds per image of every conv and linear layer, from forward hooks."""
    total = []

    def hook(module, args, out):
        per_output = module.weight[0].numel() if isinstance(module, torch.nn.Conv2d) else module.in_features
        total.append(out[0].numel() * per_output)

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        model(torch.zeros(1, *SHAPE))
    for h in handles:
        h.remove()
    return float(sum(total))


def _quantized(outputs, bits=8):
    model = tiny_model().eval()
    fold_batchnorm(model)
    quantize_modules(model, BitWidths(bits, bits), Quantizers({"blocks.1.project.0": "shifted"}, "stats", outputs))
    torch.manual_seed(0)
    calibrate(model, [torch.randn(16, *SHAPE)])
    return model.eval()


def test_the_float_graph_counts_every_layer_in_float_kernels(tmp_path):
    model = tiny_model().eval()
    files = export_network(model, None, SHAPE, tmp_path, quantized=False)
    macs = kernel_macs(files["full"])
    assert sum(macs.values()) == pytest.approx(_layer_macs(model))
    assert integer_share(macs) == 0.0
    x = torch.randn(5, *SHAPE)
    out = OnnxNetwork.load(files).logits(x.numpy(), False)[0]
    assert np.allclose(out, model(x).detach().numpy(), atol=1e-5)


@pytest.mark.parametrize("bits", [8, 4])
def test_with_output_quantizers_every_layer_runs_in_a_qlinear_kernel(tmp_path, bits):
    """The output-quantized network's integer graph: onnxruntime fuses every conv into QLinearConv
    (the depthwise ones too) and the classifier into QGemm, so all its multiply-adds run in
    integer kernels; it computes what the PyTorch network computes."""
    model = _quantized(outputs=8, bits=bits)
    files = export_network(model, None, SHAPE, tmp_path)
    macs = kernel_macs(files["full"])
    assert set(macs) == {"QLinearConv", "QGemm"}, macs
    assert integer_share(macs) == 1.0
    assert sum(macs.values()) == pytest.approx(_layer_macs(model))
    # every sigmoid (swish's and the SE gates') quantized, run as QLinearSigmoid; a swish whose
    # product feeds one layer only (expand -> depthwise) as QLinearMul
    sigmoids = sum(isinstance(m, (QuantSwish, QuantSqueezeExcite)) for m in model.modules())
    ops = integer_kernel_counts(files["full"])
    assert sigmoids > 0 and ops["QLinearSigmoid"] == sigmoids and ops["QLinearMul"] >= 1, ops
    # a swish whose product is pooled and gated (SE blocks) or pooled (the head) has its own output
    # quantizer, its range from the calibration batches: that product runs as QLinearMul too
    shared = [m for m in model.modules() if isinstance(m, OutputQuant)]
    se_blocks = sum(isinstance(m, QuantSqueezeExcite) for m in model.modules())
    assert len(shared) == se_blocks + 1 and all(q.act_scale.item() > 0 and q.observed is None for q in shared)
    assert all(0 <= q.zero_point.item() <= 255 for q in shared)
    assert not [n for n, _ in model.named_parameters() if "act_scale" in n]  # fixed after calibration
    assert ops["QLinearMul"] >= len(shared) + 1 and ops.get("Mul", 0) <= 2, ops
    # the SE blocks' pooling and the head's run on the quantized tensor
    assert ops["QLinearGlobalAveragePool"] == se_blocks + 1 and "ReduceMean" not in ops, ops
    x = torch.randn(64, *SHAPE)
    out = OnnxNetwork.load(files).logits(x.numpy(), False)[0]
    with torch.no_grad():
        ref = model(x).numpy()
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.98
    assert np.abs(out - ref).max() <= 2 * np.abs(ref).max() / 127  # within two steps of the output's 8 bits


def test_without_output_quantizers_the_layers_run_as_conv_integer(tmp_path):
    """The graph of a network trained without output quantizers (quantize.output_bits: null):
    ConvInteger / MatMulInteger, not QLinear kernels."""
    files = export_network(_quantized(outputs=None), None, SHAPE, tmp_path)
    macs = kernel_macs(files["full"])
    assert macs.get("ConvInteger", 0) > 0 and "MatMulInteger" in macs and "QGemm" not in macs, macs


def test_measure_interleaves_and_tells_slow_from_fast():
    calls = []

    def runner(name, delay):
        def run(batch):
            calls.append(name)
            time.sleep(delay * len(batch))
        return run

    x = np.zeros((8, 1), np.float32)
    speeds = measure({"slow": runner("slow", 0.004), "fast": runner("fast", 0.0)}, x, threads=1, singles=6,
                     batch=4, rounds=3, warmup=1)
    assert speeds["slow"].ms_batch1 > 3.5 and speeds["fast"].ms_batch1 < 1.0
    assert speeds["slow"].images_per_s < 300 < speeds["fast"].images_per_s
    timed = calls[4:]  # after each runner's warm-up: one single and one batch call
    assert timed[:4] == ["slow"] * 4 and timed[4:8] == ["fast"] * 4 and timed[8:12] == ["slow"] * 4

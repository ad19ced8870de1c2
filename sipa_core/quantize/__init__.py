"""Quantization (beyond the paper): Brevitas layers at per-layer widths (``qat``), each input's
quantizer (``quantizers``), quantization-aware training (``training``), one set of widths end to
end (``width_run``), widths per layer under a budget (``allocate``), the integer ONNX graph
(``export``, ``onnx_integer``), the quantization record of a checkpoint (``record``), the stage."""

from sipa_core.quantize.qat import (calibrate, check_widths, float_twin, fold_batchnorm, is_quantized,
                                    quantize_modules)
from sipa_core.quantize.record import QuantizedNetwork, QuantRecord, load_quantized

__all__ = ["QuantRecord", "QuantizedNetwork", "calibrate", "check_widths", "float_twin", "fold_batchnorm",
           "is_quantized", "load_quantized", "quantize_modules"]

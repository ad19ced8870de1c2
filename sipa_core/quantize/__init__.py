"""Quantization (beyond the paper): quantization-aware training with Brevitas, counted by the MicroNet rules."""

from sipa_core.quantize.qat import (calibrate, check_widths, float_twin, fold_batchnorm, is_quantized,
                                    quantize_modules)

__all__ = ["calibrate", "check_widths", "float_twin", "fold_batchnorm", "is_quantized", "quantize_modules"]

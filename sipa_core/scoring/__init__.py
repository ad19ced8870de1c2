"""The MicroNet scorer: ``count(model, input_shape, bits=16 | BitWidths(...), ...)``."""

from sipa_core.scoring.bits import BitWidths

from sipa_core.scoring.counter import (REFERENCE_BYTES, REFERENCE_OPS, REFERENCE_PARAMS, BlockCost, CountResult,
                                       OpCost, TensorCost, UncountedOperator, count, expected_ops)

__all__ = ["BitWidths", "REFERENCE_BYTES", "REFERENCE_OPS", "REFERENCE_PARAMS", "BlockCost", "CountResult", "OpCost",
           "TensorCost", "UncountedOperator", "count", "expected_ops"]

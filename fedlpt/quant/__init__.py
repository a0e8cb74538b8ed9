"""Block floating point and low-precision training: torch and NumPy only, no Flower.

The numerics stand alone, so that a device can train in low precision without the
federated stack. The Flower wire format lives in :mod:`fedlpt.quant.wire`, imported on
its own.
"""

from .bfp import (
    BFP,
    block_layout,
    check_bits,
    check_block,
    decode_codes,
    encode_codes,
    num_blocks,
    parse_block,
    quantize,
    quantize_,
    quantize_tensors,
    quantize_tensors_,
)
from .packing import pack_bits, packed_size, unpack_bits
from .training import (
    LowPrecision,
    LowPrecisionOptimizer,
    prepare,
    quantize_activation,
    unprepare,
)

__all__ = [
    "BFP",
    "LowPrecision",
    "LowPrecisionOptimizer",
    "block_layout",
    "check_bits",
    "check_block",
    "decode_codes",
    "encode_codes",
    "num_blocks",
    "pack_bits",
    "packed_size",
    "parse_block",
    "prepare",
    "quantize",
    "quantize_",
    "quantize_activation",
    "quantize_tensors",
    "quantize_tensors_",
    "unpack_bits",
    "unprepare",
]

"""Block-floating-point quantization, bit packing and the fedlpt wire format."""

from .bfp import BFP, block_layout, decode_codes, encode_codes, num_blocks, quantize, quantize_
from .packing import pack_bits, packed_size, unpack_bits
from .training import (
    LowPrecision,
    LowPrecisionOptimizer,
    prepare,
    quantize_activation,
    unprepare,
)
from .wire import (
    PayloadError,
    decode_arrays,
    encode_arrays,
    is_encoded,
    serialized_size,
    to_state_dict,
)

__all__ = [
    "BFP",
    "LowPrecision",
    "LowPrecisionOptimizer",
    "PayloadError",
    "block_layout",
    "decode_arrays",
    "decode_codes",
    "encode_arrays",
    "encode_codes",
    "is_encoded",
    "num_blocks",
    "pack_bits",
    "packed_size",
    "prepare",
    "quantize",
    "quantize_",
    "quantize_activation",
    "serialized_size",
    "to_state_dict",
    "unpack_bits",
    "unprepare",
]

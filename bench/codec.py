"""Codec benchmark: bytes on the wire for the paper's ConvNet, and encode/decode speed.

Ratios divide the bytes Flower transfers for ``RecordDict({"arrays": record})`` holding the
ConvNet's FP32 state dict by the same for the bit-packed record. Speeds time one FP32
[1000, 10000] tensor (8-bit BFP, one exponent per row) against ``torch.clone`` of the same
tensor in the same run, median of repeats. A plain chain of torch ops implementing the
same quantizer (the research code's way) is timed beside it for scale.

    python -m bench.codec [--quick]
"""

from __future__ import annotations

import argparse

import torch
from flwr.app import ArrayRecord

from bench._common import median_seconds, print_json, print_table
from fedlpt.models import ConvNet
from fedlpt.quant import BFP
from fedlpt.quant.wire import decode_arrays, encode_arrays
from fedlpt.strategy.traffic import serialized_size


def torch_op_chain(x: torch.Tensor, bits: int, stochastic: bool) -> torch.Tensor:
    """The quantizer as a plain chain of torch ops (per-row exponent), for scale."""
    largest = x.abs().amax(dim=1, keepdim=True)
    exp = torch.floor(torch.log2(largest.clamp_min(1e-30)))
    scaled = x * torch.exp2(bits - 2 - exp)
    rounded = torch.floor(scaled + torch.rand_like(scaled)) if stochastic else torch.round(scaled)
    limit = 2 ** (bits - 1) - 1
    return rounded.clamp(-limit, limit).to(torch.int8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (under a minute)")
    args = parser.parse_args()
    repeats = 7 if args.quick else 25
    torch.manual_seed(0)

    model = ConvNet(in_channels=1, num_classes=10, image_size=28)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    params = sum(v.numel() for v in state.values())
    fp32_bytes = serialized_size(ArrayRecord(state))
    rows, figures = [], {}
    for bits, block in [(8, "row"), (8, "kernel"), (6, "row"), (4, "row"), (2, "row")]:
        record = encode_arrays(state, BFP(bits, block), torch.Generator().manual_seed(0))
        size = serialized_size(record)
        ratio = fp32_bytes / size
        rows.append([f"ConvNet {bits}-bit, block={block}", size, ratio, 32 / bits])
        key = f"ratio_convnet_b{bits}" + ("" if block == "row" else f"_{block}")
        figures[key] = round(ratio, 3)
    print(f"ConvNet (28x28x1, 10 classes): {params:,} parameters, FP32 record {fp32_bytes:,} B")
    print_table(["payload", "bytes", "FP32/payload", "limit 32/b"], rows)
    print()

    x = torch.randn(1000, 10000)
    clone = median_seconds(lambda: x.clone(), repeats)
    gen = torch.Generator().manual_seed(1)
    stochastic, nearest = BFP(8, "row", "stochastic"), BFP(8, "row", "nearest")
    record = encode_arrays({"w": x}, nearest)
    timings = {
        "encode_stochastic_vs_clone": median_seconds(
            lambda: encode_arrays({"w": x}, stochastic, gen), repeats
        ),
        "encode_nearest_vs_clone": median_seconds(
            lambda: encode_arrays({"w": x}, nearest), repeats
        ),
        "decode_vs_clone": median_seconds(lambda: decode_arrays(record), repeats),
        "torch_op_chain_stochastic_vs_clone": median_seconds(
            lambda: torch_op_chain(x, 8, True), repeats
        ),
        "torch_op_chain_nearest_vs_clone": median_seconds(
            lambda: torch_op_chain(x, 8, False), repeats
        ),
    }
    print(f"8-bit codec on one [1000, 10000] FP32 tensor, block=row; clone = {clone * 1e3:.2f} ms")
    print_table(
        ["operation", "ms", "x clone"],
        [[k.replace("_vs_clone", ""), t * 1e3, t / clone] for k, t in timings.items()],
    )
    figures.update({k: round(t / clone, 3) for k, t in timings.items()})
    figures["clone_ms"] = round(clone * 1e3, 3)
    figures["convnet_params"] = params
    print_json(figures)


if __name__ == "__main__":
    main()

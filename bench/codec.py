"""Codec benchmark: bytes on the wire for the paper's ConvNet, and encode/decode speed.

Ratios divide the bytes Flower transfers for ``RecordDict({"arrays": record})`` holding the
ConvNet's FP32 state dict by the same for the bit-packed record, first for the freshly
initialized ConvNet, then, with and without zstd coding of the codes, for the ConvNet
after one epoch of 8-bit training on Fashion-MNIST (``--quick``: an epoch of 6,000
images), where the codes are far from uniform; then the change one more epoch of 6,000
images makes to that model, as a 2-bit row-block delta upload (what ``bench.comm``'s
clients send): the share of entries it sends as 0, stochastic and nearest rounding, and
its size with and without zstd. Speeds time one FP32
[1000, 10000] tensor (8-bit BFP, one exponent per row) against ``torch.clone`` of the same
tensor in the same run, median of repeats. A plain chain of torch ops implementing the
same quantizer (the research code's way) is timed beside it for scale.

    python -m bench.codec [--quick]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from flwr.app import ArrayRecord

from bench._common import median_seconds, print_json, print_table
from fedlpt.data import DatasetUnavailableError, load_partition
from fedlpt.models import ConvNet
from fedlpt.quant import BFP
from fedlpt.quant.entropy import compress
from fedlpt.quant.wire import decode_arrays, encode_arrays
from fedlpt.strategy.traffic import serialized_size
from fedlpt.task import make_recipe, train


def torch_op_chain(x: torch.Tensor, bits: int, stochastic: bool) -> torch.Tensor:
    """The quantizer as a plain chain of torch ops (per-row exponent), for scale."""
    largest = x.abs().amax(dim=1, keepdim=True)
    exp = torch.floor(torch.log2(largest.clamp_min(1e-30)))
    scaled = x * torch.exp2(bits - 2 - exp)
    rounded = torch.floor(scaled + torch.rand_like(scaled)) if stochastic else torch.round(scaled)
    limit = 2 ** (bits - 1) - 1
    return rounded.clamp(-limit, limit).to(torch.int8)


DELTA_EXAMPLES = 6000  # bench.comm's clients hold 6,000 images each on average


def trained_convnet(
    examples: int | None,
    start: dict[str, torch.Tensor] | None = None,
    seed: int = 0,
    shuffle_seed: int | None = None,
) -> dict[str, torch.Tensor]:
    """The ConvNet's state after one epoch of 8-bit training on Fashion-MNIST (train
    split, ``examples`` of it when given, in order or shuffled by ``shuffle_seed``;
    rounding seeded by ``seed``), from ``start`` if given."""
    loader, _ = load_partition(
        "fmnist", 0, 1, alpha=1.0, seed=0, batch_size=32, partitioner="iid",
        max_examples=examples, shuffle_seed=shuffle_seed,
    )  # fmt: skip
    model = ConvNet(in_channels=1, num_classes=10, image_size=28)
    if start is not None:
        model.load_state_dict(start)
    recipe = make_recipe(
        {"weight": 8, "activation": 8, "error": 8, "gradient": 8},
        block="row",
        rounding="stochastic",
    )
    train(model, loader, recipe=recipe, epochs=1, seed=seed)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def delta_coding(trained: dict[str, torch.Tensor]) -> tuple[list, dict]:
    """What a client's round sends as a 2-bit row delta: the change one more epoch of
    DELTA_EXAMPLES images (a client's share in bench.comm) makes to ``trained``, rounded
    stochastically and to nearest: the share of entries sent as 0, and the record's size
    with and without zstd."""
    after = trained_convnet(DELTA_EXAMPLES, start=trained, seed=1, shuffle_seed=1)
    delta = {k: after[k] - v if v.is_floating_point() else v for k, v in trained.items()}
    fp32_bytes = serialized_size(ArrayRecord(delta))
    rows, figures = [], {}
    for rounding in ("stochastic", "nearest"):
        fmt = BFP(2, "row", rounding)
        plain = encode_arrays(delta, fmt, torch.Generator().manual_seed(0))
        sent = [v for v in decode_arrays(plain).values() if v.is_floating_point()]
        zeros = sum(int((v == 0).sum()) for v in sent) / sum(v.numel() for v in sent)
        rows.append([f"2-bit row delta, {rounding}: share sent as 0", "", zeros])
        figures[f"delta2_zero_share_{rounding}"] = round(zeros, 4)
        for compression in ("none", "zstd"):
            record = encode_arrays(
                delta, fmt, torch.Generator().manual_seed(0), compression=compression
            )
            ratio = fp32_bytes / serialized_size(record)
            size = serialized_size(record)
            rows.append([f"2-bit row delta, {rounding}, {compression}", size, ratio])
            figures[f"ratio_delta2_{rounding}_{compression}"] = round(ratio, 3)
    return rows, figures


def entropy_coding(state: dict[str, torch.Tensor], repeats: int) -> tuple[list, dict]:
    """Upload sizes of a trained ``state`` with and without zstd, and the codec's time."""
    fp32_bytes = serialized_size(ArrayRecord(state))
    rows, figures = [], {}
    for bits in (8, 4):
        for compression in ("none", "zstd"):
            record = encode_arrays(
                state, BFP(bits, "row"), torch.Generator().manual_seed(0), compression=compression
            )
            ratio = fp32_bytes / serialized_size(record)
            suffix = "" if compression == "none" else "_zstd"
            rows.append([f"trained {bits}-bit, {compression}", serialized_size(record), ratio])
            figures[f"ratio_trained_b{bits}{suffix}"] = round(ratio, 3)
    raw = np.concatenate([v.numpy().reshape(-1).view(np.uint8) for v in state.values()])
    fp32_zstd = fp32_bytes / (fp32_bytes - raw.size + compress(raw, "zstd").size)
    # The 8-bit-trained weights sent as FP32 and zstd-coded: their low mantissa bits are
    # zero, so this is far more compressible than weights trained in FP32.
    rows.append(["same weights as FP32 + zstd", int(fp32_bytes / fp32_zstd), fp32_zstd])
    figures["ratio_trained_fp32_zstd"] = round(fp32_zstd, 3)
    figures["upload_ratio_b8_zstd"] = figures["ratio_trained_b8_zstd"]

    fmt = BFP(8, "row")
    times = {}
    for compression in ("none", "zstd"):
        times[compression] = median_seconds(
            lambda c=compression: decode_arrays(
                encode_arrays(state, fmt, torch.Generator().manual_seed(0), compression=c)
            ),
            repeats,
        )
    rows.append(["encode + decode, none (ms)", "", times["none"] * 1e3])
    rows.append(["encode + decode, zstd (ms)", "", times["zstd"] * 1e3])
    figures["zstd_codec_time_ratio"] = round(times["zstd"] / times["none"], 3)
    return rows, figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (under a minute)")
    args = parser.parse_args()
    repeats = 7 if args.quick else 25
    torch.set_num_threads(1)
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

    start = time.perf_counter()
    try:
        trained = trained_convnet(6000 if args.quick else None)
    except DatasetUnavailableError as err:
        print(f"trained ConvNet rows skipped: {err}\n")
    else:
        examples = "6,000 images" if args.quick else "all 60,000 images"
        seconds = time.perf_counter() - start
        print(f"ConvNet after one epoch of 8-bit training on Fashion-MNIST ({examples}, "
              f"{seconds:.0f} s); zstd on the packed codes")  # fmt: skip
        trained_rows, trained_figures = entropy_coding(trained, repeats)
        print_table(["payload", "bytes", "FP32/payload"], trained_rows)
        figures.update(trained_figures)
        print()
        print(
            f"The change one more epoch of {DELTA_EXAMPLES:,} images makes to it, as a 2-bit "
            "row-block delta upload"
        )
        delta_rows, delta_figures = delta_coding(trained)
        print_table(["payload", "bytes", "FP32/payload or share"], delta_rows)
        figures.update(delta_figures)
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

"""Training benchmark: the cost of low-precision training against FP32, and its accuracy.

1. **Quantizer cost**, per device present (the CPU always, CUDA when available): one
   stochastic 8-bit quantize of a 128-element tensor (the per-call cost that dominates a
   model's small tensors), and every parameter of the paper's ConvNet quantized once
   (``quantize_tensors``, and ``quantize_tensors_`` in place as the optimizer wrapper
   rounds them), each against the same math written as a plain chain of torch
   ops, timed interleaved in the same run (the per-call pair apart from the whole-model
   pair, so that a 128-value call is not always timed right after a model's worth of
   memory traffic); and the first call's compile time.
2. **Training step**: one full step (zero_grad, forward, backward, optimizer step) of
   the 28x28 ConvNet (batch 32, Adam) and of the 8x8 digits ConvNet, 8-bit recipe against
   FP32, each built by ``fedlpt.task.LocalTrainer``, interleaved (the order shuffled every
   round, after a warm-up), at 1 and 2 torch threads on the CPU and on CUDA when present.
3. **Where the step's time goes**, at 1 thread: the 8-bit recipe against FP32 and against
   itself with one part changed, interleaved: activations and errors rounded to nearest
   (what a free dither would leave), the optimizer wrapper alone (weights and gradients),
   the activation/error quantizers alone.
4. **Accuracy** on digits (8x8 ConvNet) after training on the whole train pool for a
   fixed number of epochs: FP32 and 8-, 6- and 4-bit recipes (row blocks) and 8-bit
   with kernel blocks (the paper's "BC"); mean over seeds 0, 1, 2.

Upload sizes are measured by ``bench.codec``.

    python -m bench.training [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import statistics
import time
from collections.abc import Callable

import torch

from bench._common import print_json, print_table
from fedlpt import allocator
from fedlpt.data import load_centralized_test, load_partition
from fedlpt.models import ConvNet
from fedlpt.quant import BFP, kernels, quantize, quantize_tensors, quantize_tensors_
from fedlpt.quant.training import LowPrecision
from fedlpt.task import LocalTrainer, evaluate, train

BATCH = 32
LR = 1e-3
SEEDS = (0, 1, 2)
# (JSON key suffix, label, bits, block) of the accuracy comparison.
ACC_RECIPES = (
    ("fp32", "FP32", None, "row"),
    ("lpt8", "LPT8 block=row", 8, "row"),
    ("lpt6", "LPT6 block=row", 6, "row"),
    ("lpt4", "LPT4 block=row", 4, "row"),
    ("lpt8_kernel", "LPT8 block=kernel", 8, "kernel"),
)


def torch_chain(x: torch.Tensor, bits: int, block_rows: bool) -> torch.Tensor:
    """The quantizer as a plain chain of torch ops (SWALP's way), for scale."""
    view = x.reshape(x.shape[0], -1) if block_rows and x.dim() > 1 else x.reshape(1, -1)
    largest = view.abs().amax(dim=1, keepdim=True)
    scale = torch.exp2(bits - 2 - torch.floor(torch.log2(largest.clamp_min(1e-30))))
    rounded = torch.floor(view * scale + torch.rand_like(view))
    limit = 2 ** (bits - 1) - 1
    return (rounded.clamp(-limit, limit) / scale).view(x.shape)


def interleaved(functions: dict[str, Callable[[], object]], repeats: int, sync: Callable[[], None]):
    """Median wall seconds of each function, timed in turns after a warm-up, with every
    turn's wall and CPU (``time.process_time``) seconds.

    The order is shuffled every round (seeded): a function's time depends on what ran
    just before it (caches, allocator), and a rotated fixed order would always give each
    function the same predecessor.
    """
    names = list(functions)
    order = random.Random(0)
    for _ in range(3):
        for name in names:
            functions[name]()
    sync()
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(repeats):
        turn = names[:]
        order.shuffle(turn)
        for name in turn:
            start, start_cpu = time.perf_counter(), time.process_time()
            functions[name]()
            sync()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return {name: statistics.median(v) for name, v in times.items()}, times, cpu


def _sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else lambda: None


def quantizer_costs(device: torch.device, repeats: int) -> dict[str, float]:
    """Per-call and whole-model quantization against the plain torch chain, on ``device``."""
    sync = _sync(device)
    generator = torch.Generator(device).manual_seed(0)
    fmt = BFP(8, "row", "stochastic")
    small = torch.randn(128, device=device)
    torch.manual_seed(0)
    params = [p.detach().to(device) for p in ConvNet(1, 10, 28).parameters()]
    in_place = [p.clone() for p in params]  # what the optimizer wrapper rounds, in place
    start = time.perf_counter()
    quantize(small, fmt, generator)
    quantize_tensors(params, fmt, generator)
    quantize_tensors_(in_place, fmt, generator, check=False)
    sync()
    compile_s = time.perf_counter() - start
    small_medians, _, _ = interleaved(
        {
            "small": lambda: quantize(small, fmt, generator, check=False),
            "small_chain": lambda: torch_chain(small, 8, True),
        },
        repeats,
        sync,
    )
    model_medians, _, _ = interleaved(
        {
            "model": lambda: quantize_tensors(params, fmt, generator, check=False),
            "model_in_place": lambda: quantize_tensors_(in_place, fmt, generator, check=False),
            "model_chain": lambda: [torch_chain(p, 8, True) for p in params],
        },
        repeats,
        sync,
    )
    medians = small_medians | model_medians
    return {
        "quantize_small_us": medians["small"] * 1e6,
        "quantize_small_chain_us": medians["small_chain"] * 1e6,
        "quantize_small_vs_torch_chain": medians["small"] / medians["small_chain"],
        "model_quantize_ms": medians["model"] * 1e3,
        "model_quantize_chain_ms": medians["model_chain"] * 1e3,
        "model_quantize_vs_torch_chain": medians["model"] / medians["model_chain"],
        "model_quantize_in_place_ms": medians["model_in_place"] * 1e3,
        "model_quantize_in_place_vs_torch_chain": medians["model_in_place"]
        / medians["model_chain"],
        "first_call_s": compile_s,
    }


@dataclasses.dataclass(frozen=True)
class StepTiming:
    """One training step, LPT8 against FP32: medians of the interleaved turns."""

    fp32_ms: float
    lpt8_ms: float
    ratio: float  # of the wall medians
    paired: float  # median of the turn-by-turn wall ratios
    cpu_ratio: float  # of the CPU-time medians
    faults_fp32: float  # minor page faults per step (kernel-zeroed pages)
    faults_lpt8: float


def _faults_per_step(step: Callable[[], object], steps: int = 5) -> float:
    """Minor page faults per call of ``step`` (NaN where the OS does not count them)."""
    try:
        import resource
    except ImportError:  # Windows
        return math.nan
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / steps


def _training_steps(
    device: torch.device, image_size: int, recipes: dict[str, LowPrecision]
) -> dict[str, Callable[[], object]]:
    """One ``LocalTrainer.step`` per recipe, on the same batch and the same initial model."""
    generator = torch.Generator().manual_seed(123)
    images = torch.randn(BATCH, 1, image_size, image_size, generator=generator).to(device)
    labels = torch.randint(0, 10, (BATCH,), generator=generator).to(device)
    steps = {}
    for name, recipe in recipes.items():
        torch.manual_seed(0)
        model = ConvNet(1, 10, image_size).to(device)
        trainer = LocalTrainer(
            model, recipe, lr=LR, generator=torch.Generator(device).manual_seed(0)
        )
        steps[name] = lambda t=trainer: t.step(images, labels)
    return steps


def step_ratio(device: torch.device, image_size: int, repeats: int) -> StepTiming:
    """One training step of the LPT8 recipe against FP32 on ``device``."""
    sync = _sync(device)
    recipes = {"fp32": LowPrecision(), "lpt8": LowPrecision.uniform(8)}
    steps = _training_steps(device, image_size, recipes)
    medians, times, cpu = interleaved(steps, repeats, sync)
    paired = statistics.median(q / f for q, f in zip(times["lpt8"], times["fp32"], strict=True))
    return StepTiming(
        fp32_ms=medians["fp32"] * 1e3,
        lpt8_ms=medians["lpt8"] * 1e3,
        ratio=medians["lpt8"] / medians["fp32"],
        paired=paired,
        cpu_ratio=statistics.median(cpu["lpt8"]) / statistics.median(cpu["fp32"]),
        faults_fp32=_faults_per_step(steps["fp32"]),
        faults_lpt8=_faults_per_step(steps["lpt8"]),
    )


# What an LPT8 step costs made of: the full recipe with one part changed or left out.
_LPT8 = LowPrecision.uniform(8)
BREAKDOWN = {
    "fp32": LowPrecision(),
    "lpt8": _LPT8,
    # Activations and errors rounded to nearest: what the step would cost with a dither
    # that cost nothing (a lower bound for any cheaper random stream).
    "lpt8_nearest_activations": dataclasses.replace(
        _LPT8,
        activation=dataclasses.replace(_LPT8.activation, rounding="nearest"),
        error=dataclasses.replace(_LPT8.error, rounding="nearest"),
    ),
    "weights_and_gradients_only": dataclasses.replace(_LPT8, activation=None, error=None),
    "activations_and_errors_only": dataclasses.replace(_LPT8, weight=None, gradient=None),
}


def step_breakdown(device: torch.device, image_size: int, repeats: int) -> dict[str, float]:
    """Median step time of every :data:`BREAKDOWN` recipe over FP32's, interleaved."""
    medians, _, _ = interleaved(
        _training_steps(device, image_size, BREAKDOWN), repeats, _sync(device)
    )
    return {name: medians[name] / medians["fp32"] for name in BREAKDOWN}


def accuracy_runs(epochs: int) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Test accuracy (percent) per seed and total training seconds of every ACC_RECIPES entry."""
    test_loader = load_centralized_test("digits", batch_size=256)
    accs: dict[str, list[float]] = {key: [] for key, *_ in ACC_RECIPES}
    seconds: dict[str, float] = dict.fromkeys(accs, 0.0)
    for seed in SEEDS:
        for key, _, bits, block in ACC_RECIPES:
            # One partition of the whole train pool, none of it held out.
            train_loader, _ = load_partition(
                "digits", 0, 1, alpha=1.0, partitioner="iid", seed=seed, batch_size=BATCH
            )
            torch.manual_seed(seed)
            model = ConvNet(1, 10, 8)
            recipe = LowPrecision.uniform(bits, block=block)  # type: ignore[arg-type]
            start = time.perf_counter()
            train(model, train_loader, recipe=recipe, epochs=epochs, lr=LR, seed=seed)
            seconds[key] += time.perf_counter() - start
            _, accuracy, _ = evaluate(model, test_loader)
            accs[key].append(100.0 * accuracy)
    return accs, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and epochs")
    args = parser.parse_args()
    repeats, epochs = (30, 3) if args.quick else (100, 10)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    figures: dict[str, object] = {"epochs": epochs, "compiled": True}

    torch.set_num_threads(1)
    rows = []
    for device in devices:
        costs = quantizer_costs(device, repeats * 5)
        suffix = "" if device.type == "cpu" else "_cuda"
        figures.update({f"{k}{suffix}": round(v, 3) for k, v in costs.items()})
        rows += [
            [
                device.type,
                "quantize 128 values, 8-bit stochastic",
                costs["quantize_small_us"],
                costs["quantize_small_chain_us"],
                costs["quantize_small_vs_torch_chain"],
            ],
            [
                device.type,
                "quantize every ConvNet parameter",
                costs["model_quantize_ms"] * 1e3,
                costs["model_quantize_chain_ms"] * 1e3,
                costs["model_quantize_vs_torch_chain"],
            ],
            [
                device.type,
                "round every ConvNet parameter in place",
                costs["model_quantize_in_place_ms"] * 1e3,
                costs["model_quantize_chain_ms"] * 1e3,
                costs["model_quantize_in_place_vs_torch_chain"],
            ],
        ]
    print("Quantizer cost (medians, interleaved, 1 CPU thread), microseconds")
    print_table(["device", "operation", "fedlpt us", "torch chain us", "ratio"], rows)
    print(f"first call (compiles the kernels): {figures['first_call_s']:.1f} s on the CPU")
    print()

    rows = []
    settings = [(torch.device("cpu"), 1), (torch.device("cpu"), 2)]
    settings += [(torch.device("cuda"), 1)] if torch.cuda.is_available() else []
    for device, threads in settings:
        torch.set_num_threads(threads)
        for image_size, key in ((28, ""), (8, "_digits")):
            step = step_ratio(device, image_size, repeats)
            rows.append(
                [
                    device.type,
                    threads,
                    f"{image_size}x{image_size}",
                    step.fp32_ms,
                    step.lpt8_ms,
                    step.ratio,
                    step.paired,
                    step.cpu_ratio,
                    step.faults_fp32,
                    step.faults_lpt8,
                ]
            )
            tag = (
                key
                + ("" if device.type == "cpu" else "_cuda")
                + ("" if threads == 1 else f"_{threads}threads")
            )
            figures[f"step_lpt8_vs_fp32{tag}"] = round(step.ratio, 3)
            figures[f"step_lpt8_vs_fp32_cpu_time{tag}"] = round(step.cpu_ratio, 3)
            figures[f"step_fp32_ms{tag}"] = round(step.fp32_ms, 3)
            figures[f"step_page_faults_lpt8{tag}"] = step.faults_lpt8
    torch.set_num_threads(1)
    print(f"Training step, ConvNet, batch {BATCH}, Adam: median of {repeats} interleaved steps")
    print_table(
        [
            "device",
            "threads",
            "images",
            "FP32 ms",
            "LPT8 ms",
            "x FP32",
            "x FP32 (paired)",
            "x FP32 (CPU time)",
            "FP32 faults",
            "LPT8 faults",
        ],
        rows,
    )
    print(
        "faults: minor page faults per step (pages the kernel zeroes); freed memory held: "
        f"{allocator.is_held()} (fedlpt.allocator)"
    )
    print()

    rows = []
    for device in devices:
        for image_size, key in ((28, ""), (8, "_digits")):
            parts = step_breakdown(device, image_size, repeats)
            rows.append([device.type, f"{image_size}x{image_size}", *parts.values()])
            tag = key + ("" if device.type == "cpu" else "_cuda")
            for name, ratio in parts.items():
                if name != "fp32":
                    figures[f"breakdown_{name}_vs_fp32{tag}"] = round(ratio, 3)
    print(
        "Where the LPT8 step's time goes: each recipe's step over FP32's, 1 thread, "
        f"median of {repeats} interleaved steps"
    )
    print_table(
        [
            "device",
            "images",
            "FP32",
            "LPT8",
            "LPT8, act/err nearest",
            "weights+grads only",
            "act+err only",
        ],
        rows,
    )
    print(
        "act/err nearest: activations and errors rounded to nearest, the step with a free "
        "dither; weights+grads only: the optimizer wrapper alone; act+err only: the "
        "activation/error quantizers alone"
    )
    print()

    accs, seconds = accuracy_runs(epochs)
    print(
        f"Centralized test accuracy (%) on digits, ConvNet 8x8, Adam lr {LR:g}, batch {BATCH}, "
        f"{epochs} epochs over the whole train pool"
    )
    rows = []
    for key, label, _, _ in ACC_RECIPES:
        mean = statistics.mean(accs[key])
        rows.append([label, *accs[key], mean, seconds[key]])
        figures[f"acc_{key}"] = round(mean, 2)
    print_table(["recipe", *(f"seed {s}" for s in SEEDS), "mean", "train s (all seeds)"], rows)
    figures["compiled"] = kernels.compiled()
    figures["freed_memory_held"] = allocator.is_held()
    figures["device"] = ",".join(d.type for d in devices)
    print_json(figures)


if __name__ == "__main__":
    main()

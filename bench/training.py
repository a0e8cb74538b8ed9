"""Training benchmark: step time and accuracy of low-precision local training vs FP32.

Step time: one full training step (zero_grad, forward, backward, optimizer step) of the
paper's ConvNet (28x28x1 inputs, batch 32 of random images, Adam lr 1e-3, cross-entropy),
each recipe's step built by ``fedlpt.task.LocalTrainer``, as ``fedlpt.task.train`` builds it.
The recipes' steps are timed interleaved (one step of each in turn, the order rotated every
round, after a warm-up), so that drifting machine load hits all of them alike; medians are
reported, with the 8-bit step split into its phases against FP32.

Accuracy: centralized test accuracy on ``digits`` (8x8 ConvNet) after training on the whole
train pool for a fixed number of epochs, FP32 and 8-, 6- and 4-bit recipes (one exponent
per row), and the 8-bit recipe with one exponent per kernel (the paper's "BC"); mean over
seeds 0, 1, 2. Upload: bytes Flower transfers for the 28x28 ConvNet's state dict encoded
with each block kind, against its FP32 ``ArrayRecord``.

Runs single-threaded by default (``--threads``): torch's intra-op pool of 2 threads
slows down many times over when another process holds one of the 2 cores, which would
swamp the comparison.

    python -m bench.training [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from flwr.app import ArrayRecord

from bench._common import median_seconds, print_json, print_table
from fedlpt.data import load_centralized_test, load_partition
from fedlpt.models import ConvNet
from fedlpt.quant import BFP, quantize, quantize_
from fedlpt.quant.training import QUANTIZED_MODULES, LowPrecision
from fedlpt.quant.wire import encode_arrays
from fedlpt.strategy.traffic import serialized_size
from fedlpt.task import LocalTrainer, evaluate, train

BATCH = 32
LR = 1e-3
SEEDS = (0, 1, 2)
PHASES = ("forward", "backward", "optimizer step")
# (label, bits, block) of the step-time comparison; FP32 first.
STEP_RECIPES = (("FP32", None, "row"), ("LPT8", 8, "row"), ("LPT6", 6, "row"), ("LPT4", 4, "row"))
# (JSON key suffix, label, bits, block) of the accuracy comparison.
ACC_RECIPES = (
    ("fp32", "FP32", None, "row"),
    ("lpt8", "LPT8 block=row", 8, "row"),
    ("lpt6", "LPT6 block=row", 6, "row"),
    ("lpt4", "LPT4 block=row", 4, "row"),
    ("lpt8_kernel", "LPT8 block=kernel", 8, "kernel"),
)


class Stepper:
    """One recipe's ConvNet and :class:`fedlpt.task.LocalTrainer`, timed phase by phase."""

    def __init__(self, bits: int | None, block: str) -> None:
        torch.manual_seed(0)
        self.model = ConvNet(in_channels=1, num_classes=10, image_size=28)
        self.recipe = LowPrecision.uniform(bits, block=block)  # type: ignore[arg-type]
        generator = torch.Generator().manual_seed(0)
        self.trainer = LocalTrainer(self.model, self.recipe, lr=LR, generator=generator)

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float, float]:
        """One training step; seconds of (zero_grad + forward + loss, backward, optimizer step)."""
        t0 = time.perf_counter()
        self.trainer.optimizer.zero_grad()
        loss = self.trainer.loss(images, labels)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        self.trainer.optimizer.step()
        t3 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2


def time_steps(
    images: torch.Tensor, labels: torch.Tensor, repeats: int, warmup: int
) -> tuple[dict[str, list[tuple[float, ...]]], Stepper]:
    """Per-step phase times of every STEP_RECIPES entry, interleaved; and the LPT8 stepper."""
    steppers = {label: Stepper(bits, block) for label, bits, block in STEP_RECIPES}
    names = list(steppers)
    for _ in range(warmup):
        for name in names:
            steppers[name].step(images, labels)
    times: dict[str, list[tuple[float, ...]]] = {name: [] for name in names}
    for i in range(repeats):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(steppers[name].step(images, labels))
    return times, steppers["LPT8"]


def rounding_cost(stepper: Stepper, repeats: int) -> tuple[float, int]:
    """Median seconds to round every parameter once to the 8-bit weight format, and count.

    The 8-bit optimizer step does this twice (gradients before Adam, weights after it).
    """
    fmt = stepper.recipe.weight
    assert fmt is not None
    tensors = [p.detach().clone() for p in stepper.model.parameters()]
    gen = torch.Generator().manual_seed(0)

    def round_all() -> None:
        for tensor in tensors:
            quantize_(tensor, fmt, gen)

    return median_seconds(round_all, repeats), len(tensors)


def activation_rounding_cost(
    stepper: Stepper, images: torch.Tensor, repeats: int
) -> tuple[float, float, int, int]:
    """Median seconds to round the activations of one forward pass (stochastic, nearest).

    Rounds fresh tensors shaped like the outputs the recipe's quantizers see in the
    forward pass (the backward pass rounds errors of the same shapes). Also returns the
    number of those tensors and their total number of elements.
    """
    fmt = stepper.recipe.activation
    assert fmt is not None
    shapes: list[torch.Size] = []
    handles = [
        module.register_forward_hook(lambda _m, _i, out: shapes.append(out.shape))
        for module in stepper.model.modules()
        if isinstance(module, QUANTIZED_MODULES)
    ]
    with torch.no_grad():
        stepper.model(images)
    for handle in handles:
        handle.remove()
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(shape, generator=gen) for shape in shapes]
    nearest = BFP(fmt.bits, fmt.block, "nearest")

    def round_all(f: BFP) -> None:
        for tensor in tensors:
            quantize(tensor, f, gen, dither_bits=stepper.recipe.dither_bits)

    return (
        median_seconds(lambda: round_all(fmt), repeats),
        median_seconds(lambda: round_all(nearest), repeats),
        len(tensors),
        sum(t.numel() for t in tensors),
    )


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


def upload_sizes() -> tuple[int, list[tuple[int, str, int]]]:
    """FP32 record bytes of the 28x28 ConvNet, and (bits, block, bytes) of encoded records."""
    torch.manual_seed(0)
    model = ConvNet(in_channels=1, num_classes=10, image_size=28)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    fp32_bytes = serialized_size(ArrayRecord(state))
    sizes = []
    for bits, block in ((8, "row"), (8, "kernel"), (6, "row"), (4, "row")):
        record = encode_arrays(state, BFP(bits, block), torch.Generator().manual_seed(0))
        sizes.append((bits, block, serialized_size(record)))
    return fp32_bytes, sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and epochs (< 1 min)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads; 0 keeps torch's default"
    )
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    repeats, warmup, epochs = (20, 3, 3) if args.quick else (100, 5, 10)
    figures: dict[str, object] = {"threads": torch.get_num_threads(), "epochs": epochs}

    # 1. Step time, interleaved.
    gen = torch.Generator().manual_seed(123)
    images = torch.randn(BATCH, 1, 28, 28, generator=gen)
    labels = torch.randint(0, 10, (BATCH,), generator=gen)
    times, lpt8 = time_steps(images, labels, repeats, warmup)
    totals = {name: [sum(t) for t in steps] for name, steps in times.items()}
    median_total = {name: statistics.median(v) for name, v in totals.items()}
    fp32 = median_total["FP32"]
    print(
        f"Training step, ConvNet 28x28x1, batch {BATCH}, Adam: median of {repeats} interleaved "
        f"steps per recipe, {torch.get_num_threads()} thread(s)"
    )
    rows = []
    for name, total in median_total.items():
        paired = statistics.median(t / f for t, f in zip(totals[name], totals["FP32"], strict=True))
        rows.append([name, total * 1e3, total / fp32, paired])
        key = name.lower()
        figures[f"step_{key}_ms"] = round(total * 1e3, 3)
        if name != "FP32":
            figures[f"step_{key}_vs_fp32"] = round(total / fp32, 3)
            figures[f"step_{key}_vs_fp32_paired"] = round(paired, 3)
    print_table(["recipe", "ms / step", "x FP32", "x FP32 (paired)"], rows)
    print()

    phase_fp32 = [statistics.median(t[i] for t in times["FP32"]) for i in range(len(PHASES))]
    phase_lpt8 = [statistics.median(t[i] for t in times["LPT8"]) for i in range(len(PHASES))]
    overhead = sum(phase_lpt8) - sum(phase_fp32)
    rows = []
    for phase, f, q in zip(PHASES, phase_fp32, phase_lpt8, strict=True):
        share = (q - f) / overhead if overhead > 0 else float("nan")
        rows.append([phase, f * 1e3, q * 1e3, (q - f) * 1e3, share])
        figures[f"phase_{phase.split()[0]}_fp32_ms"] = round(f * 1e3, 3)
        figures[f"phase_{phase.split()[0]}_lpt8_ms"] = round(q * 1e3, 3)
    rows.append(
        ["sum of medians", sum(phase_fp32) * 1e3, sum(phase_lpt8) * 1e3, overhead * 1e3, 1.0]
    )
    print("Where the 8-bit step spends its time (medians per phase; forward includes zero_grad)")
    print_table(["phase", "FP32 ms", "LPT8 ms", "extra ms", "share of extra"], rows)
    round_s, num_params = rounding_cost(lpt8, repeats)
    figures["round_all_params_lpt8_ms"] = round(round_s * 1e3, 3)
    print(
        f"Rounding all {num_params} parameter tensors once to 8-bit BFP (row): "
        f"{round_s * 1e3:.2f} ms; the 8-bit optimizer step does it twice (gradients, weights)"
    )
    act_s, act_nearest_s, num_acts, act_numel = activation_rounding_cost(lpt8, images, repeats)
    figures["round_activations_lpt8_ms"] = round(act_s * 1e3, 3)
    figures["round_activations_lpt8_nearest_ms"] = round(act_nearest_s * 1e3, 3)
    print(
        f"Rounding the {num_acts} activations of one forward pass ({act_numel / 1e6:.1f} M values, "
        f"8-bit, one exponent per tensor): {act_s * 1e3:.2f} ms stochastic "
        f"({lpt8.recipe.dither_bits}-bit dither), "
        f"{act_nearest_s * 1e3:.2f} ms nearest; backward rounds errors of the same shapes"
    )
    print()

    # 2. Accuracy on digits.
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
    figures["acc_per_seed"] = {key: [round(a, 2) for a in v] for key, v in accs.items()}
    print()

    # 3. Upload bytes.
    fp32_bytes, sizes = upload_sizes()
    print(f"Upload of the ConvNet 28x28 state dict; FP32 record {fp32_bytes:,} B")
    rows = []
    for bits, block, size in sizes:
        rows.append([f"{bits}-bit, block={block}", size, fp32_bytes / size])
        if bits == 8:
            figures[f"upload_ratio_{block}"] = round(fp32_bytes / size, 3)
            figures[f"upload_bytes_{block}"] = size
    print_table(["payload", "bytes", "FP32/payload"], rows)
    figures["upload_bytes_fp32"] = fp32_bytes
    print_json(figures)


if __name__ == "__main__":
    main()

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
   the 28x28 ConvNet (batch 32, Adam) and of the 8x8 digits ConvNet, the 8-bit recipe on
   the emulated engine (LPT8) and on the integer engine (INT8) against FP32, each built
   by ``fedlpt.task.LocalTrainer``, interleaved (the order shuffled every round, after a
   warm-up), at 1 and 2 torch threads on the CPU and on CUDA when present.
3. **Where the step's time goes**, at 1 thread: the 8-bit recipe against FP32 and against
   itself with one part changed, interleaved: activations and errors rounded to nearest
   (what a free dither would leave), the optimizer wrapper alone (weights and gradients),
   the activation/error quantizers alone.
4. **Memory held for backward** after one forward pass of the 28x28 ConvNet at batch
   256, per engine: the bytes autograd keeps (its saved-tensor hooks, parameters
   excluded), and the resident set before and after the pass in a fresh process (glibc
   made to hand big blocks back, so freed memory does not count).
5. **Accuracy** on digits (8x8 ConvNet) after training on the whole train pool for a
   fixed number of epochs: FP32 and 8-, 6- and 4-bit recipes (row blocks) on both
   engines, and 8-bit with kernel blocks (the paper's "BC", emulated only); mean over
   seeds 0, 1, 2.
6. **A ClientApp round**: ``fedlpt.client_app.train`` on one node's Fashion-MNIST
   partition (digits where Debian's ``dataset-fashion-mnist`` is absent): decode,
   train an epoch, encode the reply; FP32 against 8-bit on each engine, interleaved.

Upload sizes are measured by ``bench.codec``.

    python -m bench.training [--quick]

``--engine-probe`` and ``--memory-probe`` are the subprocesses of sections 4 and 6.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from bench._common import print_json, print_table
from fedlpt import allocator
from fedlpt.data import load_centralized_test, load_partition
from fedlpt.models import ConvNet
from fedlpt.quant import BFP, gemm, kernels, quantize, quantize_tensors, quantize_tensors_
from fedlpt.quant.training import LowPrecision, LowPrecisionOptimizer, prepare, select_engine
from fedlpt.task import LocalTrainer, evaluate, train

BATCH = 32
LR = 1e-3
SEEDS = (0, 1, 2)
# (JSON key suffix, label, bits, block, engine) of the accuracy comparison.
ACC_RECIPES = (
    ("fp32", "FP32", None, "row", "emulated"),
    ("lpt8", "LPT8 block=row", 8, "row", "emulated"),
    ("int8", "LPT8 block=row, integer engine", 8, "row", "integer"),
    ("lpt6", "LPT6 block=row", 6, "row", "emulated"),
    ("int6", "LPT6 block=row, integer engine", 6, "row", "integer"),
    ("lpt4", "LPT4 block=row", 4, "row", "emulated"),
    ("int4", "LPT4 block=row, integer engine", 4, "row", "integer"),
    ("lpt8_kernel", "LPT8 block=kernel", 8, "kernel", "emulated"),
)
# The engines a step is timed on: (name in the tables and JSON, recipe, engine).
STEP_ENGINES = (
    ("fp32", LowPrecision(), "emulated"),
    ("lpt8", LowPrecision.uniform(8), "emulated"),
    ("int8", LowPrecision.uniform(8), "integer"),
)
MEMORY_BATCH = 256


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
    """One training step of a recipe against FP32: medians of the interleaved turns."""

    ms: float
    ratio: float  # of the wall medians
    paired: float  # median of the turn-by-turn wall ratios
    cpu_ratio: float  # of the CPU-time medians
    faults: float  # minor page faults per step (kernel-zeroed pages)


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
    device: torch.device,
    image_size: int,
    recipes: dict[str, LowPrecision],
    engines: dict[str, str] | None = None,
) -> dict[str, Callable[[], object]]:
    """One ``LocalTrainer.step`` per recipe (on its engine, emulated by default), on the
    same batch and the same initial model."""
    generator = torch.Generator().manual_seed(123)
    images = torch.randn(BATCH, 1, image_size, image_size, generator=generator).to(device)
    labels = torch.randint(0, 10, (BATCH,), generator=generator).to(device)
    steps = {}
    for name, recipe in recipes.items():
        torch.manual_seed(0)
        model = ConvNet(1, 10, image_size).to(device)
        trainer = LocalTrainer(
            model,
            recipe,
            lr=LR,
            generator=torch.Generator(device).manual_seed(0),
            engine=(engines or {}).get(name, "emulated"),
        )
        steps[name] = lambda t=trainer: t.step(images, labels)
    return steps


def step_ratios(device: torch.device, image_size: int, repeats: int) -> dict[str, StepTiming]:
    """One training step of every :data:`STEP_ENGINES` entry, interleaved, against FP32."""
    sync = _sync(device)
    recipes = {name: recipe for name, recipe, _ in STEP_ENGINES}
    engines = {name: engine for name, _, engine in STEP_ENGINES}
    steps = _training_steps(device, image_size, recipes, engines)
    medians, times, cpu = interleaved(steps, repeats, sync)
    cpu_fp32 = statistics.median(cpu["fp32"])
    return {
        name: StepTiming(
            ms=medians[name] * 1e3,
            ratio=medians[name] / medians["fp32"],
            paired=statistics.median(
                q / f for q, f in zip(times[name], times["fp32"], strict=True)
            ),
            cpu_ratio=statistics.median(cpu[name]) / cpu_fp32,
            faults=_faults_per_step(steps[name]),
        )
        for name in steps
    }


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


def saved_megabytes(recipe: LowPrecision, engine: str, batch: int = MEMORY_BATCH) -> float:
    """MB autograd holds for backward after one forward pass of the 28x28 ConvNet
    (parameters excluded; each storage once)."""
    torch.manual_seed(0)
    model = ConvNet(1, 10, 28)
    generator = torch.Generator().manual_seed(0)
    LowPrecisionOptimizer(torch.optim.Adam(model.parameters()), recipe, generator)
    prepare(model, recipe, generator, engine=engine)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    images = torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(images)
    return sum(storages.values()) / 2**20


def _resident_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory_probe(name: str, batch: int = MEMORY_BATCH) -> dict[str, float]:
    """Resident MB that one forward pass adds (this process, run by :func:`resident_growth`)."""
    torch.set_num_threads(1)
    recipe, engine = {key: (r, e) for key, r, e in STEP_ENGINES}[name]
    torch.manual_seed(0)
    model = ConvNet(1, 10, 28)
    generator = torch.Generator().manual_seed(0)
    optimizer = LowPrecisionOptimizer(torch.optim.Adam(model.parameters()), recipe, generator)
    prepare(model, recipe, generator, engine=engine)
    images = torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(1))
    for _ in range(2):  # compile the kernels, size every buffer
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
    optimizer.zero_grad()
    before = _resident_mb()
    out = model(images)
    after = _resident_mb()
    del out
    return {"before": before, "after": after, "held": after - before}


def resident_growth(name: str) -> dict[str, float]:
    """:func:`memory_probe` in a fresh process, glibc handing every block above 64 KiB
    back to the system when freed (so the growth is what the pass holds)."""
    # Eager rounding (no compile: the same tensors are kept, in seconds instead of a minute).
    env = {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "FEDLPT_HOLD_MEMORY": "0",
        "FEDLPT_EAGER": "1",
    }
    command = [sys.executable, "-m", "bench.training", "--memory-probe", name]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def accuracy_runs(epochs: int) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Test accuracy (percent) per seed and total training seconds of every ACC_RECIPES entry."""
    test_loader = load_centralized_test("digits", batch_size=256)
    accs: dict[str, list[float]] = {key: [] for key, *_ in ACC_RECIPES}
    seconds: dict[str, float] = dict.fromkeys(accs, 0.0)
    for seed in SEEDS:
        for key, _, bits, block, engine in ACC_RECIPES:
            # One partition of the whole train pool, none of it held out.
            train_loader, _ = load_partition(
                "digits", 0, 1, alpha=1.0, partitioner="iid", seed=seed, batch_size=BATCH
            )
            torch.manual_seed(seed)
            model = ConvNet(1, 10, 8)
            recipe = LowPrecision.uniform(bits, block=block)  # type: ignore[arg-type]
            start = time.perf_counter()
            train(
                model, train_loader, recipe=recipe, epochs=epochs, lr=LR, seed=seed, engine=engine
            )
            seconds[key] += time.perf_counter() - start
            _, accuracy, _ = evaluate(model, test_loader)
            accs[key].append(100.0 * accuracy)
    return accs, seconds


def _client_dataset() -> str:
    from fedlpt.data.catalog import dataset_info
    from fedlpt.data.sources import debian_folder

    return "fmnist" if debian_folder(dataset_info("fmnist")) is not None else "digits"


def client_rounds(repeats: int, examples: int) -> tuple[str, dict[str, float], dict[str, float]]:
    """Median seconds of a ClientApp train round (decode, train one epoch, encode) of each
    of :data:`STEP_ENGINES`, interleaved, and their CPU seconds; and the dataset used.

    Each recipe's node is a ``fedlpt.inprocess.LocalGrid`` of one node: the message
    crosses Flower's serialization both ways, as a SuperNode's does.
    """
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    from fedlpt import protocol
    from fedlpt.client_app import app as client_app
    from fedlpt.config import default_run_config
    from fedlpt.inprocess import LocalGrid
    from fedlpt.task import build_model

    dataset = _client_dataset()
    torch.manual_seed(0)
    state = build_model(dataset, "convnet").state_dict()
    rounds: dict[str, Callable[[], object]] = {}
    for name, recipe, engine in STEP_ENGINES:
        bits = 32 if recipe.is_fp32 else 8
        run_config = {
            **default_run_config(),
            "dataset": dataset,
            "bits": bits,
            "engine": engine,
            "train-examples": examples,
        }
        grid = LocalGrid(client_app, [{"partition-id": 0, "num-partitions": 1}], run_config)
        config = ConfigRecord({protocol.SERVER_ROUND: 1})
        protocol.write_upload_format(config, None if bits == 32 else BFP(bits, "row"))

        def one_round(grid: LocalGrid = grid, config: ConfigRecord = config) -> None:
            content = RecordDict(
                {protocol.ARRAY_RECORD: ArrayRecord(state), protocol.CONFIG_RECORD: config}
            )
            message = grid.create_message(content, "train", grid.node_ids[0], "1")
            (reply,) = grid.send_and_receive([message])
            if reply.has_error():
                raise RuntimeError(f"the ClientApp failed: {reply.error.reason}")

        rounds[name] = one_round
    medians, _, cpu = interleaved(rounds, repeats, lambda: None)
    return dataset, medians, {name: statistics.median(v) for name, v in cpu.items()}


def engine_probe() -> dict[str, str]:
    """What ``engine = "auto"`` picks for the 8-bit recipe in a fresh process (1 thread)."""
    torch.set_num_threads(1)
    engine, why = select_engine(LowPrecision.uniform(8), "auto", "cpu")
    return {"engine": engine, "why": why, "backend": gemm.backend("cpu")}


def _probe_process(*arguments: str) -> str:
    """The last line a fresh ``python -m bench.training ARGUMENTS`` prints."""
    command = [sys.executable, "-m", "bench.training", *arguments]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return done.stdout.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and epochs")
    parser.add_argument("--memory-probe", choices=[n for n, *_ in STEP_ENGINES], help="internal")
    parser.add_argument("--engine-probe", action="store_true", help="internal")
    args = parser.parse_args()
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe)))
        return
    if args.engine_probe:
        print(json.dumps(engine_probe()))
        return
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
            timings = step_ratios(device, image_size, repeats)
            tag = (
                key
                + ("" if device.type == "cpu" else "_cuda")
                + ("" if threads == 1 else f"_{threads}threads")
            )
            for name, step in timings.items():
                rows.append(
                    [
                        device.type,
                        threads,
                        f"{image_size}x{image_size}",
                        {"fp32": "FP32", "lpt8": "LPT8 emulated", "int8": "LPT8 integer"}[name],
                        step.ms,
                        step.ratio,
                        step.paired,
                        step.cpu_ratio,
                        step.faults,
                    ]
                )
                figures[f"step_{name}_ms{tag}"] = round(step.ms, 3)
                if name != "fp32":
                    figures[f"step_{name}_vs_fp32{tag}"] = round(step.ratio, 3)
                    figures[f"step_{name}_vs_fp32_cpu_time{tag}"] = round(step.cpu_ratio, 3)
                    figures[f"step_page_faults_{name}{tag}"] = step.faults
    torch.set_num_threads(1)
    print(f"Training step, ConvNet, batch {BATCH}, Adam: median of {repeats} interleaved steps")
    print_table(
        [
            "device",
            "threads",
            "images",
            "recipe",
            "ms",
            "x FP32",
            "x FP32 (paired)",
            "x FP32 (CPU time)",
            "faults",
        ],
        rows,
    )
    print(
        "faults: minor page faults per step (pages the kernel zeroes); freed memory held: "
        f"{allocator.is_held()} (fedlpt.allocator); int8 products: "
        f"{gemm.choose('cpu')[1]}"
    )
    print()

    chosen = json.loads(_probe_process("--engine-probe"))
    figures["engine_selected"] = chosen["engine"]
    figures["int8_backend"] = chosen["backend"]
    print(f"engine = 'auto' picks, in a fresh process: {chosen['engine']} ({chosen['why']})")
    print()

    rows = []
    saved = {name: saved_megabytes(recipe, engine) for name, recipe, engine in STEP_ENGINES}
    resident = {name: resident_growth(name) for name, _, _ in STEP_ENGINES}
    for name, _, _ in STEP_ENGINES:
        rows.append(
            [
                {"fp32": "FP32", "lpt8": "LPT8 emulated", "int8": "LPT8 integer"}[name],
                saved[name],
                saved[name] / saved["fp32"],
                resident[name]["held"],
                resident[name]["held"] / resident["fp32"]["held"],
            ]
        )
        if name != "fp32":
            figures[f"activation_memory_{name}_vs_fp32"] = round(
                resident[name]["held"] / resident["fp32"]["held"], 3
            )
            figures[f"saved_tensors_{name}_vs_fp32"] = round(saved[name] / saved["fp32"], 3)
        figures[f"activation_memory_{name}_mb"] = round(resident[name]["held"], 1)
    print(f"Memory held for backward after one forward pass, ConvNet 28x28, batch {MEMORY_BATCH}")
    print_table(["recipe", "saved tensors MB", "x FP32", "resident growth MB", "x FP32"], rows)
    print(
        "saved tensors: what autograd keeps (its saved-tensor hooks, parameters excluded); "
        "resident growth: a fresh process's resident set across the pass"
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
    for key, label, *_ in ACC_RECIPES:
        mean = statistics.mean(accs[key])
        rows.append([label, *accs[key], mean, seconds[key]])
        figures[f"acc_{key}"] = round(mean, 2)
    print_table(["recipe", *(f"seed {s}" for s in SEEDS), "mean", "train s (all seeds)"], rows)
    print()

    examples = 640 if args.quick else 3200
    dataset, medians, cpu = client_rounds(5 if args.quick else 15, examples)
    rows = []
    for name, _, _ in STEP_ENGINES:
        label = {"fp32": "FP32", "lpt8": "LPT8 emulated", "int8": "LPT8 integer"}[name]
        rows.append(
            [label, medians[name], medians[name] / medians["fp32"], cpu[name] / cpu["fp32"]]
        )
        figures[f"client_round_{name}_s"] = round(medians[name], 3)
        if name != "fp32":
            figures[f"client_round_{name}_vs_fp32"] = round(medians[name] / medians["fp32"], 3)
    print(
        f"A ClientApp train round (decode, one epoch over {examples} {dataset} images, "
        "encode), 1 thread, medians of interleaved rounds"
    )
    print_table(["recipe", "seconds", "x FP32", "x FP32 (CPU time)"], rows)
    figures["client_round_dataset"] = dataset
    figures["compiled"] = kernels.compiled()
    figures["freed_memory_held"] = allocator.is_held()
    figures["device"] = ",".join(d.type for d in devices)
    print_json(figures)


if __name__ == "__main__":
    main()

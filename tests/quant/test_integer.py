"""The integer engine: the same training as the emulated engine, in int8 codes, lighter."""

import logging

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from bench.training import saved_megabytes
from fedlpt.models import MLP, ConvNet
from fedlpt.quant import (
    BFP,
    LowPrecision,
    LowPrecisionOptimizer,
    gemm,
    kernels,
    prepare,
    quantize,
    unprepare,
)
from fedlpt.quant import integer as engine
from fedlpt.quant.training import integer_blockers, select_engine

INT8_BACKENDS = [name for name in ("onednn", "int_mm") if gemm.available(name, "cpu")]


@pytest.fixture
def backend(request, monkeypatch):
    """Every product through one backend, however small (``None``: the default, which
    leaves products this small to torch's float32 ops)."""
    name = request.param
    gemm.forget_choice()
    if name is not None:
        monkeypatch.setenv(gemm.ENV_BACKEND, name)
    yield name
    gemm.forget_choice()


def convnet() -> nn.Module:
    return ConvNet(1, 10, 12, width=16)


def run(model_fn, engine_name: str, recipe: LowPrecision, steps: int = 4, image: int = 12):
    """``steps`` Adam steps; every forward output, every gradient, the final state."""
    torch.manual_seed(0)
    model = model_fn()
    generator = torch.Generator().manual_seed(5)
    optimizer = LowPrecisionOptimizer(
        torch.optim.Adam(model.parameters(), lr=1e-2), recipe, generator
    )
    prepare(model, recipe, generator, engine=engine_name)
    assert model.fedlpt_engine == engine_name
    data = torch.Generator().manual_seed(1)
    images = torch.randn(8, 1, image, image, generator=data)
    labels = torch.randint(0, 10, (8,), generator=data)
    outputs, grads = [], []
    for _ in range(steps):
        optimizer.zero_grad()
        out = model(images)
        F.cross_entropy(out, labels).backward()
        outputs.append(out.detach().clone())
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
        optimizer.step()
    unprepare(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return outputs, grads, state, generator.get_state()


def assert_same_training(a, b) -> None:
    for step, (x, y) in enumerate(zip(a[0], b[0], strict=True)):
        assert torch.equal(x, y), f"forward output of step {step}"
    for step, (x, y) in enumerate(zip(a[1], b[1], strict=True)):
        for name in x:
            assert torch.equal(x[name], y[name]), f"gradient of {name} at step {step}"
    for name in a[2]:
        assert torch.equal(a[2][name], b[2][name]), f"{name} after the steps"
    assert torch.equal(a[3], b[3]), "the generators drew differently"


_EMULATED: dict[LowPrecision, tuple] = {}


def emulated(recipe: LowPrecision) -> tuple:
    if recipe not in _EMULATED:
        _EMULATED[recipe] = run(convnet, "emulated", recipe)
    return _EMULATED[recipe]


@pytest.mark.parametrize("backend", [None, "float", *INT8_BACKENDS], indirect=True)
@pytest.mark.parametrize("bits", [2, 4, 6, 8])
@pytest.mark.parametrize("block", ["tensor", "row"])
@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
def test_integer_training_equals_emulated_bit_for_bit(backend, bits, block, rounding) -> None:
    # The sums of code products are exact in both engines at these sizes, so forward
    # outputs, every gradient and the state after 4 steps agree exactly, whichever
    # backend multiplies the codes.
    recipe = LowPrecision.uniform(bits, block=block, rounding=rounding)
    assert_same_training(emulated(recipe), run(convnet, "integer", recipe))


@pytest.mark.parametrize("backend", ["onednn"][: len(INT8_BACKENDS)], indirect=True)
def test_a_linear_only_model_and_a_conv1d_train_the_same(backend) -> None:
    recipe = LowPrecision.uniform(8, block="row")

    def mlp() -> nn.Module:
        return MLP(144, 10, hidden=(32, 16))

    assert_same_training(run(mlp, "emulated", recipe), run(mlp, "integer", recipe))

    def conv1d() -> nn.Module:
        return nn.Sequential(
            nn.Flatten(2),  # [B, 1, 144]
            nn.Conv1d(1, 8, 5, padding=2),
            nn.ReLU(),
            nn.Conv1d(8, 8, 3, padding=1, dilation=1),
            nn.ReLU(),
            nn.AvgPool1d(4),
            nn.Flatten(),
            nn.Linear(8 * 36, 10),
        )

    assert_same_training(run(conv1d, "emulated", recipe), run(conv1d, "integer", recipe))


def test_modules_without_an_integer_forward_round_their_output_as_emulated() -> None:
    # Max pooling, GELU and a strided conv keep torch's forward, the rounding after it.
    def mixed() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.GELU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(8 * 3 * 3, 10),
        )

    recipe = LowPrecision.uniform(6, block="row")
    assert_same_training(run(mixed, "emulated", recipe), run(mixed, "integer", recipe))


@pytest.mark.parametrize("backend", ["onednn"][: len(INT8_BACKENDS)], indirect=True)
def test_the_fused_relu_pooling_rounds_the_relus_error_when_not_skipped(backend) -> None:
    recipe = LowPrecision.uniform(6)

    def run_without_skip(engine_name: str):
        torch.manual_seed(0)
        model = ConvNet(1, 10, 16, width=8)
        generator = torch.Generator().manual_seed(3)
        prepare(model, recipe, generator, engine=engine_name, skip_identity_roundings=False)
        images = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(4))
        model(images).square().sum().backward()
        return [p.grad for p in model.parameters()], generator.get_state()

    (a, ga), (b, gb) = run_without_skip("emulated"), run_without_skip("integer")
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert torch.equal(ga, gb)


# --- products from codes against float convolutions -------------------------------------


@given(
    kernel=st.sampled_from([1, 2, 3]),
    stride=st.sampled_from([1, 2]),
    padding=st.integers(0, 3),
    dilation=st.sampled_from([1, 2]),
    size=st.integers(5, 9),
    seed=st.integers(0, 2**31 - 1),
)
def test_conv_products_from_codes_equal_float_convolutions(
    kernel, stride, padding, dilation, size, seed
) -> None:
    generator = torch.Generator().manual_seed(seed)
    x = engine.GridCodes(
        torch.randint(-127, 128, (2, 3, size, size), generator=generator, dtype=torch.int8),
        torch.tensor([2], dtype=torch.int32),
        8,
    )
    w_codes = torch.randint(
        -127, 128, (4, 3, kernel, kernel), generator=generator, dtype=torch.int8
    )
    w = engine.WeightCodes(w_codes, torch.tensor([0, -3, 1, -1], dtype=torch.int32), 8)
    w_values = w_codes.float() * w.scale().view(-1, 1, 1, 1)
    geometry = engine.ConvGeometry(
        (kernel, kernel), (stride, stride), (padding, padding), (dilation, dilation)
    )
    x_values = x.values()
    expected = F.conv2d(x_values.double(), w_values.double(), None, stride, padding, dilation)
    out = engine.conv2d_codes(x, w, None, geometry, "float")
    assert torch.equal(out.double(), expected)
    e = engine.GridCodes(
        torch.randint(-127, 128, tuple(expected.shape), generator=generator, dtype=torch.int8),
        torch.tensor([-4], dtype=torch.int32),
        8,
    )
    grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
        e.values().double(),
        x_values.double(),
        w_values.double(),
        None,
        [stride] * 2,
        [padding] * 2,
        [dilation] * 2,
        False,
        [0, 0],
        1,
        [True, True, False],
    )
    got_w = engine.conv2d_weight_grad_codes(x, e, w_codes.shape, geometry, "float")
    assert torch.equal(got_w.double(), grad_w)
    got_x = engine.conv2d_input_grad_codes(e, w, x.codes.shape, geometry, "float")
    if stride == 1:
        assert torch.equal(got_x.double(), grad_x)
    else:
        assert got_x is None  # strided: the engine's float32 path takes it


def test_row_codes_align_to_the_smallest_exponent_exactly() -> None:
    codes = torch.tensor([[3, -5], [7, 1], [-2, 0]], dtype=torch.int8)
    w = engine.WeightCodes(codes, torch.tensor([2, -1, 0], dtype=torch.int32), 4)
    aligned, bottom = w.aligned()
    assert bottom == -1
    assert torch.equal(aligned, torch.tensor([[24, -40], [7, 1], [-4, 0]], dtype=torch.int32))
    values = codes.float() * w.scale().view(-1, 1)
    assert torch.equal(aligned.float() * 2.0 ** (bottom - 2), values)


# --- what is kept for backward -------------------------------------------------------------


def test_the_integer_engine_keeps_a_quarter_of_fp32s_memory_for_backward() -> None:
    # What autograd holds after one forward pass of the 28x28 ConvNet, parameters excluded.
    fp32 = saved_megabytes(LowPrecision(), "emulated", batch=64)
    emulated = saved_megabytes(LowPrecision.uniform(8), "emulated", batch=64)
    integer = saved_megabytes(LowPrecision.uniform(8), "integer", batch=64)
    # Emulated: each rounded activation is a new float32 tensor beside its source.
    assert emulated > 1.3 * fp32
    # Integer: int8 codes, a ReLU's mask, nothing for a pooling.
    assert integer < 0.3 * fp32, (fp32, integer)


def test_codes_ride_on_the_values_until_the_values_change() -> None:
    values = torch.ones(2, 3)
    grid = engine.GridCodes(torch.full((2, 3), 64, dtype=torch.int8), torch.tensor([0]), 8)
    engine.attach(values, grid)
    assert engine.grid_of(values) is grid
    flat = values.view(-1)
    assert torch.equal(engine.grid_of(flat).codes, grid.codes.view(-1))
    assert engine.grid_of(values[:, :2]) is None  # a slice is not the whole tensor
    values.add_(1)
    assert engine.grid_of(values) is None
    assert engine.grid_of(flat) is None


@pytest.mark.parametrize("backend", ["float"], indirect=True)
def test_weights_off_their_grid_multiply_in_float32_and_say_so(backend, caplog) -> None:
    recipe = LowPrecision.uniform(8)
    results = []
    for engine_name in ("emulated", "integer"):
        torch.manual_seed(0)
        model = convnet()  # FP32 weights: no optimizer wrapper rounded them
        prepare(model, recipe, torch.Generator().manual_seed(1), engine=engine_name)
        with caplog.at_level(logging.WARNING, logger="fedlpt.quant.integer"):
            out = model(torch.randn(4, 1, 12, 12, generator=torch.Generator().manual_seed(2)))
        results.append(out)
    assert torch.equal(results[0], results[1])
    assert any("off its 8-bit row grid" in r.message for r in caplog.records)


def test_a_weight_changed_after_the_wrapper_rounded_it_is_checked_again() -> None:
    fmt = BFP(8, "row")
    weight = quantize(torch.randn(4, 6), BFP(8, "row", "nearest"))
    engine.mark_on_grid([weight], fmt)
    codes = engine.weight_codes(weight, fmt)
    assert codes is not None
    assert torch.equal(codes.codes.float() * codes.scale().view(-1, 1), weight)
    weight.add_(1e-3)  # off its grid now; its version moved, so the mark no longer holds
    assert engine.weight_codes(weight, fmt) is None
    weight.copy_(quantize(weight, BFP(8, "row", "nearest")))  # back on the grid: checked, read
    assert engine.weight_codes(weight, fmt) is not None


def test_non_finite_values_poison_their_codes_scale() -> None:
    fmt = BFP(8, "row")
    weight = torch.ones(3, 4)
    weight[1, 2] = float("nan")
    engine.mark_on_grid([weight], fmt)
    codes = engine.weight_codes(weight, fmt)
    assert codes is not None and not torch.isfinite(codes.scale()).all()
    values = torch.tensor([1.0, float("inf"), 2.0])
    _, _, exponent = kernels.round_tensor(values, 0, 8, False)
    grid = engine.GridCodes(torch.zeros(3, dtype=torch.int8), exponent, 8)
    assert not torch.isfinite(grid.scale).all()


def test_unprepare_restores_the_plain_model() -> None:
    torch.manual_seed(0)
    model = convnet()
    keys = list(model.state_dict())
    prepare(model, LowPrecision.uniform(8), engine="integer")
    assert any("forward" in vars(m) for m in model.modules())
    unprepare(model)
    assert not any("forward" in vars(m) for m in model.modules())
    assert list(model.state_dict()) == keys
    prepare(model, LowPrecision.uniform(8), engine="integer")  # and can be prepared again


# --- choosing the engine -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("recipe", "reason"),
    [
        (LowPrecision.uniform(8, block="kernel"), "weight block 'kernel'"),
        (LowPrecision.uniform(8, block=16), "weight block 16"),
        (LowPrecision.uniform(10), "activation bits 10 > 8"),
        (LowPrecision(activation=BFP(8, "tensor"), error=BFP(8, "tensor")), "weights are FP32"),
        (LowPrecision(activation=BFP(8, "row"), error=BFP(8, "tensor"), weight=BFP(8)), "by 'row'"),
    ],
)
def test_integer_where_the_recipe_does_not_allow_it_names_why(recipe, reason) -> None:
    assert any(reason in r for r in integer_blockers(recipe))
    with pytest.raises(ValueError, match=reason):
        select_engine(recipe, "integer")
    engine_name, why = select_engine(recipe, "auto")
    assert engine_name == "emulated" and reason in why


def test_auto_takes_the_integer_engine_only_where_int8_products_are_fast(monkeypatch) -> None:
    recipe = LowPrecision.uniform(8)
    monkeypatch.setattr(gemm, "choose", lambda device: ("onednn", "0.50x float32"))
    assert select_engine(recipe, "auto") == ("integer", "int8 products by onednn (0.50x float32)")
    monkeypatch.setattr(gemm, "choose", lambda device: ("float", "no exact int8 product ..."))
    assert select_engine(recipe, "auto") == ("emulated", "no exact int8 product ...")
    # Asked for by name it still runs, its products in float32 (the memory saving stays).
    assert select_engine(recipe, "integer")[0] == "integer"
    assert select_engine(recipe, "emulated") == ("emulated", "asked for")
    with pytest.raises(ValueError, match="engine must be one of"):
        select_engine(recipe, "fast")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("block", ["tensor", "row"])
def test_integer_training_on_cuda_equals_emulated(block) -> None:
    recipe = LowPrecision.uniform(8, block=block)

    def on_cuda() -> nn.Module:
        return ConvNet(1, 10, 28).cuda()

    def run_cuda(engine_name):
        torch.manual_seed(0)
        model = on_cuda()
        generator = torch.Generator("cuda").manual_seed(5)
        optimizer = LowPrecisionOptimizer(torch.optim.Adam(model.parameters()), recipe, generator)
        prepare(model, recipe, generator, engine=engine_name)
        images = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(1)).cuda()
        labels = torch.randint(0, 10, (32,), generator=torch.Generator().manual_seed(1)).cuda()
        outs = []
        for _ in range(4):
            optimizer.zero_grad()
            out = model(images)
            F.cross_entropy(out, labels).backward()
            optimizer.step()
            outs.append(out.detach().cpu())
        return outs

    for a, b in zip(run_cuda("emulated"), run_cuda("integer"), strict=True):
        # float32 sums on the GPU are exact at these magnitudes too; allow summation order.
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

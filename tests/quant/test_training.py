"""Low-precision training: the quantizers really act, FP32 is plain PyTorch, FedProx, seeds."""

import pytest
import torch
from torch import nn

from fedlpt.quant import (
    BFP,
    LowPrecision,
    LowPrecisionOptimizer,
    prepare,
    quantize,
    unprepare,
)
from fedlpt.quant.wire import decode_arrays, encode_arrays
from fedlpt.task import train
from tests.tiny import batches, on_grid, small_convnet


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("block", ["row", "kernel", "tensor"])
def test_weights_lie_on_the_wire_grid_after_every_step(bits: int, block) -> None:
    model = small_convnet()
    recipe = LowPrecision.uniform(bits, block=block)
    train(model, batches(), recipe=recipe, seed=1)
    for name, param in model.named_parameters():
        assert on_grid(param.detach(), recipe.weight), name
    # ... so the upload is lossless: the stochastic encoder leaves grid values alone.
    state = model.state_dict()
    decoded = decode_arrays(encode_arrays(state, recipe.weight, torch.Generator().manual_seed(9)))
    assert all(torch.equal(decoded[k], v) for k, v in state.items())


def test_activations_and_errors_are_on_their_grids() -> None:
    model = small_convnet()
    fmt = BFP(5, "tensor", "stochastic")
    prepare(model, LowPrecision(activation=fmt, error=BFP(6, "tensor")))
    seen: dict[str, list[torch.Tensor]] = {"out": [], "grad": []}

    def record(module, inputs, output):
        seen["out"].append(output.detach())
        output.register_hook(lambda g: seen["grad"].append(g))

    # Registered after prepare's hooks, so it sees the quantized outputs.
    for module in (model.features.conv1, model.features.relu2, model.features.pool3):
        module.register_forward_hook(record)
    images, labels = batches(1)[0]
    nn.functional.cross_entropy(model(images), labels).backward()
    assert len(seen["out"]) == 3 and len(seen["grad"]) == 3
    assert all(on_grid(t, fmt) for t in seen["out"])
    # The error reaching the quantizer's output is quantized on its way into the module.
    unprepare(model)


def test_errors_flowing_back_through_a_quantizer_are_on_the_error_grid() -> None:
    from fedlpt.quant import quantize_activation

    x = torch.randn(64, requires_grad=True)
    error_fmt = BFP(4, "tensor", "stochastic")
    y = quantize_activation(x, None, error_fmt, torch.Generator().manual_seed(0))
    upstream = torch.randn(64)
    y.backward(upstream)
    assert torch.equal(y.detach(), x.detach())
    assert on_grid(x.grad, error_fmt) and not torch.equal(x.grad, upstream)


def test_gradients_are_rounded_before_the_step() -> None:
    param = nn.Parameter(torch.zeros(4, 16))
    grad_fmt = BFP(3, "row", "nearest")
    inner = torch.optim.SGD([param], lr=1.0)
    opt = LowPrecisionOptimizer(inner, LowPrecision(gradient=grad_fmt))
    grad = torch.randn(4, 16)
    param.grad = grad.clone()
    opt.step()
    assert torch.equal(param.detach(), -quantize(grad, grad_fmt))


def test_optimizer_state_is_rounded_when_the_recipe_asks() -> None:
    model = small_convnet()
    recipe = LowPrecision.uniform(6, quantize_optimizer_state=True)
    inner = torch.optim.Adam(model.parameters(), lr=1e-3)
    opt = LowPrecisionOptimizer(inner, recipe, torch.Generator().manual_seed(0))
    images, labels = batches(1)[0]
    nn.functional.cross_entropy(model(images), labels).backward()
    opt.step()
    for param in model.parameters():
        state = inner.state[param]
        assert on_grid(state["exp_avg"], recipe.optimizer_state)
        assert on_grid(state["exp_avg_sq"], recipe.optimizer_state)


def test_fp32_recipe_is_plain_pytorch_bit_for_bit() -> None:
    data = batches(6)
    ours = small_convnet()
    train(ours, data, recipe=LowPrecision(), lr=1e-3, seed=3)
    plain = small_convnet()
    opt = torch.optim.Adam(plain.parameters(), lr=1e-3)
    plain.train()
    for images, labels in data:
        opt.zero_grad()
        nn.functional.cross_entropy(plain(images), labels).backward()
        opt.step()
    for (name, a), b in zip(ours.state_dict().items(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_prepared_model_keeps_the_plain_state_dict_keys_and_values() -> None:
    plain = small_convnet()
    prepared = prepare(small_convnet(), LowPrecision.uniform(8))
    assert list(prepared.state_dict()) == list(plain.state_dict())
    prepared.load_state_dict(plain.state_dict())
    plain.load_state_dict(prepared.state_dict())
    with pytest.raises(ValueError, match="already prepared"):
        prepare(prepared, LowPrecision.uniform(8))


# --- error roundings proved to be the identity (prepare's skip_identity_roundings) ---


def _trained_state(model: nn.Module, recipe: LowPrecision, skip: bool, steps: int = 4):
    generator = torch.Generator().manual_seed(5)
    prepare(model, recipe, generator, skip_identity_roundings=skip)
    optimizer = LowPrecisionOptimizer(torch.optim.Adam(model.parameters(), 1e-2), recipe, generator)
    for images, labels in batches(steps, batch=6, seed=3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
    return model.state_dict(), generator.get_state()


@pytest.mark.parametrize("bits", [8, 3])
@pytest.mark.parametrize("block", ["tensor", "row", "kernel"])
@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
def test_skipping_identity_roundings_changes_nothing_bit_for_bit(bits, block, rounding) -> None:
    tensor_fmt = BFP(bits, block, rounding)
    recipe = LowPrecision(
        weight=BFP(bits, "row", rounding),
        activation=tensor_fmt,
        error=tensor_fmt,
        gradient=BFP(bits, "row", rounding),
    )
    skipped, skipped_rng = _trained_state(small_convnet(), recipe, skip=True)
    full, full_rng = _trained_state(small_convnet(), recipe, skip=False)
    assert torch.equal(skipped_rng, full_rng)  # the same seeds were drawn
    for key, value in full.items():
        assert torch.equal(skipped[key], value), key


def test_the_skip_really_skips_the_roundings_after_each_pooling(monkeypatch) -> None:
    import fedlpt.quant.training as training

    calls = {"n": 0}
    real = training.quantize

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "quantize", counting)
    counts = {}
    for skip in (False, True):
        model = prepare(
            small_convnet(),
            LowPrecision.uniform(8),
            engine="emulated",  # the engine whose quantize calls this counts
            skip_identity_roundings=skip,
        )
        images, labels = batches(1)[0]
        calls["n"] = 0
        nn.functional.cross_entropy(model(images), labels).backward()
        counts[skip] = calls["n"]
    # 10 quantized modules: 10 activations and 10 errors; 3 errors (one per ReLU) skipped.
    assert counts == {False: 20, True: 17}


def test_errors_arriving_on_grid_finds_each_relu_before_a_pooling() -> None:
    from fedlpt.quant.training import errors_arriving_on_grid

    names = errors_arriving_on_grid(small_convnet(), BFP(8, "tensor"))
    assert names == ["features.relu1", "features.relu2", "features.relu3"]
    assert errors_arriving_on_grid(small_convnet(), BFP(8, "row")) == names
    assert errors_arriving_on_grid(small_convnet(), None) == []
    # An integer block: the pooling regroups the blocks.
    assert errors_arriving_on_grid(small_convnet(), BFP(8, 16)) == []


@pytest.mark.parametrize(
    "pool",
    [
        nn.AvgPool2d(3),  # a window of 9 values: not a power of two
        nn.AvgPool2d(2, stride=1),  # overlapping windows add errors
        nn.AvgPool2d(2, padding=1),
        nn.AvgPool2d(2, ceil_mode=True),
        nn.AvgPool2d(2, divisor_override=3),
        nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(2),
    ],
    ids=["window9", "overlap", "padding", "ceil", "divisor", "maxpool", "adaptive"],
)
def test_no_skip_before_a_pooling_that_is_not_an_exact_division(pool) -> None:
    from fedlpt.quant.training import errors_arriving_on_grid

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), pool)
    assert errors_arriving_on_grid(model, BFP(8, "tensor")) == []
    exact = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AvgPool2d((2, 4)))
    assert errors_arriving_on_grid(exact, BFP(8, "tensor")) == ["1"]
    assert errors_arriving_on_grid(nn.Sequential(nn.ReLU(), nn.AvgPool1d(4)), BFP(4)) == ["0"]


def test_no_skip_where_the_output_may_go_elsewhere() -> None:
    from fedlpt.quant.training import errors_arriving_on_grid

    fmt = BFP(8, "tensor")
    # A hook on the module may use its output.
    hooked = nn.Sequential(nn.ReLU(), nn.AvgPool2d(2))
    hooked[0].register_forward_hook(lambda module, inputs, output: None)
    assert errors_arriving_on_grid(hooked, fmt) == []
    # The same module used twice.
    relu = nn.ReLU()
    assert errors_arriving_on_grid(nn.Sequential(relu, nn.AvgPool2d(2), relu), fmt) == []

    # A container that runs its own forward.
    class Skipping(nn.Sequential):
        def forward(self, x):
            return self[1](x) + self[0](x).mean()

    assert errors_arriving_on_grid(Skipping(nn.ReLU(), nn.AvgPool2d(2)), fmt) == []

    # A subclass of the pooling may change its forward.
    class Pool(nn.AvgPool2d):
        pass

    assert errors_arriving_on_grid(nn.Sequential(nn.ReLU(), Pool(2)), fmt) == []
    # Not followed by a quantized module, or not quantized itself.
    assert errors_arriving_on_grid(nn.Sequential(nn.GroupNorm(1, 4), nn.AvgPool2d(2)), fmt) == []


def test_the_error_reaching_a_skipped_rounding_is_on_its_grid() -> None:
    """What the skip relies on, directly: the ReLU-output error after the pooling's rounding."""
    fmt = BFP(5, "tensor", "stochastic")
    for skip in (True, False):
        model = small_convnet()
        prepare(
            model,
            LowPrecision(activation=fmt, error=fmt),
            torch.Generator().manual_seed(2),
            skip_identity_roundings=skip,
        )
        seen = []

        def record(module, inputs, output, seen=seen) -> None:
            output.register_hook(seen.append)

        model.features.relu1.register_forward_hook(record)
        images, labels = batches(1)[0]
        nn.functional.cross_entropy(model(images), labels).backward()
        assert len(seen) == 1 and on_grid(seen[0], fmt)

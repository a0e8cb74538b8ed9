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

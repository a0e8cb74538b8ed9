"""Low-precision training: the quantizers really act, FP32 is plain PyTorch, FedProx, seeds."""

import math

import pytest
import torch
from torch import nn

from fedlpt.models import MLP, ConvNet
from fedlpt.quant import (
    BFP,
    LowPrecision,
    LowPrecisionOptimizer,
    prepare,
    quantize,
    unprepare,
)
from fedlpt.quant.wire import decode_arrays, encode_arrays
from fedlpt.task import evaluate, proximal_term, train


def on_grid(t: torch.Tensor, fmt: BFP) -> bool:
    return torch.equal(quantize(t, BFP(fmt.bits, fmt.block, "nearest")), t)


def batches(n: int = 4, batch: int = 8, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, 1, 8, 8, generator=gen), torch.randint(0, 10, (batch,), generator=gen))
        for _ in range(n)
    ]


def small_convnet() -> nn.Module:
    torch.manual_seed(0)
    return ConvNet(in_channels=1, num_classes=10, image_size=8, width=8)


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


def test_train_leaves_the_model_without_quantizers() -> None:
    model = small_convnet()
    train(model, batches(1), recipe=LowPrecision.uniform(4), seed=0)
    images = batches(1)[0][0]
    out = model(images)
    assert not on_grid(out.detach(), BFP(4, "tensor"))


def test_proximal_term_value_and_gradient() -> None:
    model = nn.Linear(3, 2)
    global_params = {k: torch.zeros_like(v) for k, v in model.named_parameters()}
    with torch.no_grad():
        model.weight.fill_(2.0)
        model.bias.fill_(-1.0)
    mu = 0.3
    term = proximal_term(model, global_params, mu)
    assert math.isclose(term.item(), 0.5 * mu * (6 * 4.0 + 2 * 1.0), rel_tol=1e-6)
    term.backward()
    assert torch.allclose(model.weight.grad, mu * model.weight.detach())
    assert torch.allclose(model.bias.grad, mu * model.bias.detach())


def test_proximal_term_pulls_training_towards_the_global_model() -> None:
    start = small_convnet()
    global_state = {k: v.clone() for k, v in start.state_dict().items()}

    def drift(mu: float) -> float:
        model = small_convnet()
        train(model, batches(8), recipe=LowPrecision(), lr=1e-2, proximal_mu=mu, seed=0)
        return sum((p - global_state[k]).pow(2).sum().item() for k, p in model.named_parameters())

    assert drift(10.0) < drift(0.0)


def test_training_is_deterministic_given_the_seed() -> None:
    def run(seed: int) -> dict[str, torch.Tensor]:
        model = small_convnet()
        train(model, batches(3), recipe=LowPrecision.uniform(6), seed=seed)
        return model.state_dict()

    a, b, c = run(5), run(5), run(6)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_optimizer_state_resumes_across_calls() -> None:
    model = small_convnet()
    _, state = train(model, batches(2), recipe=LowPrecision.uniform(8), seed=0)
    result, state2 = train(
        model, batches(2), recipe=LowPrecision.uniform(8), seed=1, optimizer_state=state
    )
    assert result.steps == 2 and result.num_examples == 16
    assert all(s["step"] == 4 for s in state2["state"].values())


def test_low_precision_mlp_learns_a_separable_problem() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 1, 8, 8, generator=gen)
    y = (x.view(512, -1)[:, :32].sum(1) > 0).long()
    data = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 512, 32)]
    torch.manual_seed(0)
    model = MLP(64, 2, hidden=(32,))
    for epoch in range(4):
        train(model, data, recipe=LowPrecision.uniform(8), lr=3e-3, seed=epoch)
    _, accuracy, n = evaluate(model, data)
    assert n == 512 and accuracy > 0.85


def test_bad_recipe_and_arguments_are_rejected() -> None:
    with pytest.raises(TypeError, match="must be a BFP"):
        LowPrecision(weight=8)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="epochs"):
        train(small_convnet(), batches(1), recipe=LowPrecision(), epochs=0)
    with pytest.raises(ValueError, match="unknown optimizer"):
        train(small_convnet(), batches(1), recipe=LowPrecision(), optimizer="lamb")
    with pytest.raises(ValueError, match="dither_bits"):
        LowPrecision(dither_bits=4)
    assert LowPrecision.uniform(32).is_fp32 and LowPrecision.uniform(None).is_fp32
    assert not LowPrecision.uniform(8).is_fp32

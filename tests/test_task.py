"""Local training: the step builder, FedProx, seeds, resumed optimizer state, recipes, devices."""

import logging
import math

import pytest
import torch
from torch import nn

from fedlpt.models import MLP
from fedlpt.quant import (
    BFP,
    LowPrecision,
)
from fedlpt.task import evaluate, make_recipe, proximal_term, resolve_device, train
from tests.tiny import batches, on_grid, small_convnet


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
    assert LowPrecision.uniform(32).is_fp32 and LowPrecision.uniform(None).is_fp32
    assert not LowPrecision.uniform(8).is_fp32


def test_a_diverging_step_is_caught_once_at_the_end_of_local_training() -> None:
    model = small_convnet()
    with torch.no_grad():
        model.features.conv1.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="local training diverged: the mean loss is nan"):
        train(model, batches(2), recipe=LowPrecision.uniform(8))


def test_a_recipe_from_one_word_length_per_role() -> None:
    recipe = make_recipe(
        {"weight": 8, "activation": 6, "error": 32, "gradient": 4},
        block="kernel",
        rounding="stochastic",
        quantize_optimizer_state=True,
    )
    assert recipe.weight == BFP(8, "kernel") and recipe.optimizer_state == recipe.weight
    assert recipe.activation == BFP(6, "tensor") and recipe.error is None
    assert recipe.gradient == BFP(4, "kernel")


def test_devices_that_are_not_here_are_named() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda:1")


@pytest.mark.compiled
def test_a_compiled_training_step_equals_an_eager_one() -> None:
    from fedlpt.quant import kernels

    results = []
    for compiled in (True, False):
        kernels.set_compiled(compiled)
        torch.manual_seed(0)
        model = small_convnet()
        train(model, batches(2), recipe=LowPrecision.uniform(6), seed=3)
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_on_a_gpu_stays_on_the_grid() -> None:
    model = small_convnet().cuda()
    train(model, batches(2), recipe=LowPrecision.uniform(8), seed=3)
    for param in model.parameters():
        assert param.is_cuda and on_grid(param.detach().cpu(), BFP(8, "row"))


def test_long_local_training_logs_its_progress(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="flwr"):
        train(small_convnet(), batches(3), recipe=LowPrecision.uniform(8), progress_every_s=0.0)
    lines = [r.getMessage() for r in caplog.records if "local training" in r.getMessage()]
    assert len(lines) == 3
    assert lines[-1].startswith("fedlpt local training: epoch 1/1, step 3/3,")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="flwr"):
        train(small_convnet(), batches(3), recipe=LowPrecision.uniform(8))
    assert not [r for r in caplog.records if "local training" in r.getMessage()]

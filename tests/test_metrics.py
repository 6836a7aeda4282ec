"""torchmetrics wrappers: equal to the core on the same examples; indices deduplicate and order."""

import pytest
import torch

from lightning_netsim import denoising_factor, soft_density
from lightning_netsim.metrics import DenoisingFactor, SoftDensity
from tests.models import TwoInputNet, mlp

TOL = dict(rtol=0, atol=1e-10)


def _x(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("d", [1, 3])
def test_soft_density_metric_equals_core(d):
    model, x, r = mlp(d), _x(9), _x(5, seed=1)
    metric = SoftDensity(model, batch_size=4)
    for part in x.split(4):
        metric.update(part)
    torch.testing.assert_close(metric.compute(), soft_density(model, x), **TOL)
    with_reference = SoftDensity(model, reference=r)
    with_reference.update(x)
    torch.testing.assert_close(with_reference.compute(), soft_density(model, x, reference=r), **TOL)


def test_denoising_metric_equals_core_and_full():
    model, x = mlp(2), _x(8)
    metric = DenoisingFactor(model, full=True)
    metric.update(x[:3])
    metric.update(x[3:])
    torch.testing.assert_close(metric.compute(), denoising_factor(model, x, full=True), **TOL)


def test_indices_drop_repeats_and_order_examples():
    model, x = mlp(1), _x(7)
    metric = SoftDensity(model)
    metric.update(x[[4, 5, 6]], indices=torch.tensor([4, 5, 6]))
    metric.update(x[[0, 1, 2, 3, 0]], indices=torch.tensor([0, 1, 2, 3, 0]))  # a padded sampler repeats 0
    torch.testing.assert_close(metric.compute(), soft_density(model, x), **TOL)


def test_several_inputs_reach_output_fn_and_reset_clears():
    model = TwoInputNet()
    x, z = _x(6)[:, :3], _x(6, seed=2)[:, :2]
    fn = lambda net, batch: net(batch[0], batch[1])  # noqa: E731
    metric = SoftDensity(model, output_fn=fn)
    metric.update(x, z)
    torch.testing.assert_close(metric.compute(), soft_density(model, (x, z), output_fn=fn), **TOL)
    metric.reset()
    metric.update(x[:3], z[:3])
    assert metric.compute().shape == (3,)


def test_model_is_not_a_submodule_and_bad_input_is_explained():
    model = mlp(1)
    metric = SoftDensity(model)
    assert not list(metric.children()) and not list(metric.parameters())
    with pytest.raises(ValueError, match="before any `update`"), pytest.warns(UserWarning):
        metric.compute()
    with pytest.raises(TypeError, match="one or more tensors"):
        metric.update([1, 2])
    metric.update(_x(3))
    with pytest.raises(ValueError, match="Expected 1 tensors"):
        metric.update(_x(3), _x(3))
    with pytest.raises(ValueError, match="indices"):
        metric.update(_x(3), indices=torch.arange(2))
    with pytest.raises(ValueError, match="earlier calls had none"):
        metric.update(_x(3), indices=torch.arange(3))
    with pytest.raises(ValueError, match="batch_size"):
        SoftDensity(model, batch_size=0)

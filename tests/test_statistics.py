"""Density, counts, retrieval, denoising and consistency against explicit N×N computations (float64)."""

import pytest
import torch

from lightning_netsim import (
    counts_from_similarity,
    denoising_factor,
    gradient_kernel,
    nearest_neighbors,
    neighbor_consistency,
    neighbor_counts,
    per_sample_jacobian,
    predicted_noise,
    similarity,
    soft_density,
)
from tests.models import mlp

TOL = dict(rtol=0, atol=1e-8)


def _x(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _batches(x: torch.Tensor, size: int = 4) -> list[torch.Tensor]:
    return [x[i : i + size] for i in range(0, len(x), size)]


def _explicit_d(model, x, r):
    """``D_i`` and the consistency of predictions, from explicit blocks ``K_ij``."""
    k = gradient_kernel(per_sample_jacobian(model, x), per_sample_jacobian(model, r))  # [N, M, d, d]
    m_inv = torch.linalg.inv(k.mT.sum(1))
    a = k.mT @ m_inv[:, None]
    factor = (a @ a.mT).sum(1)
    y_x, y_r = model(x).detach(), model(r).detach()
    average = (torch.einsum("jm,ijkm->ik", y_r, k).unsqueeze(1) @ m_inv).squeeze(1)
    return factor, (y_x - average).norm(dim=1)


CASES = [(1, False), (1, True), (3, False), (3, True)]
IDS = ["d1-self", "d1-reference", "d3-self", "d3-reference"]


@pytest.mark.parametrize(("d", "with_reference"), CASES, ids=IDS)
def test_soft_density_matches_explicit(d: int, with_reference: bool) -> None:
    model, x, r = mlp(d), _x(11, 0), _x(7, 1)
    reference = _batches(r, 3) if with_reference else None
    rho = similarity(per_sample_jacobian(model, x), per_sample_jacobian(model, r) if with_reference else None)
    torch.testing.assert_close(soft_density(model, _batches(x), reference=reference), rho.sum(1), **TOL)


@pytest.mark.parametrize(("d", "with_reference"), CASES, ids=IDS)
@pytest.mark.parametrize("method", ["hard", "less_soft"])
def test_neighbor_counts_match_explicit(d: int, with_reference: bool, method: str) -> None:
    model, x, r = mlp(d), _x(11, 0), _x(7, 1)
    jr = per_sample_jacobian(model, r) if with_reference else None
    rho = similarity(per_sample_jacobian(model, x), jr)
    mask = torch.zeros_like(rho, dtype=torch.bool) if with_reference else None
    expected = counts_from_similarity(rho, method=method, threshold=0.5, power=3, self_mask=mask)
    got = neighbor_counts(
        model, _batches(x), reference=_batches(r, 3) if with_reference else None,
        method=method, threshold=0.5, power=3,
    )
    torch.testing.assert_close(got, expected, **TOL)
    assert method == "less_soft" or got.max() > 0  # the threshold is met somewhere


@pytest.mark.parametrize("d", [1, 3])
def test_nearest_neighbors_match_explicit_topk(d: int) -> None:
    model, q, x = mlp(d), _x(5, 2), _x(13, 0)
    sims, index = nearest_neighbors(model, _batches(q, 2), _batches(x, 5), k=4)
    expected = similarity(per_sample_jacobian(model, q), per_sample_jacobian(model, x)).topk(4, dim=1)
    torch.testing.assert_close(sims, expected.values, **TOL)
    assert torch.equal(index, expected.indices)


@pytest.mark.parametrize(("d", "with_reference"), CASES, ids=IDS)
def test_denoising_and_consistency_match_explicit(d: int, with_reference: bool) -> None:
    model, x, r = mlp(d), _x(10, 0), _x(7, 1)
    factor, consistency = _explicit_d(model, x, r if with_reference else x)
    reference = _batches(r, 3) if with_reference else None
    full = denoising_factor(model, _batches(x), reference=reference, full=True)
    torch.testing.assert_close(full, factor, **TOL)
    scalar = denoising_factor(model, _batches(x), reference=reference)
    torch.testing.assert_close(scalar, factor.diagonal(dim1=1, dim2=2).sum(-1) / d, **TOL)
    torch.testing.assert_close(neighbor_consistency(model, _batches(x), reference=reference), consistency, **TOL)


def test_consistency_with_labels_one_hot() -> None:
    model, x = mlp(3), _x(9, 0)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    data = [(x[:5], labels[:5]), (x[5:], labels[5:])]
    got = neighbor_consistency(model, data, targets=lambda batch: batch[1])
    jac = per_sample_jacobian(model, x)
    k = gradient_kernel(jac)
    y = torch.nn.functional.one_hot(labels, 3).double()
    m_inv = torch.linalg.inv(k.mT.sum(1))
    average = (torch.einsum("jm,ijkm->ik", y, k).unsqueeze(1) @ m_inv).squeeze(1)
    torch.testing.assert_close(got, (y - average).norm(dim=1), **TOL)


def test_d1_denoising_formula() -> None:
    model, x = mlp(1), _x(8, 3)
    k = gradient_kernel(per_sample_jacobian(model, x))[..., 0, 0]
    expected = (k**2).sum(1) / k.sum(1) ** 2
    torch.testing.assert_close(denoising_factor(model, x), expected, **TOL)
    torch.testing.assert_close(predicted_noise(expected, 2.0), 2.0 * expected.sqrt())


def test_sketch_error_shrinks_with_dimension() -> None:
    model, x = mlp(2, hidden=16), _x(12, 0)
    exact = denoising_factor(model, x)
    errors = {}
    for dim in (8, 128, 2048):
        sketch = denoising_factor(model, x, sketch_dim=dim, seed=1)
        errors[dim] = ((sketch - exact).abs() / exact).mean().item()
    assert errors[2048] < errors[8]
    assert errors[2048] < 0.1
    rng = torch.get_rng_state()
    again = denoising_factor(model, x, sketch_dim=128, seed=1)
    assert torch.equal(torch.get_rng_state(), rng)  # own generator
    torch.testing.assert_close(again, denoising_factor(model, x, sketch_dim=128, seed=1))


def test_statistics_work_with_a_dataloader_and_inference_mode() -> None:
    model, x = mlp(1), _x(10, 0)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(10)), batch_size=4)
    with torch.inference_mode():
        got = soft_density(model, loader)
    torch.testing.assert_close(got, similarity(per_sample_jacobian(model, x)).sum(1), **TOL)


# ---------------------------------------------------------------- errors


def test_error_generator_data() -> None:
    with pytest.raises(TypeError, match="re-iterable.*one-shot generator"):
        soft_density(mlp(1), (b for b in _batches(_x(8, 0))))


def test_error_dataset_not_batched() -> None:
    dataset = torch.utils.data.TensorDataset(_x(8, 0))
    with pytest.raises(TypeError, match="DataLoader"):
        soft_density(mlp(1), dataset)


def test_error_empty_data() -> None:
    with pytest.raises(ValueError, match="at least one batch"):
        soft_density(mlp(1), [])


def test_error_reference_with_other_output_dimension() -> None:
    def output_fn(model, batch):
        x, kind = batch
        return model(x)[:, :2] if kind == "two" else model(x)[:, :1]

    with pytest.raises(ValueError, match="outputs of one dimension.*d = 2 and d = 1"):
        soft_density(mlp(3), (_x(6, 0), "two"), reference=(_x(4, 1), "one"), output_fn=output_fn)


def test_error_k_larger_than_reference() -> None:
    with pytest.raises(ValueError, match="at most the number of examples in `data` \\(6\\)"):
        nearest_neighbors(mlp(1), _x(2, 0), _x(6, 1), k=7)


def test_error_non_finite_jacobian_names_the_example() -> None:
    x = _x(6, 0)
    x[4, 0] = float("nan")
    with pytest.raises(ValueError, match="Non-finite outputs or Jacobian for example #4"):
        soft_density(mlp(1), x)


@pytest.mark.parametrize("bad", [{"method": "soft"}, {"threshold": 0.5, "method": "median"}], ids=["soft", "median"])
def test_error_unknown_count_method(bad) -> None:
    with pytest.raises(ValueError, match=r"one of \('hard', 'less_soft'\)"):
        neighbor_counts(mlp(1), _x(4, 0), **bad)

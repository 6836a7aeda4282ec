"""Kernels and similarity against explicit per-pair formulas (scipy sqrtm / inv), properties, errors."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_netsim import (
    gradient_kernel,
    influence,
    inverse_sqrt_psd,
    normalized_jacobian,
    normalizer,
    per_sample_jacobian,
    similarity,
)
from tests.models import cnn, mlp
from tests.reference import explicit_blocks, explicit_similarity, pinv_sqrt


def _jac(n: int, d: int, p: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, p, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _model_jac(d: int, n: int = 6, seed: int = 0) -> torch.Tensor:
    x = torch.randn(n, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 10))
    return per_sample_jacobian(mlp(d, seed=seed), x)


@pytest.mark.parametrize("d", [1, 3])
@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_gradient_kernel_matches_explicit(d: int, cross: bool) -> None:
    a = _jac(5, d, 11)
    b = _jac(4, d, 11, seed=1) if cross else None
    np.testing.assert_allclose(gradient_kernel(a, b).numpy(), explicit_blocks(a, b), rtol=0, atol=1e-10)


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
@pytest.mark.parametrize("block_size", [None, 2], ids=["one-block", "blocks-of-2"])
def test_similarity_matches_scipy(d: int, cross: bool, block_size: int | None) -> None:
    a = _model_jac(d)
    b = _model_jac(d, n=4, seed=3) if cross else None
    rho = similarity(a, b, block_size=block_size)
    np.testing.assert_allclose(rho.numpy(), explicit_similarity(a, b), rtol=0, atol=1e-10)


def test_similarity_blocks_match_explicit() -> None:
    a, b = _model_jac(3), _model_jac(3, n=4, seed=2)
    blocks = similarity(a, b, reduction="none", block_size=4).numpy()
    ka, kb, kab = explicit_blocks(a), explicit_blocks(b), explicit_blocks(a, b)
    for i in range(a.shape[0]):
        for j in range(b.shape[0]):
            expected = pinv_sqrt(ka[i, i]) @ kab[i, j] @ pinv_sqrt(kb[j, j])
            np.testing.assert_allclose(blocks[i, j], expected, rtol=0, atol=1e-10)
    np.testing.assert_allclose(np.trace(blocks, axis1=2, axis2=3) / 3, similarity(a, b).numpy(), atol=1e-12)


def test_normalizer_is_inverse_sqrt_and_rows_orthonormal() -> None:
    jac = _model_jac(3)
    w = normalizer(jac).numpy()
    for i, j in enumerate(jac.numpy()):
        np.testing.assert_allclose(w[i], pinv_sqrt(j @ j.T), rtol=0, atol=1e-10)
    jhat = normalized_jacobian(jac)
    torch.testing.assert_close(jhat @ jhat.mT, torch.eye(3, dtype=torch.float64).expand(6, 3, 3))


def test_cnn_d1_similarity_is_gradient_cosine() -> None:
    x = torch.randn(5, 1, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    g = per_sample_jacobian(cnn(1), x)[:, 0]
    cos = torch.nn.functional.cosine_similarity(g[:, None], g[None], dim=-1)
    torch.testing.assert_close(similarity(g), cos, rtol=0, atol=1e-12)


def test_influence_matches_formula() -> None:
    g = _jac(4, 1, 7)[:, 0]
    expected = (g @ g.T) / (g * g).sum(1, keepdim=True)
    torch.testing.assert_close(influence(g), expected, rtol=0, atol=1e-12)
    a, b = _model_jac(2), _model_jac(2, n=3, seed=5)
    blocks = influence(a, b, reduction="none").numpy()
    ka, kab = explicit_blocks(a), explicit_blocks(a, b)
    for i in range(a.shape[0]):
        for j in range(b.shape[0]):
            np.testing.assert_allclose(blocks[i, j], np.linalg.inv(ka[i, i]) @ kab[i, j], atol=1e-9)


# ---------------------------------------------------------------- properties


@pytest.mark.parametrize("d", [1, 3])
def test_symmetric_unit_diagonal_bounded(d: int) -> None:
    rho = similarity(_model_jac(d, n=8))
    assert torch.equal(rho, rho.T)
    torch.testing.assert_close(rho.diagonal(), torch.ones(8, dtype=torch.float64), rtol=0, atol=1e-12)
    assert rho.abs().max() <= 1.0


def _similarity_of(output_fn, params=None) -> torch.Tensor:
    model = mlp(3, seed=4)
    x = torch.randn(7, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    return similarity(per_sample_jacobian(model, x, output_fn=output_fn, params=params))


def test_invariant_to_output_rotation_and_rescaling() -> None:
    base = _similarity_of(lambda m, b: m(b))
    rotation, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    rotated = _similarity_of(lambda m, b: m(b) @ rotation.T)
    rescaled = _similarity_of(lambda m, b: 7.5 * m(b))
    torch.testing.assert_close(rotated, base, rtol=0, atol=1e-10)
    torch.testing.assert_close(rescaled, base, rtol=0, atol=1e-10)


def test_not_invariant_to_general_linear_map_of_outputs() -> None:
    # Last-layer columns give K_ij = (h_i . h_j + 1) I, which any map preserves: use the first layer.
    first = ["0.weight", "0.bias"]
    base = _similarity_of(lambda m, b: m(b), first)
    mixing = torch.tensor([[1.0, 3.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.0, 0.2]], dtype=torch.float64)
    mixed = _similarity_of(lambda m, b: m(b) @ mixing.T, first)
    assert (mixed - base).abs().max() > 1e-2
    rotation, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    torch.testing.assert_close(_similarity_of(lambda m, b: m(b) @ rotation.T, first), base, rtol=0, atol=1e-10)


def test_not_invariant_to_reparametrization() -> None:
    # A ReLU network computes the same function with layer 1 scaled by c and layer 2 by 1/c,
    # but its gradients (and so the similarity) change.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 1)).double()
    other = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 1)).double()
    other.load_state_dict(net.state_dict())
    with torch.no_grad():
        other[0].weight.mul_(5.0)
        other[0].bias.mul_(5.0)
        other[2].weight.div_(5.0)
    x = torch.randn(6, 4, dtype=torch.float64)
    torch.testing.assert_close(other(x), net(x))
    diff = similarity(per_sample_jacobian(other, x)) - similarity(per_sample_jacobian(net, x))
    assert diff.abs().max() > 1e-2


# ---------------------------------------------------------------- degenerate cases


def test_zero_jacobian_has_zero_similarity() -> None:
    jac = _jac(4, 2, 5)
    jac[1] = 0
    rho = similarity(jac)
    assert torch.isfinite(rho).all()
    assert torch.equal(rho[1], torch.zeros(4, dtype=torch.float64))
    assert torch.equal(rho[:, 1], torch.zeros(4, dtype=torch.float64))
    assert torch.isfinite(similarity(jac, reduction="none")).all()
    assert torch.isfinite(influence(jac)).all()


def test_zero_jacobian_from_a_model() -> None:
    # All hidden ReLUs dead for this input: the gradient w.r.t. the first layer vanishes.
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)).double()
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[0].bias.fill_(0.0)
    x = torch.tensor([[-1.0, -1.0], [1.0, 2.0], [2.0, 0.5]], dtype=torch.float64)
    rho = similarity(per_sample_jacobian(net, x, params=[net[0]]))
    assert torch.isfinite(rho).all() and rho[0].abs().sum() == 0
    assert rho[1, 1] == pytest.approx(1.0)


def test_rank_deficient_follows_pseudo_inverse_policy() -> None:
    jac = _jac(3, 2, 6)
    jac[0, 1] = 2.0 * jac[0, 0]  # K_00 has rank 1
    rho = similarity(jac)
    assert torch.isfinite(rho).all()
    assert rho[0, 0].item() == pytest.approx(0.5, abs=1e-12)  # rank / d
    a = jac.numpy()
    w = [pinv_sqrt(j @ j.T, rcond=1e-8) for j in a]
    expected = np.array([[np.trace(w[i] @ a[i] @ a[j].T @ w[j]) / 2 for j in range(3)] for i in range(3)])
    np.testing.assert_allclose(rho.numpy(), expected, atol=1e-10)


def test_more_outputs_than_parameters() -> None:
    jac = _jac(4, 5, 3)  # d > P: every K_ii has rank 3
    rho = similarity(jac)
    assert torch.isfinite(rho).all() and rho.abs().max() <= 1
    torch.testing.assert_close(rho.diagonal(), torch.full((4,), 3 / 5, dtype=torch.float64))


def test_inverse_sqrt_psd_cut_off() -> None:
    gram = torch.diag(torch.tensor([1.0, 1e-20], dtype=torch.float64))[None]
    torch.testing.assert_close(inverse_sqrt_psd(gram), torch.diag(torch.tensor([1.0, 0.0], dtype=torch.float64))[None])
    kept = inverse_sqrt_psd(gram, eps=0.0)
    assert kept[0, 1, 1] == pytest.approx(1e10)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 6),
    m=st.integers(1, 5),
    d=st.integers(1, 4),
    p=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_property_random_shapes(n: int, m: int, d: int, p: int, seed: int) -> None:
    a, b = _jac(n, d, p, seed), _jac(m, d, p, seed + 1)
    rho = similarity(a)
    assert torch.equal(rho, rho.T)
    assert torch.isfinite(rho).all() and rho.abs().max() <= 1
    rank = torch.linalg.matrix_rank(a).double()
    torch.testing.assert_close(rho.diagonal(), rank / d, rtol=0, atol=1e-8)
    cross = similarity(a, b)
    if p >= d:  # full-rank blocks almost surely: compare with scipy
        np.testing.assert_allclose(cross.numpy(), explicit_similarity(a, b), atol=1e-8)
    torch.testing.assert_close(similarity(b, a), cross.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(gradient_kernel(a, b), gradient_kernel(b, a).permute(1, 0, 3, 2))


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("a", "b", "error", "match"),
    [
        (_jac(3, 2, 5), _jac(3, 3, 5), ValueError, r"share d \(outputs\) and P \(parameters\)"),
        (_jac(3, 2, 5), _jac(3, 2, 4), ValueError, r"\(3, 2, 5\) and \(3, 2, 4\)"),
        (torch.ones(3, 2, 5, dtype=torch.long), None, TypeError, "floating-point tensor.*torch.int64"),
        (_jac(3, 2, 5), _jac(3, 2, 5).float(), TypeError, "one dtype and device"),
        (torch.zeros(2, 3, 4, 5), None, ValueError, r"3D tensor of shape \[N, d, P\]"),
        ([[1.0]], None, TypeError, "torch.Tensor"),
    ],
    ids=["different-d", "different-P", "integer", "dtype-mismatch", "4d", "not-a-tensor"],
)
def test_similarity_errors(a, b, error, match) -> None:
    with pytest.raises(error, match=match):
        similarity(a, b)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"reduction": "mean"}, r"one of \('trace', 'none'\)"), ({"eps": -1.0}, "non-negative"), ({"block_size": 0}, "block_size")],
    ids=["reduction", "eps", "block-size"],
)
def test_similarity_bad_options(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        similarity(_jac(3, 2, 5), **kwargs)


def test_gradient_kernel_rejects_mismatch() -> None:
    with pytest.raises(ValueError, match="share d"):
        gradient_kernel(_jac(2, 1, 3), _jac(2, 2, 3))

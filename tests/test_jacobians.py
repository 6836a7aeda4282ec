"""per_sample_jacobian against a per-sample autograd loop (float64), side effects, errors."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_netsim import UsageError, per_sample_jacobian, select_parameters
from lightning_netsim.core import parameter_slices
from tests.models import TwoInputNet, batchnorm_mlp, cnn, mlp
from tests.reference import loop_jacobian

TOL = dict(rtol=0, atol=1e-10)


def _x(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _rows(t: torch.Tensor) -> list[torch.Tensor]:
    return [t[i : i + 1] for i in range(t.shape[0])]


CASES = {
    "mlp-d3": (lambda: mlp(3), lambda: _x(7, 4)),
    "cnn-d1": (lambda: cnn(1), lambda: _x(5, 1, 6, 6)),
    "cnn-d4": (lambda: cnn(4), lambda: _x(3, 1, 6, 6)),
    "batchnorm-eval-d2": (lambda: batchnorm_mlp(2), lambda: _x(6, 4)),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_matches_autograd_loop(case: str) -> None:
    make_model, make_x = CASES[case]
    model, x = make_model(), make_x()
    jac = per_sample_jacobian(model, x)
    ref = loop_jacobian(model, _rows(x), lambda m, b: m(b))
    assert jac.shape == ref.shape
    assert jac.dtype == torch.float64
    torch.testing.assert_close(jac, ref, **TOL)


def test_tuple_batch_uses_first_element_and_scalar_output() -> None:
    model = mlp(1)
    x, y = _x(6, 4), torch.arange(6)
    jac = per_sample_jacobian(model, (x, y), output_fn=lambda m, b: m(b[0]).squeeze(1))
    assert jac.shape == (6, 1, sum(p.numel() for p in model.parameters()))
    torch.testing.assert_close(jac, loop_jacobian(model, _rows(x), lambda m, b: m(b)), **TOL)
    torch.testing.assert_close(per_sample_jacobian(model, [x, y]), jac, **TOL)


def test_dict_batch_with_custom_output_fn() -> None:
    model = TwoInputNet()
    batch = {"x": _x(5, 3), "z": _x(5, 2, seed=2), "meta": "ignored"}

    def output_fn(m: nn.Module, b: dict) -> torch.Tensor:
        return m(b["x"], b["z"])

    jac = per_sample_jacobian(model, batch, output_fn=output_fn)
    samples = [{"x": batch["x"][i : i + 1], "z": batch["z"][i : i + 1]} for i in range(5)]
    torch.testing.assert_close(jac, loop_jacobian(model, samples, output_fn), **TOL)


def test_output_fn_may_call_submodules() -> None:
    model = mlp(3)
    x = _x(4, 4)

    def hidden_then_head(m: nn.Module, b: torch.Tensor) -> torch.Tensor:
        return m[2](m[1](m[0](b)))[:, :2]

    jac = per_sample_jacobian(model, x, output_fn=hidden_then_head)
    torch.testing.assert_close(jac, loop_jacobian(model, _rows(x), hidden_then_head), **TOL)


@pytest.mark.parametrize(
    "how",
    ["names", "predicate", "modules", "tensors"],
)
def test_parameter_subset(how: str) -> None:
    model = cnn(2)
    chosen = {"0.bias", "5.weight"}
    selection = {
        "names": ["5.weight", "0.bias"],
        "predicate": lambda name, p: name in chosen,
        "modules": None,
        "tensors": [model[5].weight, model[0].bias],
    }[how]
    if how == "modules":  # a module selects all of its parameters
        chosen = {"0.weight", "0.bias"}
        selection = [model[0]]
    x = _x(4, 1, 6, 6)
    jac = per_sample_jacobian(model, x, params=selection)
    ordered = [p for name, p in model.named_parameters() if name in chosen]
    torch.testing.assert_close(jac, loop_jacobian(model, _rows(x), lambda m, b: m(b), ordered), **TOL)
    assert list(select_parameters(model, selection)) == [n for n, _ in model.named_parameters() if n in chosen]


def test_column_order_follows_named_parameters() -> None:
    model = mlp(2)
    x = _x(3, 4)
    jac = per_sample_jacobian(model, x)
    for name, cols in parameter_slices(select_parameters(model)).items():
        alone = per_sample_jacobian(model, x, params=[name])
        torch.testing.assert_close(jac[:, :, cols], alone, **TOL)


def test_shared_parameters_appear_once() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(3, 3).double()
    model = nn.Sequential(layer, nn.Tanh(), layer)
    weight = layer.weight
    x = _x(4, 3)
    jac = per_sample_jacobian(model, x)
    assert jac.shape[-1] == 12
    assert layer.weight is weight and isinstance(layer.weight, nn.Parameter)  # model left intact
    torch.testing.assert_close(jac, loop_jacobian(model, _rows(x), lambda m, b: m(b)), **TOL)


@pytest.mark.parametrize("chunk_size", [1, 2, 5])
def test_chunk_size_gives_same_result(chunk_size: int) -> None:
    model, x = mlp(3), _x(5, 4)
    torch.testing.assert_close(per_sample_jacobian(model, x, chunk_size=chunk_size), per_sample_jacobian(model, x))


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_works_under_disabled_autograd(context: str) -> None:
    model = mlp(3)
    manager = torch.no_grad if context == "no_grad" else torch.inference_mode
    with manager():
        x = _x(4, 4)
        jac = per_sample_jacobian(model, (x,))
    torch.testing.assert_close(jac, loop_jacobian(model, _rows(_x(4, 4)), lambda m, b: m(b)), **TOL)


def test_float32_model_gives_float32() -> None:
    model = mlp(2).float()
    jac = per_sample_jacobian(model, torch.randn(3, 4))
    assert jac.dtype == torch.float32 and jac.device == next(model.parameters()).device


def test_no_side_effects() -> None:
    model = batchnorm_mlp(2)
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    x = _x(5, 4)
    x_before = x.clone()
    rng = torch.get_rng_state()
    per_sample_jacobian(model, x)
    assert all(p.grad is None for p in model.parameters())
    assert not any(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(x, x_before)
    for k, v in model.state_dict().items():
        assert torch.equal(v, buffers[k]), k
    train_model = mlp(2).train()
    per_sample_jacobian(train_model, x)
    assert all(m.training for m in train_model.modules())


# ---------------------------------------------------------------- errors


def test_error_no_trainable_parameters() -> None:
    model = mlp(2).requires_grad_(False)
    with pytest.raises(UsageError, match="trainable parameters.*requires_grad=True"):
        per_sample_jacobian(model, _x(3, 4))


@pytest.mark.parametrize(
    ("output_fn", "error", "match"),
    [
        (lambda m, b: m(b).unsqueeze(-1), ValueError, r"shape \[B\] or \[B, d\].*\(1, 3, 1\)"),
        (lambda m, b: {"out": m(b)}, TypeError, "returned a dict"),
        (lambda m, b: (m(b) > 0).long(), TypeError, "floating-point"),
    ],
    ids=["3d-output", "dict-output", "integer-output"],
)
def test_error_bad_outputs(output_fn, error, match) -> None:
    with pytest.raises(error, match=match):
        per_sample_jacobian(mlp(3), _x(3, 4), output_fn=output_fn)


@pytest.mark.parametrize(
    ("batch", "match"),
    [
        ((torch.zeros(5, 4, dtype=torch.float64), torch.zeros(4)), r"share the leading batch dimension.*\(5, 4\), \(4,\)"),
        ((torch.zeros(5, 4, dtype=torch.float64), torch.tensor(1.0)), "0-dimensional.*cannot be split per sample"),
        ("not a batch", "holds no tensor"),
        (torch.zeros(0, 4, dtype=torch.float64), "non-empty batch"),
    ],
    ids=["different-leading-sizes", "scalar-tensor", "no-tensor", "empty"],
)
def test_error_unsplittable_batches(batch, match) -> None:
    with pytest.raises(ValueError, match=match):
        per_sample_jacobian(mlp(3), batch, output_fn=lambda m, b: m(b[0] if isinstance(b, tuple) else b))


def test_error_batchnorm_in_training_mode() -> None:
    model = batchnorm_mlp(2).train()
    with pytest.raises(UsageError, match=r"BatchNorm module '1'.*model.eval\(\).*GroupNorm / LayerNorm"):
        per_sample_jacobian(model, _x(4, 4))


def test_error_batchnorm_without_running_stats() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3, track_running_stats=False)).double().eval()
    with pytest.raises(UsageError, match="batch statistics"):
        per_sample_jacobian(model, _x(4, 4))


def test_error_dropout_in_training_mode() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5), nn.Linear(3, 1)).double()
    with pytest.raises(UsageError, match=r"Dropout module '1'.*model.eval\(\)"):
        per_sample_jacobian(model, _x(4, 4))
    per_sample_jacobian(model.eval(), _x(4, 4))  # fine in eval mode


def test_error_functional_randomness() -> None:
    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 2).double()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.dropout(self.lin(x), 0.5, training=True)

    with pytest.raises(UsageError, match="random numbers"):
        per_sample_jacobian(Noisy(), _x(3, 4))


def test_error_untransformable_model() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 2).double()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.lin(x)
            return out if out.sum() > 0 else -out

    with pytest.raises(UsageError, match="torch.func` could not transform Branchy"):
        per_sample_jacobian(Branchy(), _x(3, 4))


@pytest.mark.parametrize(
    ("params", "error", "match"),
    [
        (["0.weight", "nope"], UsageError, "Unknown parameter name 'nope'"),
        ([nn.Linear(2, 2)], UsageError, "not part of `model`"),
        ([torch.zeros(3)], UsageError, "not a parameter of `model`"),
        (lambda name, p: False, UsageError, "selected none"),
        ([3.0], TypeError, "item of type float"),
    ],
    ids=["unknown-name", "foreign-module", "foreign-tensor", "empty-predicate", "bad-type"],
)
def test_error_bad_parameter_selection(params, error, match) -> None:
    with pytest.raises(error, match=match):
        per_sample_jacobian(mlp(2), _x(3, 4), params=params)


def test_error_frozen_parameter_selected() -> None:
    model = mlp(2)
    model[0].weight.requires_grad_(False)
    with pytest.raises(UsageError, match=r"\['0.weight'\] have `requires_grad=False`"):
        per_sample_jacobian(model, _x(3, 4), params=["0.weight"])


def test_error_bad_chunk_size() -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        per_sample_jacobian(mlp(2), _x(3, 4), chunk_size=0)


def test_tied_parameters_across_modules() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.Linear(3, 3)
            self.dec = nn.Linear(3, 3)
            self.dec.weight = self.enc.weight
            self.double()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.dec(torch.tanh(self.enc(x)))

    model = Tied()
    before = [id(p) for p in model.parameters()]
    x = _x(4, 3)
    jac = per_sample_jacobian(model, x)
    assert jac.shape[-1] == 9 + 3 + 3
    torch.testing.assert_close(jac, loop_jacobian(model, _rows(x), lambda m, b: m(b)), **TOL)
    assert [id(p) for p in model.parameters()] == before
    assert isinstance(model.dec.weight, nn.Parameter) and model.dec.weight is model.enc.weight


def test_result_is_detached_from_the_model() -> None:
    model = mlp(3)
    jac = per_sample_jacobian(model, _x(3, 4), params=["0.weight"])
    assert not jac.requires_grad and jac.grad_fn is None

"""Closed-form per-layer kernels and weighted sums against the generic ``torch.func`` path (float64)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_netsim import soft_density
from lightning_netsim.core.closed_form import CLOSED_FORMS, LayerwiseKernels
from lightning_netsim.core.jacobians import JacobianEngine, grad_mode_for_autograd
from lightning_netsim.core.parameters import select_parameters

TOL = dict(rtol=0, atol=1e-10)


def _run(model, inputs, params=None, m=2, chunk_size=None):
    """Closed-form ``(K, S)`` and the generic ``(J Jᵀ, Σ w J)`` for random weights ``w``."""
    engine = JacobianEngine(model, params=params, chunk_size=chunk_size)
    layers = LayerwiseKernels(engine)
    gen = torch.Generator().manual_seed(5)
    with grad_mode_for_autograd():
        batch = engine.prepare(inputs)
        jac = engine.jacobian(batch)
        w = torch.randn(batch.size, m, jac.shape[1], dtype=jac.dtype, generator=gen)
        _, kernel, total = layers.compute(batch, lambda k, rows: w[rows])
    return layers, (kernel, total), (jac @ jac.mT, torch.einsum("bmk,bkp->mp", w, jac))


def _seq(*modules: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*modules).double()


class _Tokens(nn.Module):
    """Embedding → LayerNorm → Linear over a sequence (rank-3 Linear inputs), pooled."""

    def __init__(self, padding_idx=None, d=3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(12, 5, padding_idx=padding_idx)
        self.norm = nn.LayerNorm(5)
        self.lin = nn.Linear(5, 4)
        self.head = nn.Linear(4, d)
        self.double()

    def forward(self, idx):
        return self.head(torch.tanh(self.lin(self.norm(self.emb(idx)))).mean(1))


def _eval_bn(model: nn.Module) -> nn.Module:
    """Give BatchNorm layers non-trivial running statistics, then switch to eval mode."""
    with torch.no_grad():
        for _ in range(3):
            first = next(model.modules())[0]
            shape = (16, first.in_features) if isinstance(first, nn.Linear) else (16, first.in_channels, *([5, 5] if isinstance(first, nn.Conv2d) else [9]))
            model(torch.randn(*shape, dtype=torch.float64) * 2 + 1)
    return model.eval()


def _img(*shape):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


CASES = {
    "linear-bias": (lambda: _seq(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)), lambda: _img(5, 4)),
    "linear-nobias": (lambda: _seq(nn.Linear(4, 6, bias=False), nn.Tanh(), nn.Linear(6, 1, bias=False)), lambda: _img(5, 4)),
    "linear-seq": (lambda: _seq(nn.Linear(4, 6), nn.Tanh(), nn.Flatten(), nn.Linear(18, 2)), lambda: _img(5, 3, 4)),
    "linear-rank4": (lambda: _seq(nn.Linear(4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(18, 2)), lambda: _img(5, 2, 3, 4)),
    "conv2d-pad": (lambda: _seq(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(75, 2)), lambda: _img(4, 2, 5, 5)),
    "conv2d-stride-nobias": (lambda: _seq(nn.Conv2d(2, 3, (3, 2), stride=2, bias=False), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)), lambda: _img(4, 2, 5, 5)),
    "conv2d-dilation": (lambda: _seq(nn.Conv2d(2, 3, 2, dilation=2, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(75, 1)), lambda: _img(4, 2, 5, 5)),
    "conv2d-same": (lambda: _seq(nn.Conv2d(2, 2, 3, padding="same"), nn.Tanh(), nn.Flatten(), nn.Linear(50, 2)), lambda: _img(4, 2, 5, 5)),
    "conv2d-large-gram": (lambda: _seq(nn.Conv2d(1, 16, 3), nn.Tanh(), nn.Flatten(), nn.Linear(16 * 16, 2)), lambda: _img(3, 1, 6, 6)),
    "conv1d": (lambda: _seq(nn.Conv1d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv1d(4, 2, 2, stride=2), nn.Flatten(), nn.Linear(8, 2)), lambda: _img(4, 2, 9)),
    "groupnorm": (lambda: _seq(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten(), nn.Linear(36, 2)), lambda: _img(4, 2, 5, 5)),
    "layernorm-2d-shape": (lambda: _seq(nn.Linear(4, 6), nn.Unflatten(1, (2, 3)), nn.LayerNorm((2, 3)), nn.Flatten(), nn.Linear(6, 2)), lambda: _img(5, 4)),
    "batchnorm2d-eval": (lambda: _eval_bn(_seq(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.Tanh(), nn.Flatten(), nn.Linear(36, 2))), lambda: _img(4, 2, 5, 5)),
    "batchnorm1d-eval": (lambda: _eval_bn(_seq(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))), lambda: _img(5, 4)),
    "batchnorm1d-seq-eval": (lambda: _eval_bn(_seq(nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3), nn.Tanh(), nn.Flatten(), nn.Linear(21, 3))), lambda: _img(5, 2, 9)),
    "batchnorm3d-eval": (lambda: _eval_bn(_seq(nn.Linear(4, 8), nn.Unflatten(1, (2, 1, 2, 2)), nn.BatchNorm3d(2), nn.Tanh(), nn.Flatten(), nn.Linear(8, 2))), lambda: _img(5, 4)),
    "embedding": (lambda: _Tokens(), lambda: torch.randint(0, 12, (5, 4), generator=torch.Generator().manual_seed(1))),
    "embedding-padding": (lambda: _Tokens(padding_idx=0), lambda: torch.randint(0, 4, (5, 4), generator=torch.Generator().manual_seed(1))),
    "embedding-d1": (lambda: _Tokens(d=1), lambda: torch.randint(0, 12, (5, 6), generator=torch.Generator().manual_seed(2))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_closed_forms_equal_the_generic_path(case):
    make_model, make_inputs = CASES[case]
    layers, (kernel, total), (expected_kernel, expected_total) = _run(make_model(), make_inputs())
    assert not layers.fallback_names, "every parameter of these models has a closed form"
    torch.testing.assert_close(kernel, expected_kernel, **TOL)
    torch.testing.assert_close(total, expected_total, **TOL)


# Convolutions whose shapes make the explicit per-sample form cheaper than the Gram form.
_CONV_CASES = ["conv2d-pad", "conv2d-dilation", "conv2d-same", "conv1d", "groupnorm", "batchnorm2d-eval"]


@pytest.mark.parametrize("method", ["_grouped", "_unfolded"])
@pytest.mark.parametrize("case", _CONV_CASES)
def test_both_per_sample_convolution_methods_are_exact(case, method, monkeypatch):
    """The timed choice between the two explicit forms must not matter: each alone is exact."""
    from lightning_netsim.core import closed_form

    used = []

    def forced(self):
        used.append(method)
        return getattr(self, method)(self.inputs, self.grads)

    monkeypatch.setattr(closed_form._ConvTerms, "_per_sample", forced)
    make_model, make_inputs = CASES[case]
    _, (kernel, total), (expected_kernel, expected_total) = _run(make_model(), make_inputs())
    assert used, "the explicit form was not used: the case does not test it"
    torch.testing.assert_close(kernel, expected_kernel, **TOL)
    torch.testing.assert_close(total, expected_total, **TOL)


def test_convolution_method_is_timed_once_per_setting():
    from lightning_netsim.core import closed_form

    model = CASES["conv1d"][0]()
    _run(model, _img(4, 2, 9))
    first = {id(m): dict(v) for m, v in closed_form._CONV_METHODS.items() if any(m is c for c in model.modules())}
    assert len(first) == 2 and all(set(v.values()) <= {"grouped", "unfold"} for v in first.values())
    _run(model, _img(4, 2, 9))
    again = {id(m): dict(v) for m, v in closed_form._CONV_METHODS.items() if any(m is c for c in model.modules())}
    assert again == first


def test_every_registered_type_is_covered_by_a_case():
    covered = {type(m) for make, _ in CASES.values() for m in make().modules()}
    assert set(CLOSED_FORMS) <= covered


class _Scale(nn.Module):
    """A module without a closed form."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, n))

    def forward(self, x):
        return x * self.scale


class _OutsideUse(nn.Module):
    """``lin.weight`` is also used outside ``lin``: the closed form of ``lin`` would miss it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.head = nn.Linear(4, 4), nn.Linear(4, 2)
        self.double()

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        return self.head(h + F.linear(h, self.lin.weight))


class _SequenceFirst(nn.Module):
    """``lin`` sees the batch in dimension 1: its rows are not examples."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.head = nn.Linear(4, 4), nn.Linear(4, 2)
        self.double()

    def forward(self, x):
        return self.head(torch.tanh(self.lin(x.transpose(0, 1))).transpose(0, 1).mean(1))


class _Reused(nn.Module):
    """One Linear called twice: its calls add up as extra positions."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.head = nn.Linear(4, 4), nn.Linear(4, 3)
        self.double()

    def forward(self, x):
        return self.head(torch.tanh(self.lin(torch.tanh(self.lin(x)))))


class _InPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 2)).double()

    def forward(self, x):
        return self.net(x + 0.3)


@pytest.mark.parametrize(
    ("make_model", "inputs", "fallback"),
    [
        pytest.param(lambda: _seq(nn.Linear(4, 4), _Scale(4), nn.Tanh(), nn.Linear(4, 2)), _img(6, 4), ["1.scale"], id="unregistered-module"),
        pytest.param(_OutsideUse, _img(6, 4), ["lin.weight", "lin.bias"], id="weight-used-outside-module"),
        pytest.param(_SequenceFirst, _img(5, 5, 4), ["lin.weight", "lin.bias"], id="batch-not-leading"),
        pytest.param(_Reused, _img(6, 4), [], id="module-called-twice"),
        pytest.param(_InPlace, _img(6, 4), [], id="inplace-relu-after-linear"),
        pytest.param(lambda: _seq(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(36, 2)), _img(3, 2, 5, 5), ["0.weight", "0.bias"], id="grouped-conv"),
    ],
)
def test_mixed_models_fall_back_per_module_and_stay_exact(make_model, inputs, fallback):
    layers, (kernel, total), (expected_kernel, expected_total) = _run(make_model(), inputs)
    assert layers.fallback_names == fallback
    torch.testing.assert_close(kernel, expected_kernel, **TOL)
    torch.testing.assert_close(total, expected_total, **TOL)


def test_parameter_subset_and_chunks():
    model = _seq(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(27, 3))
    params = ["0.bias", "3.weight"]
    layers, (kernel, total), (expected_kernel, expected_total) = _run(model, _img(5, 2, 5, 5), params=params, chunk_size=2)
    assert list(select_parameters(model, params)) == params and not layers.fallback_names
    torch.testing.assert_close(kernel, expected_kernel, **TOL)
    torch.testing.assert_close(total, expected_total, **TOL)


def test_hooks_are_removed_and_model_untouched():
    model = _InPlace()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _run(model, _img(6, 4))
    assert all(not m._forward_hooks for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_soft_density_on_a_mixed_model_matches_explicit():
    from lightning_netsim import per_sample_jacobian, similarity

    model = _seq(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(75, 4), _Scale(4), nn.Tanh(), nn.Linear(4, 3))
    x = _img(7, 1, 5, 5)
    expected = similarity(per_sample_jacobian(model, x)).sum(1)
    torch.testing.assert_close(soft_density(model, [x[:4], x[4:]]), expected, rtol=0, atol=1e-8)


class _Encoder(nn.Module):
    """torch's own TransformerEncoder (eval mode: its fused fast path has no forward-mode AD)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(8, d)
        self.double().eval()

    def forward(self, x):
        return self.head(self.enc(x).mean(1))


@pytest.mark.parametrize("d", [1, 3])
def test_transformer_encoder_density_is_exact(d):
    from lightning_netsim import per_sample_jacobian, similarity

    model, x = _Encoder(d), _img(7, 5, 8)
    layers, (kernel, total), (expected_kernel, expected_total) = _run(model, x)
    assert any("self_attn" in name for name in layers.fallback_names)  # attention weights: generic path
    torch.testing.assert_close(kernel, expected_kernel, **TOL)
    expected = similarity(per_sample_jacobian(model, x)).sum(1)
    torch.testing.assert_close(soft_density(model, [x[:4], x[4:]]), expected, rtol=0, atol=1e-8)


def test_first_batch_verdict_is_remembered_per_model():
    from lightning_netsim.core import closed_form

    model = _OutsideUse()
    first, *_ = _run(model, _img(6, 4))
    assert first.fallback_names == ["lin.weight", "lin.bias"] and closed_form._VERDICTS[model]
    second, (kernel, total), (expected_kernel, expected_total) = _run(model, _img(6, 4))
    assert second.fallback_names == ["lin.weight", "lin.bias"]
    torch.testing.assert_close(kernel, expected_kernel, **TOL)
    torch.testing.assert_close(total, expected_total, **TOL)


class _PartlyFrozenCall(nn.Module):
    """``lin`` is called twice, once without autograd: only the other call moves the output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.head = nn.Linear(4, 4), nn.Linear(4, 2)
        self.double()

    def forward(self, x):
        with torch.no_grad():
            frozen = self.lin(x)
        return self.head(torch.tanh(self.lin(x)) + frozen)


def test_calls_without_autograd_contribute_nothing():
    layers, (kernel, total), (expected_kernel, expected_total) = _run(_PartlyFrozenCall(), _img(6, 4))
    torch.testing.assert_close(kernel, expected_kernel, **TOL)
    torch.testing.assert_close(total, expected_total, **TOL)
